"""Tests of the cold-start -> GRPO -> control pipeline (r1jax/run/pipeline.py), in-process.

A finished pipeline restarted on its workdir trains and evaluates nothing again and reports
the same figures; rerun with a changed eval field it recomputes the evaluations only; its
cold-start stage is exactly a standalone SFT run; every mode writes config.json, its
summary.json and plots, and TensorBoard tags grouped by train/ eval/ time/; latest_params
prefers the GRPO checkpoint; build() sizes the vocabulary from the tokenizer.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import jax
import ml_collections
import numpy as np
import pytest

from r1jax.data import tokenizer as tokenizer_lib
from r1jax.model import decoder
from r1jax.run import evaluate as eval_mode
from r1jax.run import experiment
from r1jax.run import grpo as grpo_mode
from r1jax.run import pipeline
from r1jax.run import sft as sft_mode
from r1jax.run import stages as stages_lib
from r1jax.train import evaluate as eval_lib
from r1jax.train import metrics as metrics_lib

import tiny_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "data")


def test_build_sizes_the_vocab_from_the_tokenizer():
  cfg = tiny_runs.load_config()
  task, tokenizer, model_cfg = experiment.build(cfg)
  assert model_cfg.vocab_size == tokenizer.vocab_size
  assert cfg.model.vocab_size == 256  # the config's own field is left alone
  # char+words: one token per alphabet character and per R1 tag / template part, + specials.
  alphabet = task.alphabet()
  assert all(len(tokenizer.encode(ch)) == 1 for ch in alphabet)
  assert len(tokenizer.encode("<think>")) == 1
  assert tokenizer.vocab_size > len(alphabet)

  path = os.path.join(FIXTURES, "gsm8k_tiny.jsonl")
  task, tokenizer, model_cfg = experiment.build(tiny_runs.load_config(f"gsm8k={path}"))
  assert task.name == "gsm8k" and isinstance(tokenizer, tokenizer_lib.ByteTokenizer)
  assert model_cfg.vocab_size == tokenizer.vocab_size


def test_build_rejects_an_unknown_task_option():
  cfg = tiny_runs.load_config()
  cfg.task.kwargs.digits = 3
  with pytest.raises(ValueError, match=r"task 'arithmetic' has no option\(s\) \['digits'\]"):
    experiment.build(cfg)


def test_traces_come_from_the_overridden_task():
  cfg = tiny_runs.load_config()
  traces = experiment.trace_task(cfg).examples("train", 64, seed=cfg.seed)
  task, _, _ = experiment.build(cfg)
  train = task.examples("train", 64, seed=cfg.seed)

  def operand_digits(ex):
    return {len(x) for x in ex.question.split("+")}

  assert set().union(*map(operand_digits, traces)) == {2}
  assert 3 in set().union(*map(operand_digits, train))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pipeline"))
  summary = pipeline.run(tiny_runs.load_config(), workdir)
  return workdir, summary


STAGES = ("sft", "eval_sft", "grpo", "eval_grpo", "sft_control", "eval_sft_control")


def test_the_plan_invalidates_what_depends_on_a_field():
  """The pipeline's own stage table: which stages each field reaches."""
  def stale(path, value):
    cfg = tiny_runs.load_config()
    records = json.loads(json.dumps(stages_lib.fingerprints(cfg, pipeline.plan(cfg))))
    node = cfg
    *parents, leaf = path.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
    return list(stages_lib.stale_stages(records, stages_lib.fingerprints(cfg, pipeline.plan(cfg))))

  assert stale("eval.max_new_tokens", 32) == ["eval_sft", "eval_grpo", "eval_sft_control"]
  assert stale("grpo.beta", 0.04) == ["grpo", "eval_grpo", "sft_control", "eval_sft_control"]
  assert stale("sft.optimizer.lr", 1e-3) == list(STAGES)
  assert stale("task.trace_overrides.train_digits", (2, 3)) == list(STAGES)
  assert stale("model.hidden_size", 64) == list(STAGES)
  for neutral in (("sft.checkpoint_every", 1), ("grpo.max_to_keep", 5),
                  ("grpo.reward_workers", 2), ("mode", "eval")):
    assert stale(*neutral) == [], neutral


def _line_counts(workdir):
  return {name: len(metrics_lib.read_metrics(os.path.join(workdir, name)))
          for name in ("sft", "grpo", "sft_control")}


def test_restart_of_a_finished_pipeline_redoes_nothing(finished, monkeypatch, capsys):
  workdir, summary = finished
  lines = _line_counts(workdir)
  assert lines["sft"] == 4 and lines["grpo"] == 2 and lines["sft_control"] >= 1

  def no_eval(*args, **kwargs):
    raise AssertionError("a finished evaluation was run again")

  monkeypatch.setattr(eval_lib, "evaluate", no_eval)
  records = json.load(open(os.path.join(workdir, "stages.json")))["stages"]
  capsys.readouterr()
  again = pipeline.run(tiny_runs.load_config(), workdir)
  out = capsys.readouterr().out
  for name in STAGES:
    assert f"[{name}] reusing the recorded result: its config is unchanged" in out
  assert "recomputing" not in out and "moved" not in out
  assert json.load(open(os.path.join(workdir, "stages.json")))["stages"] == records
  assert _line_counts(workdir) == lines
  timing = {"wall_time_s"}
  assert {k: v for k, v in again.items() if k not in timing} == \
         {k: v for k, v in summary.items() if k not in timing}
  assert again["wall_time_s"] > summary["wall_time_s"]  # wall time accumulates over restarts
  assert json.load(open(os.path.join(workdir, "summary.json")))["wall_time_s"] == \
      pytest.approx(again["wall_time_s"])


def test_a_kill_during_grpo_leaves_the_control_budget_as_uninterrupted(finished, tmp_path,
                                                                       monkeypatch):
  """Killed after GRPO's checkpoint 1 and rerun, the pipeline recompiles every program; the
  control's budget is still GRPO's sample + verify + train seconds without compilation, as
  in the uninterrupted run, and the control spends it on training, not compiling."""
  _, summary = finished
  # Tracing calls decoder.block once per layer: a pause there makes the rerun's
  # compilations slow (as a large model's are), so any compile time counted would show.
  pause_s, block = 1.0, decoder.block
  def slow_block(*args, **kwargs):
    time.sleep(pause_s)
    return block(*args, **kwargs)
  monkeypatch.setattr(decoder, "block", slow_block)
  resumed = tiny_runs.run_killed_then_resumed("pipeline", tmp_path, step=2)
  grpo_rows = metrics_lib.read_metrics(str(tmp_path / "grpo"))
  assert [r["step"] for r in grpo_rows] == [1, 2]
  assert grpo_rows[1]["time_compile_s"] > 2 * pause_s  # step 2 was the rerun's first
  budget = resumed["grpo_time_s"]
  print(f"\ncontrol budget: uninterrupted {summary['grpo_time_s']:.2f} s "
        f"({summary['sft_control_steps']} steps), killed and rerun {budget:.2f} s "
        f"({resumed['sft_control_steps']} steps)")
  assert budget == pytest.approx(sum(r["time_sample_s"] + r["time_verify_s"] + r["time_train_s"]
                                     for r in grpo_rows))
  # What remains is noise and a fresh process's slower first step (under a second here),
  # far below the rerun's compile time.
  assert abs(budget - summary["grpo_time_s"]) < 1.5 * pause_s
  assert stages_lib.load_results(str(tmp_path))["sft_control"]["time_budget_s"] == budget
  control = metrics_lib.read_metrics(str(tmp_path / "sft_control"))
  # The first step compiled (slowly) yet counts only its work, as every later step does.
  assert control[0]["elapsed_s"] < 2 * pause_s
  assert resumed["sft_control_time_s"] == control[-1]["elapsed_s"]


def test_a_changed_eval_field_recomputes_the_evaluations_only(finished, tmp_path, capsys):
  workdir, summary = finished
  rerun = str(tmp_path / "rerun")
  shutil.copytree(workdir, rerun)
  lines = _line_counts(rerun)
  before = stages_lib.load_results(rerun)
  cfg = tiny_runs.load_config()
  cfg.eval.max_new_tokens = 12  # too short for most answers: the figures change
  capsys.readouterr()
  again = pipeline.run(cfg, rerun)
  out = capsys.readouterr().out
  for name in ("eval_sft", "eval_grpo", "eval_sft_control"):
    assert f"[{name}] recomputing: config changed: eval.max_new_tokens 24 -> 12" in out
    assert f"[{name}] moved {name}/ (made under another config) to {name}.stale/" in out
  for name in ("sft", "grpo", "sft_control"):
    assert f"[{name}] reusing the recorded result: its config is unchanged" in out
    assert f"[{name}] recomputing" not in out
  assert _line_counts(rerun) == lines  # no training step ran again
  after = stages_lib.load_results(rerun)
  assert {k: after[k] for k in ("sft", "grpo", "sft_control")} == \
      {k: before[k] for k in ("sft", "grpo", "sft_control")}
  assert after["eval_grpo"]["mean_completion_length"] <= 12  # evaluated with the new field
  assert again["accuracy_after_grpo"] == after["eval_grpo"]["pass@1"]
  # eval figures in TensorBoard at the step of the stage each follows, the old ones aside
  assert {t: (s, v) for t, s, v in _tb_scalars(os.path.join(rerun, "eval_grpo"))
          }["eval/pass_1"] == (2, pytest.approx(after["eval_grpo"]["pass@1"]))
  assert os.path.isdir(os.path.join(rerun, "eval_grpo.stale", "tb"))
  capsys.readouterr()
  pipeline.run(cfg, rerun)  # unchanged now: nothing recomputed
  assert "recomputing" not in capsys.readouterr().out


def test_a_changed_grpo_field_retrains_grpo_from_scratch(finished, tmp_path, capsys):
  """GRPO's old checkpoint (step 2) is moved aside, not resumed: with grpo.steps=1 a resumed
  run would train nothing; a fresh one trains step 1. The cold start is kept. (Without the
  control, whose step count follows GRPO's time and so compiles anew each run; that the
  control follows GRPO is test_the_plan_invalidates_what_depends_on_a_field's.)"""
  workdir, _ = finished
  rerun = str(tmp_path / "rerun")
  shutil.copytree(workdir, rerun)
  sft_lines = metrics_lib.read_metrics(os.path.join(rerun, "sft"))
  cfg = tiny_runs.load_config()
  cfg.grpo.steps = 1
  cfg.control = False
  capsys.readouterr()
  pipeline.run(cfg, rerun)
  out = capsys.readouterr().out
  assert "[grpo] recomputing: config changed: grpo.steps 2 -> 1" in out
  assert "[grpo] moved grpo/ (made under another config) to grpo.stale/; it is not resumed" in out
  assert "[eval_grpo] recomputing: it comes after grpo, which changed" in out
  for name in ("sft", "eval_sft"):
    assert f"[{name}] reusing the recorded result" in out
  assert [r["step"] for r in metrics_lib.read_metrics(os.path.join(rerun, "grpo"))] == [1]
  assert [r["step"] for r in metrics_lib.read_metrics(os.path.join(rerun, "grpo.stale"))] == [1, 2]
  assert metrics_lib.read_metrics(os.path.join(rerun, "sft")) == sft_lines
  assert stages_lib.load_results(rerun)["grpo"]["steps"] == 1


def _tb_scalars(run_dir):
  """(tag, step, value) of the scalars in run_dir/tb's event files (not its subruns), read
  from the TFRecord framing."""
  import glob
  import struct
  from tensorboardX.proto import event_pb2
  out = []
  for path in sorted(glob.glob(os.path.join(run_dir, metrics_lib.TB_DIR, "events.out.*"))):
    data, pos = open(path, "rb").read(), 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      out += [(v.tag, event.step, v.simple_value) for v in event.summary.value
              if v.WhichOneof("value") == "simple_value"]
  return out


def test_pipeline_outputs_config_summary_and_grouped_tensorboard(finished):
  workdir, summary = finished
  assert json.load(open(os.path.join(workdir, "config.json"))) == json.loads(
      tiny_runs.load_config().to_json_best_effort())
  on_disk = json.load(open(os.path.join(workdir, "summary.json")))
  for key in ("accuracy_before_grpo", "accuracy_after_grpo", "accuracy_sft_control",
              "grpo_lift", "grpo_time_s", "sft_time_s", "wall_time_s", "params_total"):
    assert key in on_disk, key
  assert open(os.path.join(workdir, "pipeline.png"), "rb").read(8) == PNG_MAGIC
  sft_tags = {t for t, _, _ in _tb_scalars(os.path.join(workdir, "sft"))}
  assert {"train/loss", "train/nll", "train/grad_norm", "time/elapsed_s"} <= sft_tags
  grpo_tags = {t for t, _, _ in _tb_scalars(os.path.join(workdir, "grpo"))}
  assert {"train/reward_mean", "train/accuracy", "time/time_sample_s",
          "time/sample_tokens_per_s"} <= grpo_tags
  assert all(t.split("/")[0] in ("train", "time") for t in sft_tags | grpo_tags)
  results = stages_lib.load_results(workdir)
  for name, step in (("eval_sft", 4), ("eval_grpo", 2),
                     ("eval_sft_control", results["sft_control"]["steps"])):
    scalars = {t: (s, v) for t, s, v in _tb_scalars(os.path.join(workdir, name))}
    assert scalars["eval/pass_1"] == (step, pytest.approx(results[name]["pass@1"])), name
    assert scalars["eval/format_rate"][1] == pytest.approx(results[name]["format_rate"])
  assert os.listdir(os.path.join(workdir, metrics_lib.TB_DIR, metrics_lib.HPARAMS_RUN))


def test_every_mode_writes_config_summary_and_plots(finished, tmp_path):
  """`sft`, `grpo` and `eval` modes in a workdir holding the pipeline's finished sft/ and grpo/
  run dirs (so the two training modes resume at their last step: the end is what is tested)."""
  workdir = str(tmp_path)
  for name in ("sft", "grpo"):
    shutil.copytree(os.path.join(finished[0], name), os.path.join(workdir, name))
  cfg = tiny_runs.load_config("mode=sft")
  sft_mode.run(cfg, workdir)
  assert json.load(open(tmp_path / "config.json"))["mode"] == "sft"
  s = json.load(open(tmp_path / "sft" / "summary.json"))
  rows = metrics_lib.read_metrics(str(tmp_path / "sft"))
  assert s["steps"] == 4 and s["final_loss"] == rows[-1]["loss"]
  assert s["final_nll"] == rows[-1]["nll"] and s["train_time_s"] == rows[-1]["elapsed_s"]
  assert {"task", "seed", "num_traces", "params_total", "wall_time_s"} <= set(s)
  assert open(tmp_path / "sft" / "curves.png", "rb").read(8) == PNG_MAGIC
  # the hparams written right after the run left its scalars in place
  assert [s for t, s, _ in _tb_scalars(str(tmp_path / "sft")) if t == "train/loss"] == [1, 2, 3, 4]

  cfg = tiny_runs.load_config("mode=grpo")
  grpo_mode.run(cfg, workdir)
  assert json.load(open(tmp_path / "config.json"))["mode"] == "grpo"
  s = json.load(open(tmp_path / "grpo" / "summary.json"))
  rows = metrics_lib.read_metrics(str(tmp_path / "grpo"))
  assert s["init"] == "checkpoint" and s["steps"] == 2
  assert s["final_reward_mean"] == rows[-1]["reward_mean"]
  assert s["final_accuracy"] == rows[-1]["accuracy"]
  assert s["grpo_time_s"] == pytest.approx(s["sample_s"] + s["verify_s"] + s["train_s"])
  assert open(tmp_path / "grpo" / "curves.png", "rb").read(8) == PNG_MAGIC
  assert os.listdir(tmp_path / "grpo" / metrics_lib.TB_DIR / metrics_lib.HPARAMS_RUN)

  cfg = tiny_runs.load_config("mode=eval")
  out = eval_mode.run(cfg, workdir)
  assert json.load(open(tmp_path / "config.json"))["mode"] == "eval"
  s = json.load(open(tmp_path / "eval" / "summary.json"))
  assert s == out and s["num_problems"] == 8 and s["k"] == 1
  assert {"pass@1", "maj@1", "format_rate", "truncation_rate", "task", "wall_time_s"} <= set(s)
  assert not os.path.exists(tmp_path / "eval.json")
  assert open(tmp_path / "eval" / "eval.png", "rb").read(8) == PNG_MAGIC
  assert {t: v for t, _, v in _tb_scalars(str(tmp_path / "eval"))}["eval/pass_1"] == \
      pytest.approx(s["pass@1"])


def test_cold_start_equals_a_standalone_sft_run(finished, tmp_path):
  workdir, _ = finished
  cfg = tiny_runs.load_config()
  _, _, model_cfg = experiment.build(cfg)
  sft_only = str(tmp_path / "sft_only")
  shutil.copytree(os.path.join(workdir, "sft"), os.path.join(sft_only, "sft"))
  from_pipeline = experiment.latest_params(cfg, sft_only, model_cfg)
  standalone, _ = tiny_runs.run_sft(str(tmp_path / "standalone"), cfg)
  a, b = tiny_runs.leaves(from_pipeline), tiny_runs.leaves(standalone)
  assert all(np.array_equal(a[k], b[k]) for k in a)


def test_latest_params_prefers_grpo_over_sft(finished, tmp_path, capsys):
  workdir, _ = finished
  cfg = tiny_runs.load_config()
  _, _, model_cfg = experiment.build(cfg)
  sft_only = str(tmp_path / "sft_only")
  shutil.copytree(os.path.join(workdir, "sft"), os.path.join(sft_only, "sft"))
  # The tiny run's GRPO may leave the weights unchanged (all-equal reward groups), so check
  # which checkpoint each call read rather than comparing values.
  experiment.latest_params(cfg, workdir, model_cfg)
  assert f"loaded grpo checkpoint at step {cfg.grpo.steps}" in capsys.readouterr().out
  experiment.latest_params(cfg, sft_only, model_cfg)
  assert f"loaded sft checkpoint at step {cfg.sft.steps}" in capsys.readouterr().out
  with pytest.raises(ValueError, match="no grpo, sft or pretrain checkpoint found"):
    experiment.latest_params(cfg, str(tmp_path / "empty"), model_cfg)


def test_mesh_of_reads_the_config_field():
  cfg = tiny_runs.load_config()
  assert experiment.mesh_of(cfg) is None  # every axis 1: no mesh
  cfg.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 2})
  mesh = experiment.mesh_of(cfg)
  assert mesh.shape["data"] * 2 == len(jax.devices()) and mesh.shape["fsdp"] == 2
  cfg.mesh = ml_collections.ConfigDict({"dp": 2})
  with pytest.raises(ValueError, match="unknown mesh axes"):
    experiment.mesh_of(cfg)


def test_rollout_mesh_defaults_to_the_training_mesh_and_is_validated():
  cfg = tiny_runs.load_config()
  assert experiment.rollout_mesh_of(cfg) is None
  cfg.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 2})
  assert experiment.rollout_mesh_of(cfg).shape["fsdp"] == 2
  cfg.rollout_mesh = ml_collections.ConfigDict({"data": -1})
  assert experiment.rollout_mesh_of(cfg).shape["data"] == len(jax.devices())
  assert experiment.mesh_of(cfg).shape["fsdp"] == 2
  cfg.rollout_mesh = ml_collections.ConfigDict({"dp": 2})
  with pytest.raises(experiment.ConfigError, match="'rollout_mesh': unknown mesh axes"):
    experiment.validate(cfg)

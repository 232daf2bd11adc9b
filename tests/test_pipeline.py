"""Tests of the cold-start -> GRPO -> control pipeline (r1jax/run/pipeline.py), in-process.

A finished pipeline restarted on its workdir trains and evaluates nothing again and reports
the same figures; its cold-start stage is exactly a standalone SFT run; latest_params
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
from r1jax.run import experiment
from r1jax.run import pipeline
from r1jax.train import evaluate as eval_lib
from r1jax.train import metrics as metrics_lib

import tiny_runs

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


def _line_counts(workdir):
  return {name: len(metrics_lib.read_metrics(os.path.join(workdir, name)))
          for name in ("sft", "grpo", "sft_control")}


def test_restart_of_a_finished_pipeline_redoes_nothing(finished, monkeypatch):
  workdir, summary = finished
  lines = _line_counts(workdir)
  assert lines["sft"] == 4 and lines["grpo"] == 2 and lines["sft_control"] >= 1

  def no_eval(*args, **kwargs):
    raise AssertionError("a finished evaluation was run again")

  monkeypatch.setattr(eval_lib, "evaluate", no_eval)
  again = pipeline.run(tiny_runs.load_config(), workdir)
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
  stages = json.load(open(tmp_path / "stages.json"))
  assert stages["sft_control"]["time_budget_s"] == budget
  control = metrics_lib.read_metrics(str(tmp_path / "sft_control"))
  # The first step compiled (slowly) yet counts only its work, as every later step does.
  assert control[0]["elapsed_s"] < 2 * pause_s
  assert resumed["sft_control_time_s"] == control[-1]["elapsed_s"]


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
  with pytest.raises(ValueError, match="no sft or grpo checkpoint found"):
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

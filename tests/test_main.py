"""Tests of the entry point `python -m r1jax.main`, run as a user would: in a subprocess.

inspect mode prints counts; print_config prints the fields without a workdir; pipeline mode
on configs/test_tiny.py writes summary.json and pipeline.png; eval mode on that workdir reloads
the latest GRPO checkpoint; a bad config field (of any stage, in every mode), an unknown field
or a malformed data file stops the run at start-up with a message naming it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from r1jax.model import decoder as model_lib
from r1jax.model import presets
from r1jax.run import stages as stages_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CONFIG = os.path.join(REPO, "configs", "test_tiny.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_main(*args, timeout=400):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=os.path.join(REPO, ".jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  return subprocess.run([sys.executable, "-m", "r1jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _ok(proc):
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def test_inspect_prints_counts_and_writes_them(tmp_path):
  proc = _ok(run_main("--config=configs/model.py:variant=tiny", f"--workdir={tmp_path}"))
  info = json.load(open(tmp_path / "model_info.json"))
  # An independent count: the sizes of the arrays a real init allocates.
  params = model_lib.init_params(presets.get("tiny"), jax.random.key(0))
  allocated = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert info["params_total"] == info["params_in_shape_only_init"] == allocated
  assert 0 < info["params_activated"] < info["params_total"]
  assert info["smoke_logits_finite"] and info["smoke_logits_shape"] == [2, 8, 256]
  line = proc.stdout.splitlines()[0]
  assert line.startswith(f"tiny: {allocated / 1e9:.2f}B parameters (")
  assert "logits [2, 8, 256], finite=True" in proc.stdout


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("main_pipeline")
  proc = _ok(run_main(f"--config={TEST_CONFIG}", f"--workdir={workdir}"))
  return workdir, proc


def test_pipeline_writes_summary_and_plot(pipeline_run):
  workdir, proc = pipeline_run
  summary = json.load(open(workdir / "summary.json"))
  for key in ("accuracy_before_grpo", "accuracy_after_grpo", "accuracy_sft_control"):
    assert 0.0 <= summary[key] <= 1.0, key
  assert summary["wall_time_s"] > 0
  assert summary["grpo_time_s"] == pytest.approx(sum(summary["grpo_time_split_s"].values()))
  stages = stages_lib.load_results(str(workdir))
  assert summary["accuracy_before_grpo"] == stages["eval_sft"]["pass@1"]
  assert summary["accuracy_after_grpo"] == stages["eval_grpo"]["pass@1"]
  assert summary["accuracy_sft_control"] == stages["eval_sft_control"]["pass@1"]
  assert stages["sft"]["steps"] == 4 and stages["grpo"]["steps"] == 2
  assert stages["sft_control"]["steps"] >= 1
  assert json.loads(proc.stdout[proc.stdout.index("{"):]) == summary  # printed at the end
  with open(workdir / "pipeline.png", "rb") as f:
    assert f.read(8) == PNG_MAGIC
  for stage, n in (("sft", 4), ("grpo", 2)):
    with open(workdir / stage / "metrics.jsonl") as f:
      assert [json.loads(line)["step"] for line in f] == list(range(1, n + 1))


def test_eval_mode_reloads_the_latest_grpo_checkpoint(pipeline_run):
  workdir, _ = pipeline_run
  proc = _ok(run_main(f"--config={TEST_CONFIG}:mode=eval", f"--workdir={workdir}"))
  assert f"loaded grpo checkpoint at step 2 from {workdir}/grpo" in proc.stdout
  result = json.load(open(workdir / "eval" / "summary.json"))
  # Greedy decoding of the same parameters on the same problems: the pipeline's own
  # after-GRPO evaluation, figure for figure.
  expected = stages_lib.load_results(str(workdir))["eval_grpo"]
  assert {k: result[k] for k in expected} == expected


def test_bad_config_field_stops_before_training(tmp_path):
  proc = run_main(f"--config={TEST_CONFIG}", "--config.grpo.G=1", f"--workdir={tmp_path}")
  assert proc.returncode != 0
  assert "grpo config field 'G' must be >= 2" in proc.stderr
  assert not os.path.exists(tmp_path / "sft"), "the cold start ran before the config check"


@pytest.mark.parametrize("mode,override,message", [
    ("pipeline", "eval.num_problems=-3", "eval config field 'num_problems' must be >= 1"),
    ("pipeline", "eval.num_problems=500", "config field 'eval.num_problems': asked for 500"),
    ("pipeline", "sft.steps=-1", "sft config field 'steps' must be >= 1"),
    ("sft", "sft.batch_size=0", "sft config field 'batch_size' must be >= 1"),
    ("grpo", "grpo.top_p=1.5", "grpo config field 'top_p' must lie in (0, 1]"),
    ("sft", "model.moe_impl=pallas", "config field 'model.moe_impl' is 'pallas', which cannot run"),
    ("pipeline", "sft.seq_len=20", "config field 'sft.seq_len' (20) is shorter than the "
                                   "cold-start"),
    ("grpo", "grpo.optimizer.lr=-1.0", "grpo.optimizer config field 'lr' must be >= 0"),
    ("eval", "eval.k=0", "eval config field 'k' must be >= 1"),
    ("pipeline", "sft.seq_len=100", "'sft.seq_len' (100) exceeds model.max_position_embeddings"),
    ("pipeline", "grpo.bogus_field=1", "unknown config field 'grpo.bogus_field'; known fields of "
                                       "grpo: G, adv_scale, beta"),
    ("sft", "task.kwargs.digits=3", "unknown config field 'task.kwargs.digits'; known fields of "
                                    "task.kwargs: ops, pretrain_tag_rate"),
])
def test_a_bad_field_stops_every_mode_at_start_up_naming_it(tmp_path, mode, override, message):
  proc = run_main(f"--config={TEST_CONFIG}:mode={mode}", f"--config.{override}",
                  f"--workdir={tmp_path}")
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert os.listdir(tmp_path) == [], "a stage started before the config check"


def test_sft_then_grpo_modes_write_their_curves(tmp_path):
  """`sft` then `grpo` in one workdir: GRPO starts from the SFT checkpoint, each stage ends
  with its curves.png."""
  _ok(run_main(f"--config={TEST_CONFIG}:mode=sft", f"--workdir={tmp_path}"))
  assert open(tmp_path / "sft" / "curves.png", "rb").read(8) == PNG_MAGIC
  proc = _ok(run_main(f"--config={TEST_CONFIG}:mode=grpo", f"--workdir={tmp_path}"))
  assert "loaded sft checkpoint" in proc.stdout
  assert open(tmp_path / "grpo" / "curves.png", "rb").read(8) == PNG_MAGIC


@pytest.mark.parametrize("field,replacement", [
    ("model.router_bias_update_rate", "sft.optimizer.router_bias_update_rate"),
    ("grpo.router_bias_update_rate", "grpo.optimizer.router_bias_update_rate"),
    ("eval.seed", "HELDOUT_SEED"),
    ("sft.log_every", "SFT logs every step"),
])
def test_a_removed_field_says_what_replaced_it(tmp_path, field, replacement):
  proc = run_main(f"--config={TEST_CONFIG}", f"--config.{field}=1", f"--workdir={tmp_path}")
  assert proc.returncode != 0
  assert f"config field '{field}' was removed" in proc.stderr and replacement in proc.stderr
  assert os.listdir(tmp_path) == []


def test_print_config_needs_no_workdir():
  proc = _ok(run_main(f"--config={TEST_CONFIG}", "--config.mode=print_config",
                      "--config.mesh.data=2"))
  assert "mesh.data = 2" in proc.stdout and "# group size: completions per prompt" in proc.stdout


def test_unknown_mode_and_missing_workdir_are_usage_errors(tmp_path):
  proc = run_main(f"--config={TEST_CONFIG}:mode=pipeline")
  assert proc.returncode != 0 and "mode 'pipeline' needs --workdir" in proc.stderr
  proc = run_main(f"--config={TEST_CONFIG}:mode=train", f"--workdir={tmp_path}")
  assert proc.returncode != 0 and "config field 'mode' is 'train'" in proc.stderr
  assert os.listdir(tmp_path) == []


def test_malformed_jsonl_line_stops_at_start_up(tmp_path):
  good = {"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}
  path = tmp_path / "gsm8k.jsonl"
  path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + '{"question": "oops"\n')
  workdir = tmp_path / "run"
  proc = run_main(f"--config={TEST_CONFIG}:gsm8k={path}", f"--workdir={workdir}")
  assert proc.returncode != 0
  assert f"{path}:3: invalid JSON" in proc.stderr
  assert not os.path.exists(workdir / "sft")


def test_main_makes_one_host_device_per_core_unless_xla_flags_name_a_count():
  code = "import r1jax.main, jax; print(jax.device_count())"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  run = lambda e: subprocess.run([sys.executable, "-c", code], cwd=REPO, env=e,
                                 capture_output=True, text=True, timeout=120)
  out = _ok(run(env)).stdout.split()[-1]
  assert int(out) == os.cpu_count()
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=3"
  assert int(_ok(run(env)).stdout.split()[-1]) == 3

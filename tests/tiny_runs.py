"""Short GRPO and SFT runs of configs/test_tiny.py, in the test process or as a script to kill.

The resume tests compare a run killed mid-way and resumed with an uninterrupted one, so both
must be built by the same code: `run_grpo` / `run_sft` here. Run as a script,

  python tests/tiny_runs.py grpo|sft|pipeline WORKDIR [pause_after_step]

it does the same run in a fresh process (`pipeline`: pipeline.run of the default test
config); after writing the metrics line of `pause_after_step` (for `pipeline`, of its GRPO
stage) it sleeps instead of continuing, so a test can SIGKILL it at a known point
past a checkpoint (a kill at an unknown point could land after the last checkpoint and then
resume nothing).
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_PATH = os.path.join(REPO, "configs", "test_tiny.py")
# Timing figures differ between any two runs; every other metric must match exactly.
TIMING_MARKERS = ("time", "per_s", "elapsed")


def is_timing_key(key: str) -> bool:
  """Wall-clock metrics: names with time / per_s / elapsed, or seconds totals (`*_s`)."""
  return any(m in key for m in TIMING_MARKERS) or key.endswith("_s")


def load_config(arg: str | None = None):
  """get_config(arg) of configs/test_tiny.py (configs/ is not a package)."""
  spec = importlib.util.spec_from_file_location("test_tiny_config", CONFIG_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def resume_config():
  """4 GRPO steps and 4 SFT steps, each checkpointed every 2 steps."""
  cfg = load_config()
  cfg.grpo.steps, cfg.grpo.checkpoint_every = 4, 2
  cfg.sft.steps, cfg.sft.checkpoint_every = 4, 2
  return cfg


def run_grpo(workdir: str, cfg=None, **kwargs):
  """rl.train from the config's random init; returns (params, info)."""
  import jax
  from r1jax.model import decoder as model_lib
  from r1jax.run import experiment
  from r1jax.train import rl
  cfg = cfg if cfg is not None else resume_config()
  task, tokenizer, model_cfg = experiment.build(cfg)
  params = model_lib.init_params(model_cfg, jax.random.key(cfg.seed))
  return rl.train(model_cfg, cfg.grpo, workdir, task=task, tokenizer=tokenizer, params=params,
                  task_name=cfg.task.name, task_kwargs=cfg.task.kwargs.to_dict(),
                  seed=cfg.seed, progress=False, **kwargs)


def run_sft(workdir: str, cfg=None, **kwargs):
  """sft.train on the config's cold-start traces from its random init; returns (params, info)."""
  import jax
  from r1jax.model import decoder as model_lib
  from r1jax.run import experiment
  from r1jax.train import sft
  cfg = cfg if cfg is not None else resume_config()
  task, tokenizer, model_cfg = experiment.build(cfg)
  traces = experiment.trace_task(cfg).examples("train", cfg.sft.num_traces, seed=cfg.seed)
  params = model_lib.init_params(model_cfg, jax.random.key(cfg.seed))
  return sft.train(model_cfg, cfg.sft, workdir, task=task, tokenizer=tokenizer, params=params,
                   examples=traces, seed=cfg.seed, progress=False, **kwargs)


def leaves(tree) -> dict:
  """{path string: numpy array} of a pytree."""
  import jax
  import numpy as np
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _wait_for_pause(proc, run_dir, step, checkpoint, timeout_s):
  """Blocks until `run_dir` holds the metrics line of `step` and finalised `checkpoint`."""
  from r1jax.train import metrics as metrics_lib
  deadline = time.time() + timeout_s
  ckpt = os.path.join(run_dir, "checkpoints", str(checkpoint))
  while time.time() < deadline:
    if proc.poll() is not None:
      _, err = proc.communicate()
      raise AssertionError(f"the run exited with {proc.returncode} before the kill point:\n"
                           f"{err[-3000:]}")
    # Orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it when complete.
    pending = [n for n in os.listdir(os.path.dirname(ckpt)) if n.startswith(f"{checkpoint}.")] \
        if os.path.isdir(os.path.dirname(ckpt)) else []
    if (os.path.isdir(ckpt) and not pending
        and any(r["step"] == step for r in metrics_lib.read_metrics(run_dir))):
      return
    time.sleep(0.05)
  raise AssertionError(f"no metrics of step {step} and checkpoint {checkpoint} in {run_dir} "
                       f"after {timeout_s} s")


def run_pipeline(workdir: str):
  """pipeline.run of the default test config; returns its summary."""
  from r1jax.run import pipeline
  return pipeline.run(load_config(), workdir)


def run_killed_then_resumed(kind: str, workdir, timeout_s: float = 300.0, step: int = 3):
  """Runs `kind` ('grpo' | 'sft' | 'pipeline') as a process, SIGKILLs it once (GRPO's, for
  'pipeline') step `step` is logged and checkpoint step - 1 is on disk, then resumes it in
  this process to the end; returns (params, info), for 'pipeline' the summary.
  """
  from r1jax.train import checkpoint as ckpt_lib
  from r1jax.train import metrics as metrics_lib
  workdir = str(workdir)
  run_dir = os.path.join(workdir, "grpo" if kind == "pipeline" else kind)
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), kind, workdir, str(step)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_pause(proc, run_dir, step=step, checkpoint=step - 1, timeout_s=timeout_s)
  finally:
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
    proc.communicate()
  assert proc.returncode == -signal.SIGKILL, proc.returncode
  with ckpt_lib.CheckpointManager(run_dir) as m:
    assert m.latest_step() == step - 1, f"the kill must land after checkpoint {step - 1}: " \
                                        f"{m.all_steps()}"
  assert max(r["step"] for r in metrics_lib.read_metrics(run_dir)) == step
  return {"grpo": run_grpo, "sft": run_sft, "pipeline": run_pipeline}[kind](workdir)


def assert_same_run(kind: str, dir_a, params_a, dir_b, params_b) -> None:
  """Bitwise-equal parameters; metrics rows equal in every key but the timing ones."""
  import numpy as np
  from r1jax.train import metrics as metrics_lib
  a, b = leaves(params_a), leaves(params_b)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), f"{k} differs after resume"
  rows_a = metrics_lib.read_metrics(os.path.join(dir_a, kind))
  rows_b = metrics_lib.read_metrics(os.path.join(dir_b, kind))
  assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
  for ra, rb in zip(rows_a, rows_b):
    assert ra.keys() == rb.keys()
    keep = [k for k in ra if not is_timing_key(k)]
    assert {k: ra[k] for k in keep} == {k: rb[k] for k in keep}, f"step {ra['step']}"


def _pause_after(step: int, stage: str | None = None) -> None:
  """Makes every MetricsWriter (of run dir `stage`, if given) sleep right after writing the
  line of `step`."""
  from r1jax.train import metrics as metrics_lib
  write = metrics_lib.MetricsWriter.write

  def write_then_pause(self, s, metrics):
    out = write(self, s, metrics)
    if s == step and stage in (None, os.path.basename(self.workdir)):
      print(f"paused after step {s}", flush=True)
      time.sleep(3600)
    return out

  metrics_lib.MetricsWriter.write = write_then_pause


def main(argv) -> None:
  kind, workdir = argv[1], argv[2]
  if kind not in ("grpo", "sft", "pipeline"):
    raise ValueError(f"kind must be 'grpo', 'sft' or 'pipeline', got {kind!r}")
  # The same device setup as tests/conftest.py, so compiled programs (and numbers) match.
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, REPO)
  import jax
  jax.config.update("jax_compilation_cache_dir", os.path.join(REPO, ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  if len(argv) > 3:
    _pause_after(int(argv[3]), "grpo" if kind == "pipeline" else None)
  {"grpo": run_grpo, "sft": run_sft, "pipeline": run_pipeline}[kind](workdir)


if __name__ == "__main__":
  main(sys.argv)

"""Short GRPO and SFT runs of configs/test_tiny.py, in the test process or as a script to kill.

The resume tests compare a run killed mid-way and resumed with an uninterrupted one, so both
must be built by the same code: `run_grpo` / `run_sft` here. Run as a script,

  python tests/tiny_runs.py grpo|sft WORKDIR [pause_after_step]

it does the same run in a fresh process; after writing the metrics line of
`pause_after_step` it sleeps instead of continuing, so a test can SIGKILL it at a known point
past a checkpoint (a kill at an unknown point could land after the last checkpoint and then
resume nothing).
"""
from __future__ import annotations

import importlib.util
import os
import sys

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
  from r1jax import model as model_lib
  from r1jax import pipeline, rl
  cfg = cfg if cfg is not None else resume_config()
  task, tokenizer, model_cfg = pipeline.build(cfg)
  params = model_lib.init_params(model_cfg, jax.random.key(cfg.seed))
  return rl.train(model_cfg, cfg.grpo, workdir, task=task, tokenizer=tokenizer, params=params,
                  task_name=cfg.task.name, task_kwargs=cfg.task.kwargs.to_dict(),
                  seed=cfg.seed, progress=False, **kwargs)


def run_sft(workdir: str, cfg=None, **kwargs):
  """sft.train on the config's cold-start traces from its random init; returns (params, info)."""
  import jax
  from r1jax import model as model_lib
  from r1jax import pipeline, sft
  cfg = cfg if cfg is not None else resume_config()
  task, tokenizer, model_cfg = pipeline.build(cfg)
  traces = pipeline.trace_task(cfg).examples("train", cfg.sft.num_traces, seed=cfg.seed)
  params = model_lib.init_params(model_cfg, jax.random.key(cfg.seed))
  return sft.train(model_cfg, cfg.sft, workdir, task=task, tokenizer=tokenizer, params=params,
                   examples=traces, seed=cfg.seed, progress=False, **kwargs)


def _pause_after(step: int) -> None:
  """Makes every MetricsWriter sleep right after writing the line of `step`."""
  import time
  from r1jax import metrics as metrics_lib
  write = metrics_lib.MetricsWriter.write

  def write_then_pause(self, s, metrics):
    out = write(self, s, metrics)
    if s == step:
      print(f"paused after step {s}", flush=True)
      time.sleep(3600)
    return out

  metrics_lib.MetricsWriter.write = write_then_pause


def main(argv) -> None:
  kind, workdir = argv[1], argv[2]
  if kind not in ("grpo", "sft"):
    raise ValueError(f"kind must be 'grpo' or 'sft', got {kind!r}")
  # The same device setup as tests/conftest.py, so compiled programs (and numbers) match.
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, REPO)
  import jax
  jax.config.update("jax_compilation_cache_dir", os.path.join(REPO, ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  if len(argv) > 3:
    _pause_after(int(argv[3]))
  (run_grpo if kind == "grpo" else run_sft)(workdir)


if __name__ == "__main__":
  main(sys.argv)

"""Timing helpers the benchmarks share: one blocked call, the median of repeats, the
machine's fp32 matmul ceiling, and the model an experiment config trains.

Every timed call blocks on its outputs (`jax.block_until_ready`), so asynchronous dispatch
never makes a program look faster than it runs.
"""
from __future__ import annotations

import importlib.util
import time

import jax
import jax.numpy as jnp
import numpy as np


def seconds(fn, *args) -> float:
  """Wall seconds of one call of fn(*args), outputs included."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def median_seconds(fn, *args, repeats: int) -> float:
  """Median wall seconds of `repeats` calls after one untimed call (compile, warm-up)."""
  jax.block_until_ready(fn(*args))
  return float(np.median([seconds(fn, *args) for _ in range(repeats)]))


def matmul_ceiling(n: int = 1024, repeats: int = 5) -> float:
  """fp32 FLOP/s of a jitted n x n matmul on this machine, best of repeats (a ceiling)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  jax.block_until_ready(f(a, b))
  return 2 * n ** 3 / min(seconds(f, a, b) for _ in range(repeats))


def experiment_model(path: str):
  """The model config an experiment config file trains (`experiment.build`: its tokenizer's
  vocabulary, 'auto' resolved), without MTP."""
  spec = importlib.util.spec_from_file_location("bench_experiment_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  from r1jax.run import experiment
  cfg = experiment.build(module.get_config())[2]
  cfg.mtp_depth = 0
  return cfg

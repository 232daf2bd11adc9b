"""moe_impl='pallas': the expert matmuls as Pallas grouped-matmul kernels (pallas_kernels.gmm).

Same sort as 'ragged' (moe._sort_by_expert): the X = T*K assignments in expert order,
dropped ones (expert index E, another shard's experts) last. The gathered rows run
through `layers.swiglu` with gmm as both matmuls, and each output row, times its gate
weight, is added back to its token. gmm writes zeros for rows past sum(group_sizes), so
dropped assignments contribute nothing, and its custom_vjp gives the gradients (d rows by
gmm against the transposed weights, d weights by tgmm).

Which kernel runs is decided when the step is lowered, for the platform it is compiled
for (`jax.lax.platform_dependent`), not from jax.default_backend(): a TPU topology
compiled from a CPU host gets the Mosaic kernel. cfg.pallas_backend:
  'auto'  TPU -> Mosaic, GPU -> Triton, anything else (CPU) -> the TPU kernel interpreted;
  'tpu' / 'gpu'  that kernel, compiled on its own platform, interpreted on any other.
cfg.pallas_tile_m / _k / _n override the tiles (0: `pallas_kernels.default_tiling` for the
backend and compute dtype, shrunk to small dims by gmm).

A Mosaic kernel cannot be partitioned by XLA: on a multi-device mesh run this dispatch
inside shard_map (the expert_parallel exchanges do), or compile for one device.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import pallas_kernels
from r1jax.model import moe
from r1jax.model.layers import swiglu

PALLAS_BACKENDS = ("auto", "tpu", "gpu")
_COMPILED_ON = {"tpu": ("tpu",), "gpu": ("cuda", "rocm")}  # lowering platform names


def tiling(cfg, backend: str, dtype) -> pallas_kernels.Tiling:
  """The config's tiles for `backend`: each 0 field takes default_tiling's value."""
  base = pallas_kernels.default_tiling(backend, jnp.dtype(dtype))
  return pallas_kernels.Tiling(cfg.pallas_tile_m or base.tm, cfg.pallas_tile_k or base.tk,
                               cfg.pallas_tile_n or base.tn)


def grouped_matmul(lhs, rhs, group_sizes, cfg):
  """gmm with the kernel chosen at lowering time for the compiled platform (see above)."""
  def run(backend, interpret, lhs, rhs):
    return pallas_kernels.gmm(lhs, rhs, group_sizes, backend=backend, interpret=interpret,
                              tiling=tiling(cfg, backend, lhs.dtype))
  if cfg.pallas_backend not in PALLAS_BACKENDS:
    raise ValueError(f"model config field 'pallas_backend' must be one of {PALLAS_BACKENDS}, "
                     f"got {cfg.pallas_backend!r}")
  compiled = ("tpu", "gpu") if cfg.pallas_backend == "auto" else (cfg.pallas_backend,)
  branches = {platform: functools.partial(run, backend, False)
              for backend in compiled for platform in _COMPILED_ON[backend]}
  interpreted = "tpu" if cfg.pallas_backend == "auto" else cfg.pallas_backend
  return jax.lax.platform_dependent(lhs, rhs, default=functools.partial(run, interpreted, True),
                                    **branches)


@moe.register_dispatch("pallas")
def pallas_dispatch(experts: dict, x_TxD, idx_TxK, weights_TxK, cfg):
  """Sort assignments by expert, SwiGLU through Pallas grouped matmuls, scatter-add back."""
  _, token_X, w_X, _, sizes_E = moe._sort_by_expert(idx_TxK, weights_TxK, x_TxD.dtype,
                                                     moe._num_experts(experts))
  grouped = lambda a, w: grouped_matmul(a, w, sizes_E, cfg)
  y_XxD = swiglu(x_TxD[token_X], experts, matmul=grouped)  # dropped rows (last): zeros
  return jnp.zeros_like(x_TxD).at[token_X].add(y_XxD * w_X[:, None])

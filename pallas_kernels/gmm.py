"""Grouped matrix multiply over expert-sorted rows, its weight gradient, and references.

    gmm(lhs[m, k], rhs[E, k, n], group_sizes[E]) -> [m, n]
        rows [off[e], off[e+1]) of lhs multiply rhs[e]; rows past sum(group_sizes) -> 0
    tgmm(lhs[m, k], grad[m, n], group_sizes[E]) -> [E, k, n]
        out[e] = lhs[rows of e]^T @ grad[rows of e]; an empty group -> zeros

This is what lax.ragged_dot computes (and its rhs gradient), written as Pallas kernels
for TPU (Mosaic) and GPU (Triton). `gmm` is a custom_vjp: d lhs is gmm against the
transposed weights (read transposed in the kernel, never copied) and d rhs is tgmm.
Every tile product accumulates in float32 (bf16 inputs included); the output has
`preferred_element_type` (default: lhs.dtype, as in ragged_dot). Shapes that are not whole tiles are padded
with zeros and the padding is sliced off, so any m, k, n work.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.backends import BACKENDS, Tiling, default_tiling, fit_tiling
from pallas_kernels.gmm_gpu import gmm_gpu, tgmm_gpu
from pallas_kernels.gmm_tpu import gmm_tpu, tgmm_tpu
from pallas_kernels.group_metadata import make_group_metadata
from pallas_kernels.jax_compat import match_varying


def _group_of_rows(group_sizes, m):
  """Group index of each of m rows; E for rows past sum(group_sizes)."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right")


def reference_gmm(lhs, rhs, group_sizes, preferred_element_type=None):
  """Pure-jnp gmm: every row through every expert, then keep its own (O(m E k n))."""
  out_dtype = preferred_element_type or lhs.dtype
  one_hot_MxE = jax.nn.one_hot(_group_of_rows(group_sizes, lhs.shape[0]), rhs.shape[0],
                               dtype=jnp.float32)
  all_ExMxN = jnp.einsum("mk,ekn->emn", lhs, rhs, preferred_element_type=jnp.float32,
                         precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("me,emn->mn", one_hot_MxE, all_ExMxN,
                    precision=jax.lax.Precision.HIGHEST).astype(out_dtype)


def reference_tgmm(lhs, grad, group_sizes, preferred_element_type=None):
  """Pure-jnp tgmm: out[e] = sum over rows r of group e of outer(lhs[r], grad[r])."""
  out_dtype = preferred_element_type or lhs.dtype
  one_hot_MxE = jax.nn.one_hot(_group_of_rows(group_sizes, lhs.shape[0]),
                               group_sizes.shape[0], dtype=jnp.float32)
  return jnp.einsum("me,mk,mn->ekn", one_hot_MxE, lhs.astype(jnp.float32),
                    grad.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST).astype(out_dtype)


def _round_up(x, m):
  return -(-x // m) * m


def _pad_to(x, shape):
  pads = [(0, s - d) for d, s in zip(x.shape, shape)]
  return jnp.pad(x, pads) if any(p for _, p in pads) else x


def _check(lhs, other, group_sizes, backend, what):
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if lhs.ndim != 2:
    raise ValueError(f"lhs must be [m, k], got shape {lhs.shape}")
  if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"group_sizes must be a 1-D integer array, got {group_sizes.dtype}"
                     f"{group_sizes.shape}")
  if lhs.dtype != other.dtype:
    raise ValueError(f"lhs and {what} must share a dtype, got {lhs.dtype} and {other.dtype}")


def _gmm_fwd_impl(lhs, rhs, group_sizes, out_dtype, tiling, backend, interpret,
                  transpose_rhs):
  m, k = lhs.shape
  num_experts = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if m == 0:  # e.g. a shard that received no tokens: no kernel to launch
    return jnp.zeros((0, n), out_dtype)
  t = fit_tiling(tiling or default_tiling(backend, lhs.dtype), m, k, n, backend,
                 lhs.dtype)
  m_pad, k_pad, n_pad = _round_up(m, t.tm), _round_up(k, t.tk), _round_up(n, t.tn)
  lhs_p = _pad_to(lhs, (m_pad, k_pad))
  rhs_p = _pad_to(rhs, (num_experts, n_pad, k_pad) if transpose_rhs
                  else (num_experts, k_pad, n_pad))
  meta = make_group_metadata(group_sizes, m_pad, t.tm, with_tail=True,
                             visit_empty_groups=False)
  kernel = gmm_tpu if backend == "tpu" else gmm_gpu
  out = kernel(lhs_p, rhs_p, meta, num_experts=num_experts, tiling=t, out_dtype=out_dtype,
               transpose_rhs=transpose_rhs, interpret=interpret)
  return out[:m, :n]


def _tgmm_impl(lhs, grad, group_sizes, out_dtype, tiling, backend, interpret):
  m, k = lhs.shape
  n = grad.shape[1]
  num_experts = group_sizes.shape[0]
  if m == 0:
    return jnp.zeros((num_experts, k, n), out_dtype)
  # tgmm reduces over rows: tm is its reduction step, (tk, tn) its output block.
  t = fit_tiling(tiling or default_tiling(backend, lhs.dtype), m, k, n, backend,
                 lhs.dtype)
  m_pad, k_pad, n_pad = _round_up(m, t.tm), _round_up(k, t.tk), _round_up(n, t.tn)
  meta = make_group_metadata(group_sizes, m_pad, t.tm, with_tail=False,
                             visit_empty_groups=True)
  kernel = tgmm_tpu if backend == "tpu" else tgmm_gpu
  out = kernel(_pad_to(lhs, (m_pad, k_pad)), _pad_to(grad, (m_pad, n_pad)), meta,
               num_experts=num_experts, tiling=t, out_dtype=out_dtype, interpret=interpret)
  return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _gmm(lhs, rhs, group_sizes, out_dtype, tiling, backend, interpret, transpose_rhs):
  return _gmm_fwd_impl(lhs, rhs, group_sizes, out_dtype, tiling, backend, interpret,
                       transpose_rhs)


def _gmm_fwd(lhs, rhs, group_sizes, out_dtype, tiling, backend, interpret, transpose_rhs):
  out = _gmm_fwd_impl(lhs, rhs, group_sizes, out_dtype, tiling, backend, interpret,
                      transpose_rhs)
  return out, (lhs, rhs, group_sizes)


def _gmm_bwd(out_dtype, tiling, backend, interpret, transpose_rhs, res, dout):
  lhs, rhs, group_sizes = res
  # The gradient matmuls run in the input dtype (f32 accumulation), like the forward.
  dout = dout.astype(lhs.dtype)
  dlhs = _gmm_fwd_impl(dout, rhs, group_sizes, lhs.dtype, tiling, backend, interpret,
                       not transpose_rhs)
  if transpose_rhs:  # rhs is [E, n, k]: its gradient is grad^T lhs per group.
    drhs = _tgmm_impl(dout, lhs, group_sizes, rhs.dtype, tiling, backend, interpret)
  else:
    drhs = _tgmm_impl(lhs, dout, group_sizes, rhs.dtype, tiling, backend, interpret)
  return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _dtype_or_none(dtype):
  return None if dtype is None else np.dtype(dtype)


def gmm(lhs, rhs, group_sizes, *, preferred_element_type=None, tiling: Tiling | None = None,
        backend: str = "tpu", interpret=False, transpose_rhs: bool = False):
  """Grouped matmul, differentiable in lhs and rhs.

  lhs [m, k] rows sorted by group; rhs [E, k, n] ([E, n, k] with transpose_rhs);
  group_sizes [E] int. backend: 'tpu' (Mosaic) or 'gpu' (Triton), see backend_for;
  interpret=True runs either kernel through the Pallas interpreter (the only way on
  CPU); for the TPU kernel a pltpu.InterpretParams selects the stricter TPU
  interpreter (poisoned uninitialised VMEM, race checks). tiling=None takes
  default_tiling(backend, lhs.dtype), shrunk for small shapes.
  """
  _check(lhs, rhs, group_sizes, backend, "rhs")
  if rhs.ndim != 3 or rhs.shape[2 if transpose_rhs else 1] != lhs.shape[1]:
    raise ValueError(f"rhs {rhs.shape} does not contract with lhs {lhs.shape} "
                     f"(transpose_rhs={transpose_rhs})")
  if rhs.shape[0] != group_sizes.shape[0]:
    raise ValueError(f"rhs has {rhs.shape[0]} groups, group_sizes {group_sizes.shape[0]}")
  out_dtype = _dtype_or_none(preferred_element_type) or np.dtype(lhs.dtype)
  lhs, rhs, group_sizes = match_varying(lhs, rhs, group_sizes.astype(jnp.int32))
  return _gmm(lhs, rhs, group_sizes, out_dtype, tiling, backend, interpret,
              bool(transpose_rhs))


def tgmm(lhs, grad, group_sizes, *, preferred_element_type=None,
         tiling: Tiling | None = None, backend: str = "tpu", interpret=False):
  """Per-group lhs^T @ grad: the weight gradient of gmm, [E, k, n]. Not differentiable."""
  _check(lhs, grad, group_sizes, backend, "grad")
  if grad.ndim != 2 or grad.shape[0] != lhs.shape[0]:
    raise ValueError(f"grad must be [m, n] with m={lhs.shape[0]}, got {grad.shape}")
  out_dtype = _dtype_or_none(preferred_element_type) or np.dtype(lhs.dtype)
  return _tgmm_impl(lhs, grad, group_sizes.astype(jnp.int32), out_dtype, tiling, backend,
                    interpret)

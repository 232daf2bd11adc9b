"""Pallas Triton (GPU) kernels for the grouped matmul (gmm) and its weight gradient (tgmm).

Same work list as the TPU kernels (group_metadata), but Triton programs run in any
order, so nothing may rely on an output block staying resident between grid steps:

gmm grid (work items, n blocks): each program loops over k and stores its (tm, tn)
tile with a row mask. Two items on one row tile belong to different groups and write
disjoint rows, so their masked stores never overlap.

tgmm grid (k blocks, n blocks): each program walks the whole work list in order,
summing masked lhs_tile^T @ grad_tile into a register accumulator and storing it with a
mask that is true only on the last item of a group (branch-free), then resetting it.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.backends import Tiling
from pallas_kernels.group_metadata import GroupMetadata
from pallas_kernels.jax_compat import out_struct


def _scalar(ref, i):
  return ref[i]


def _row_mask(offsets_ref, group, tile, tm):
  rows = tile * tm + jnp.arange(tm, dtype=jnp.int32)[:, None]
  return (rows >= _scalar(offsets_ref, group)) & (rows < _scalar(offsets_ref, group + 1))


@functools.partial(jax.jit, static_argnames=("num_experts", "tiling", "out_dtype",
                                             "transpose_rhs", "interpret", "num_warps",
                                             "num_stages"))
def gmm_gpu(lhs, rhs, meta: GroupMetadata, *, num_experts: int, tiling: Tiling,
            out_dtype, transpose_rhs: bool = False, interpret=False,
            num_warps: int = 4, num_stages: int = 3):
  """lhs [m_pad, k_pad] x rhs [E, k_pad, n_pad] (or [E, n_pad, k_pad]) -> [m_pad, n_pad].

  `meta` must come from make_group_metadata(with_tail=True).
  """
  tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  num_items = meta.group_ids.shape[0]

  def kernel(offsets_ref, group_ids_ref, tile_ids_ref, num_items_ref,
             lhs_ref, rhs_ref, out_ref):
    item, n_i = pl.program_id(0), pl.program_id(1)

    @pl.when(item < _scalar(num_items_ref, 0))
    def _run():
      group = _scalar(group_ids_ref, item)
      tile = _scalar(tile_ids_ref, item)
      expert = jnp.minimum(group, num_experts - 1)
      rows = pl.ds(pl.multiple_of(tile * tm, tm), tm)
      cols = pl.ds(pl.multiple_of(n_i * tn, tn), tn)

      def body(k_i, acc):
        ks = pl.ds(pl.multiple_of(k_i * tk, tk), tk)
        x = lhs_ref[rows, ks]
        if transpose_rhs:
          w = rhs_ref[expert, cols, ks]
          return acc + plgpu.dot(x, w, trans_b=True)
        w = rhs_ref[expert, ks, cols]
        return acc + plgpu.dot(x, w)

      # The zero tail group (group == num_experts) runs no k steps.
      steps = jnp.where(group < num_experts, k // tk, 0)
      acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((tm, tn), jnp.float32))
      mask = _row_mask(offsets_ref, group, tile, tm)
      plgpu.store(out_ref.at[rows, cols], acc.astype(out_ref.dtype),
                  mask=jnp.broadcast_to(mask, (tm, tn)))

  return pl.pallas_call(
      kernel,
      out_shape=out_struct((m, n), out_dtype, lhs, rhs, *meta),
      grid=(num_items, n // tn),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="gmm_gpu",
  )(*meta, lhs, rhs)


@functools.partial(jax.jit, static_argnames=("num_experts", "tiling", "out_dtype",
                                             "interpret", "num_warps", "num_stages"))
def tgmm_gpu(lhs, grad, meta: GroupMetadata, *, num_experts: int, tiling: Tiling,
             out_dtype, interpret=False, num_warps: int = 4, num_stages: int = 3):
  """lhs [m_pad, k_pad], grad [m_pad, n_pad] -> [E, k_pad, n_pad], out[e] = lhs_e^T grad_e.

  `meta` must come from make_group_metadata(with_tail=False, visit_empty_groups=True).
  """
  tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
  m, k = lhs.shape
  n = grad.shape[1]
  num_items_static = meta.group_ids.shape[0]

  def kernel(offsets_ref, group_ids_ref, tile_ids_ref, num_items_ref,
             lhs_ref, grad_ref, out_ref):
    k_i, n_i = pl.program_id(0), pl.program_id(1)
    ks = pl.ds(pl.multiple_of(k_i * tk, tk), tk)
    cols = pl.ds(pl.multiple_of(n_i * tn, tn), tn)
    num_items = _scalar(num_items_ref, 0)

    def body(item, acc):
      group = _scalar(group_ids_ref, item)
      tile = _scalar(tile_ids_ref, item)
      next_group = _scalar(group_ids_ref, jnp.minimum(item + 1, num_items_static - 1))
      rows = pl.ds(pl.multiple_of(tile * tm, tm), tm)
      mask = _row_mask(offsets_ref, group, tile, tm)
      x = plgpu.load(lhs_ref.at[rows, ks], mask=jnp.broadcast_to(mask, (tm, tk)), other=0)
      g = grad_ref[rows, cols]
      acc = acc + plgpu.dot(x, g, trans_a=True)
      last = (item == num_items - 1) | (group != next_group)
      plgpu.store(out_ref.at[group, ks, cols], acc.astype(out_ref.dtype),
                  mask=jnp.full((tk, tn), last))
      return jnp.where(last, jnp.zeros_like(acc), acc)

    jax.lax.fori_loop(0, num_items, body, jnp.zeros((tk, tn), jnp.float32))

  return pl.pallas_call(
      kernel,
      out_shape=out_struct((num_experts, k, n), out_dtype, lhs, grad, *meta),
      grid=(k // tk, n // tn),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="tgmm_gpu",
  )(*meta, lhs, grad)

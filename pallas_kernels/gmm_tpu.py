"""Mosaic TPU kernels for the grouped matmul (gmm) and its weight gradient (tgmm).

Both take inputs already padded to whole tiles and the work list of group_metadata.
The work list is scalar-prefetched into SMEM, so each BlockSpec index map can look up
the expert and row tile of its grid step before the DMA is issued.

gmm grid (n blocks, work items, k blocks): k is innermost, so an f32 VMEM accumulator
collects one (tm, tn) product; on the last k step the rows of the current group are
written into the output block. Consecutive items on the same row tile keep the output
block resident in VMEM, so the second group's write keeps the first group's rows.

tgmm grid (k blocks, n blocks, work items): items are innermost and sorted by group, so
the (tk, tn) accumulator sums lhs_tile^T @ grad_tile over one group's tiles and is
written when the next item belongs to another group.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.backends import Tiling
from pallas_kernels.group_metadata import GroupMetadata
from pallas_kernels.jax_compat import out_struct


def _row_mask(offsets_ref, group, tile, tm, shape):
  rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  return (rows >= offsets_ref[group]) & (rows < offsets_ref[group + 1])


@functools.partial(jax.jit, static_argnames=("num_experts", "tiling", "out_dtype",
                                             "transpose_rhs", "interpret"))
def gmm_tpu(lhs, rhs, meta: GroupMetadata, *, num_experts: int, tiling: Tiling,
            out_dtype, transpose_rhs: bool = False, interpret=False):
  """lhs [m_pad, k_pad] x rhs [E, k_pad, n_pad] (or [E, n_pad, k_pad]) -> [m_pad, n_pad].

  `meta` must come from make_group_metadata(with_tail=True): its last group is the
  rows past sum(group_sizes), written as zeros without touching rhs.
  """
  tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  num_items = meta.group_ids.shape[0]
  nk = k // tk
  grid = (n // tn, num_items, nk)

  def kernel(offsets_ref, group_ids_ref, tile_ids_ref, num_items_ref,
             lhs_ref, rhs_ref, out_ref, acc_ref):
    n_i, item, k_i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    group = group_ids_ref[item]
    real = item < num_items_ref[0]

    @pl.when(k_i == 0)
    def _zero():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(real & (group < num_experts))
    def _accumulate():
      w = rhs_ref[0]
      dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
      acc_ref[...] += jax.lax.dot_general(lhs_ref[...], w, dims,
                                          preferred_element_type=jnp.float32)

    @pl.when(real & (k_i == nk - 1))
    def _store():
      mask = _row_mask(offsets_ref, group, tile_ids_ref[item], tm, (tm, tn))
      value = jnp.where(group < num_experts, acc_ref[...], 0.0).astype(out_ref.dtype)
      out_ref[...] = jnp.where(mask, value, out_ref[...])

  def lhs_map(n_i, item, k_i, offsets, group_ids, tile_ids, num_items_ref):
    return tile_ids[item], k_i

  def rhs_map(n_i, item, k_i, offsets, group_ids, tile_ids, num_items_ref):
    # The zero tail group has no weights; reuse the last expert's block index.
    e = jnp.minimum(group_ids[item], num_experts - 1)
    return (e, n_i, k_i) if transpose_rhs else (e, k_i, n_i)

  def out_map(n_i, item, k_i, offsets, group_ids, tile_ids, num_items_ref):
    return tile_ids[item], n_i

  rhs_block = (1, tn, tk) if transpose_rhs else (1, tk, tn)
  itemsize = jnp.dtype(lhs.dtype).itemsize
  cost = pl.CostEstimate(
      flops=2 * m * k * n, transcendentals=0,
      bytes_accessed=itemsize * (m * k * (n // tn) + rhs.size) + m * n * jnp.dtype(out_dtype).itemsize)
  return pl.pallas_call(
      kernel,
      out_shape=out_struct((m, n), out_dtype, lhs, rhs, *meta),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=grid,
          in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
          out_specs=pl.BlockSpec((tm, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      cost_estimate=cost,
      interpret=interpret,
      name="gmm_tpu",
  )(*meta, lhs, rhs)


@functools.partial(jax.jit, static_argnames=("num_experts", "tiling", "out_dtype",
                                             "interpret"))
def tgmm_tpu(lhs, grad, meta: GroupMetadata, *, num_experts: int, tiling: Tiling,
             out_dtype, interpret=False):
  """lhs [m_pad, k_pad], grad [m_pad, n_pad] -> [E, k_pad, n_pad], out[e] = lhs_e^T grad_e.

  `meta` must come from make_group_metadata(with_tail=False, visit_empty_groups=True)
  so that every expert, empty ones included, has its block written.
  """
  tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
  m, k = lhs.shape
  n = grad.shape[1]
  num_items = meta.group_ids.shape[0]
  grid = (k // tk, n // tn, num_items)

  def kernel(offsets_ref, group_ids_ref, tile_ids_ref, num_items_ref,
             lhs_ref, grad_ref, out_ref, acc_ref):
    item = pl.program_id(2)
    last_real = num_items_ref[0] - 1
    group = group_ids_ref[item]
    prev_group = group_ids_ref[jnp.maximum(item - 1, 0)]
    next_group = group_ids_ref[jnp.minimum(item + 1, num_items - 1)]
    real = item <= last_real
    first = (item == 0) | (group != prev_group)
    last = (item == last_real) | (group != next_group)

    @pl.when(real & first)
    def _zero():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(real)
    def _accumulate():
      mask = _row_mask(offsets_ref, group, tile_ids_ref[item], tm, (tm, tk))
      x = jnp.where(mask, lhs_ref[...], jnp.zeros((), lhs_ref.dtype))
      acc_ref[...] += jax.lax.dot_general(x, grad_ref[...], (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)

    @pl.when(real & last)
    def _store():
      out_ref[0] = acc_ref[...].astype(out_ref.dtype)

  def lhs_map(k_i, n_i, item, offsets, group_ids, tile_ids, num_items_ref):
    return tile_ids[item], k_i

  def grad_map(k_i, n_i, item, offsets, group_ids, tile_ids, num_items_ref):
    return tile_ids[item], n_i

  def out_map(k_i, n_i, item, offsets, group_ids, tile_ids, num_items_ref):
    return group_ids[item], k_i, n_i

  itemsize = jnp.dtype(lhs.dtype).itemsize
  cost = pl.CostEstimate(
      flops=2 * m * k * n, transcendentals=0,
      bytes_accessed=itemsize * (m * k * (n // tn) + m * n * (k // tk))
      + num_experts * k * n * jnp.dtype(out_dtype).itemsize)
  return pl.pallas_call(
      kernel,
      out_shape=out_struct((num_experts, k, n), out_dtype, lhs, grad, *meta),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=grid,
          in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), grad_map)],
          out_specs=pl.BlockSpec((1, tk, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=cost,
      interpret=interpret,
      name="tgmm_tpu",
  )(*meta, lhs, grad)

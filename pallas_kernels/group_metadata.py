"""Work lists for grouped matmuls: which (group, row tile) each grid step handles.

Rows are sorted by group: group g owns rows [offsets[g], offsets[g+1]). A row tile of
`tm` rows may hold the end of one group and the start of the next, so a tile is visited
once per group it touches and each visit writes (or reads) only that group's rows.
Both the TPU and the GPU kernels walk the same list; its length must be static, so it is
padded to an upper bound and `num_items` says how many entries are real.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp


class GroupMetadata(NamedTuple):
  """Scalar tables the kernels read; all int32.

  offsets:   [G + 1] row where group g starts; offsets[G] is the padded row count.
  group_ids: [N] group of work item i (G - 1 is the zero tail group when `with_tail`).
  tile_ids:  [N] row tile of work item i.
  num_items: [1] how many of the N items are real; the rest copy the last real one.
  """
  offsets: jax.Array
  group_ids: jax.Array
  tile_ids: jax.Array
  num_items: jax.Array


def max_items(m_pad: int, tm: int, num_groups: int) -> int:
  """Static bound on the work list: one item per tile plus one per group boundary.

  Every group after the first can start inside a tile already counted, and with
  `visit_empty_groups` an empty group costs one item; G extra items cover both.
  """
  return m_pad // tm + num_groups


def make_group_metadata(group_sizes, m_pad: int, tm: int, *, with_tail: bool,
                        visit_empty_groups: bool) -> GroupMetadata:
  """Builds the work list for `group_sizes` over `m_pad` rows in tiles of `tm`.

  with_tail: add a group E covering rows [sum(group_sizes), m_pad) so that the forward
    kernel writes zeros there (every output row is then written exactly once).
  visit_empty_groups: give each empty group one item (with no rows) so that the
    weight-gradient kernel writes its zero block; the forward kernel skips them.
  Group sizes whose sum exceeds m_pad are clipped at m_pad.
  """
  if m_pad % tm:
    raise ValueError(f"m_pad={m_pad} must be a multiple of tm={tm}")
  sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
  ends = jnp.minimum(jnp.cumsum(sizes), m_pad)
  if with_tail:
    ends = jnp.concatenate([ends, jnp.array([m_pad], jnp.int32)])
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  sizes = ends - starts
  num_groups = ends.shape[0]
  num_tiles = m_pad // tm

  nonempty = sizes > 0
  first_tile = jnp.minimum(starts // tm, num_tiles - 1)
  last_tile = jnp.where(nonempty, (ends - 1) // tm, first_tile)
  counts = jnp.where(nonempty, last_tile - first_tile + 1, 1 if visit_empty_groups else 0)

  n_static = max_items(m_pad, tm, num_groups)
  item_ends = jnp.cumsum(counts)
  num_items = item_ends[-1]
  # Padding items repeat the last real item, so the kernels see no new block index.
  item = jnp.clip(jnp.arange(n_static, dtype=jnp.int32), 0, jnp.maximum(num_items - 1, 0))
  group_ids = jnp.searchsorted(item_ends, item, side="right").astype(jnp.int32)
  group_ids = jnp.minimum(group_ids, num_groups - 1)
  local = item - (item_ends[group_ids] - counts[group_ids])
  tile_ids = jnp.clip(first_tile[group_ids] + local, 0, num_tiles - 1).astype(jnp.int32)
  offsets = jnp.concatenate([starts, ends[-1:]]).astype(jnp.int32)
  return GroupMetadata(offsets, group_ids, tile_ids, num_items.reshape(1).astype(jnp.int32))

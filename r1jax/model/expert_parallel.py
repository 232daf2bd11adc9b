"""Expert parallelism: the token exchanges of a routed-expert layer, run inside a shard_map.

Each device along the expert mesh axis (size n) holds E_l = E / n routed experts and its
own T tokens (DeepSeek-V3 section 3.4: attention data-parallel, MoE expert-parallel; GShard,
Lepikhin et al. 2020). Routing is per token, so every device routes its own tokens; an
exchange sends each of its T*K assignments to the device holding its expert, that device
runs its local experts with any registered dispatch (K = 1, local expert ids, id E_l meaning
"not here"), and the outputs go back to the token, where the gate weights combine them.

cfg.moe_exchange picks the exchange (`EXCHANGES`). Bytes each device sends per MoE layer
and direction (element size b; the receive side is the same), forward pass; the backward
pass moves the same again:
  'gather'      dropless. all_gather the tokens (+ ids, weights) over the expert axis, every
                device runs its experts over all n*T of them, psum_scatter the partial
                outputs back: (n-1)*T*D*b each way (= T_g*D*b*(n-1)/n with T_g = n*T the
                expert group's tokens; ring algorithms), compute over n*T*K rows.
  'all_to_all'  fixed capacity: a buffer of C = ceil(moe_capacity_factor * T*K / n) rows per
                destination, lax.all_to_all there and back: n*C*D*b each way (2*n*C*D*b in
                all, (n-1)/n of it leaving the device); assignments past C are dropped and
                counted (stats 'dropped_assignments').
  'ragged'      dropless, lax.ragged_all_to_all there and back: the actual T*K*D*b rows each
                way (2*T*K*D*b, plus an all_to_all of n counts and offsets); the receive
                buffer is sized for the worst case, n*T*K rows. XLA:CPU does not implement
                ragged_all_to_all, so on CPU the same offsets run through an emulation
                built from a padded all_to_all (`ragged_all_to_all`, n*T*K rows each way).
`exchange` runs one inside any shard_map given the expert axis name(s) (the rollout engine's
expert-parallel decode calls it from moe.moe_ffn); `routed_experts` wraps it in
jax.shard_map over the context mesh (`sharding.use_mesh`) for the training forward.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from r1jax.model import partitioning
from r1jax.model.layers import fuse_swiglu

EXCHANGES = ("none", "gather", "all_to_all", "ragged")


def _axis_size(axis) -> int:
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  return math.prod(jax.lax.axis_size(a) for a in names)


def capacity(tokens: int, k: int, n: int, factor: float) -> int:
  """Rows per destination shard of the 'all_to_all' exchange: ceil(factor * T*K / n)."""
  return max(1, math.ceil(factor * tokens * k / n))


def _local_experts(experts: dict) -> int:
  return experts["w_down"].shape[0]


def _run_local(dispatch, experts, rows_RxD, local_R, cfg):
  """The local experts over received rows (one assignment each, id E_l: an empty row)."""
  ones = jnp.ones((rows_RxD.shape[0], 1), jnp.float32)
  return dispatch(experts, rows_RxD, local_R[:, None], ones, cfg)


def gather_exchange(experts, x_TxD, idx_TxK, weights_TxK, cfg, dispatch, axis):
  """All shards' tokens to every shard, local experts over all of them, outputs
  reduce-scattered back (assignments to other shards' experts are dropped locally)."""
  e = _local_experts(experts)
  x_all = jax.lax.all_gather(x_TxD, axis, axis=0, tiled=True)
  idx_all = jax.lax.all_gather(idx_TxK, axis, axis=0, tiled=True)
  w_all = jax.lax.all_gather(weights_TxK, axis, axis=0, tiled=True)
  local = idx_all - jax.lax.axis_index(axis) * e
  local = jnp.where((local >= 0) & (local < e), local, e)
  y_all = dispatch(experts, x_all, local, w_all, cfg)
  return jax.lax.psum_scatter(y_all, axis, scatter_dimension=0, tiled=True)


def all_to_all_exchange(experts, x_TxD, idx_TxK, weights_TxK, cfg, dispatch, axis, c: int):
  """Fixed-capacity exchange; returns (y [T, D], assignments dropped on this shard).

  Assignment j of the X = T*K (token-major order) to shard s takes slot rank_j of s's
  buffer of c rows, its rank among this shard's assignments to s; rank >= c is dropped.
  """
  t, k = idx_TxK.shape
  d, e, n = x_TxD.shape[-1], _local_experts(experts), _axis_size(axis)
  x = t * k
  dest_X, local_X = idx_TxK.reshape(x) // e, idx_TxK.reshape(x) % e
  onehot_XxN = jax.nn.one_hot(dest_X, n, dtype=jnp.int32)
  rank_X = jnp.sum((jnp.cumsum(onehot_XxN, axis=0) - 1) * onehot_XxN, axis=1)
  kept_X = rank_X < c
  slot_X = jnp.where(kept_X, dest_X * c + rank_X, n * c)
  token_X = jnp.arange(x) // k
  send_x = jnp.zeros((n * c, d), x_TxD.dtype).at[slot_X].set(x_TxD[token_X], mode="drop")
  send_id = jnp.full((n * c,), e, jnp.int32).at[slot_X].set(local_X, mode="drop")
  a2a = lambda v: jax.lax.all_to_all(v, axis, 0, 0, tiled=True)
  y_rows = _run_local(dispatch, experts, a2a(send_x), a2a(send_id), cfg)
  back_XxD = a2a(y_rows)[jnp.minimum(slot_X, n * c - 1)]
  w_X = jnp.where(kept_X, weights_TxK.reshape(x), 0).astype(x_TxD.dtype)
  y_TxD = jnp.zeros_like(x_TxD).at[token_X].add(back_XxD * w_X[:, None])
  return y_TxD, jnp.sum(~kept_X).astype(jnp.int32)


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, axis):
  """lax.ragged_all_to_all from a padded all_to_all (worst-case chunks of
  min(operand rows, output rows), so nothing is ever cut), for backends without it."""
  n = input_offsets.shape[0]
  m = min(operand.shape[0], output.shape[0])
  i_M = jnp.arange(m)
  rows_NxM = input_offsets[:, None] + i_M[None, :]
  ok_NxM = i_M[None, :] < send_sizes[:, None]
  pad = (slice(None), slice(None)) + (None,) * (operand.ndim - 1)
  chunks = jnp.where(ok_NxM[pad], operand[jnp.clip(rows_NxM, 0, operand.shape[0] - 1)], 0)
  a2a = lambda v: jax.lax.all_to_all(v, axis, 0, 0, tiled=True)
  recv = a2a(chunks)                       # [n, m, ...]: chunk s came from shard s
  offsets_N = a2a(output_offsets)          # where shard s wrote into this shard's output
  dest_NxM = offsets_N[:, None] + i_M[None, :]
  dest_NxM = jnp.where(i_M[None, :] < recv_sizes[:, None], dest_NxM, output.shape[0])
  return output.at[dest_NxM.reshape(n * m)].set(recv.reshape((n * m,) + operand.shape[1:]),
                                                mode="drop")


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                      axis):
  """lax.ragged_all_to_all where the compiled platform has it (TPU, GPU); the emulation on
  CPU. Chosen when the program is lowered (lax.platform_dependent), not from the host."""
  real = lambda *a: jax.lax.ragged_all_to_all(*a, axis_name=axis)
  emulated = lambda *a: _emulated_ragged_all_to_all(*a, axis)
  return jax.lax.platform_dependent(operand, output, input_offsets, send_sizes, output_offsets,
                                    recv_sizes, cpu=emulated, default=real)


def ragged_exchange(experts, x_TxD, idx_TxK, weights_TxK, cfg, dispatch, axis):
  """Dropless exchange of exactly the rows each shard sends (lax.ragged_all_to_all).

  This shard's X assignments are sorted by destination shard, so chunk s is contiguous;
  an all_to_all of the counts tells each receiver how many rows come from each source,
  it places them source by source (offsets = exclusive cumsum of the received counts),
  and a second all_to_all returns those offsets to the senders, which is where
  ragged_all_to_all writes. The outputs return along the same offsets reversed.
  """
  t, k = idx_TxK.shape
  d, e, n = x_TxD.shape[-1], _local_experts(experts), _axis_size(axis)
  x = t * k
  dest_X = idx_TxK.reshape(x) // e
  order_X = jnp.argsort(dest_X, stable=True)
  token_X = order_X // k
  send_N = jnp.bincount(dest_X, length=n).astype(jnp.int32)
  in_off_N = jnp.cumsum(send_N) - send_N
  a2a = lambda v: jax.lax.all_to_all(v, axis, 0, 0, tiled=True)
  recv_N = a2a(send_N)                     # rows from each source shard
  recv_off_N = jnp.cumsum(recv_N) - recv_N
  out_off_N = a2a(recv_off_N)              # where this shard's chunk lands in each receiver
  rows = n * x                             # worst case: every shard sends all its rows here
  recv_x = ragged_all_to_all(x_TxD[token_X], jnp.zeros((rows, d), x_TxD.dtype), in_off_N,
                             send_N, out_off_N, recv_N, axis)
  recv_id = ragged_all_to_all((idx_TxK.reshape(x) % e)[order_X], jnp.full((rows,), e, jnp.int32),
                              in_off_N, send_N, out_off_N, recv_N, axis)
  y_rows = _run_local(dispatch, experts, recv_x, recv_id, cfg)
  back_XxD = ragged_all_to_all(y_rows, jnp.zeros((x, d), x_TxD.dtype), recv_off_N, recv_N,
                               a2a(in_off_N), send_N, axis)
  w_X = weights_TxK.reshape(x)[order_X].astype(x_TxD.dtype)
  return jnp.zeros_like(x_TxD).at[token_X].add(back_XxD * w_X[:, None])


def exchange(name: str, experts, x_TxD, idx_TxK, weights_TxK, cfg, dispatch, axis):
  """Routed-expert output for this shard's tokens, inside a shard_map whose `axis` (a mesh
  axis name or tuple) splits the experts `experts` (fused layout, E_l local ones; expert
  ids in idx_TxK are global). Returns (y [T, D], assignments dropped here [] int32)."""
  none = jnp.zeros((), jnp.int32)
  if name == "gather":
    return gather_exchange(experts, x_TxD, idx_TxK, weights_TxK, cfg, dispatch, axis), none
  if name == "ragged":
    return ragged_exchange(experts, x_TxD, idx_TxK, weights_TxK, cfg, dispatch, axis), none
  if name == "all_to_all":
    c = capacity(x_TxD.shape[0], idx_TxK.shape[1], _axis_size(axis), cfg.moe_capacity_factor)
    return all_to_all_exchange(experts, x_TxD, idx_TxK, weights_TxK, cfg, dispatch, axis, c)
  raise ValueError(f"unknown moe_exchange {name!r}; expected one of {EXCHANGES[1:]}")


# ---------------------------------------------------------------------------- training layout

def context_mesh(cfg):
  """The context mesh (`sharding.use_mesh`) when the training forward should run the routed
  experts expert-parallel under shard_map: cfg.moe_exchange != 'none' and the routed
  experts are split over a mesh axis of size > 1. None: jit partitions the MoE."""
  if cfg.moe_exchange == "none":
    return None
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not _expert_entry(mesh, cfg.n_routed_experts):
    return None
  return mesh


def _expert_entry(mesh, n_experts: int):
  return partitioning.logical_to_spec(("exp",), (n_experts,), mesh)[0]


def _names(entry) -> tuple:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def routed_experts(experts: dict, expert_axes: dict, x_BxLxD, idx_BxLxK, weights_BxLxK, cfg,
                   dispatch, mesh):
  """The routed experts of one MoE layer under jax.shard_map over `mesh` (`context_mesh`).

  experts: the stored (unfused) weights {'w_gate', 'w_up', 'w_down'}, placed by
  sharding.RULES (expert_axes: their logical axes): E split over the expert axis, the
  model dim over 'fsdp' (all-gathered here, ZeRO-3), the expert hidden dim over 'tensor'
  (each tensor shard computes a partial output; they are summed after the shard_map, which
  keeps the gradient rules of shard_map's transpose simple). Tokens split over the batch
  axes. The batch must split over the expert axis too (`sharding.RULES['batch']`), or this
  raises. Returns (y [B, L, D], assignments dropped in the layer [] int32).
  """
  sh = partitioning
  b = x_BxLxD.shape[0]
  specs = {n: sh.logical_to_spec(expert_axes[n], experts[n].shape, mesh) for n in experts}
  expert_axis = _names(specs["w_down"][0])
  batch = sh.logical_to_spec(("batch",), (b,), mesh)[0]
  if not set(expert_axis) <= set(_names(batch)):
    raise ValueError(f"moe_exchange={cfg.moe_exchange!r} needs the batch ({b} rows) split over "
                     f"the expert mesh axis {expert_axis} too; got batch split {batch!r}")
  tensor = _names(specs["w_down"][1])
  token_axes = _names(batch)

  def body(local: dict, x, idx, w):
    local = dict(local)
    for name, spec in specs.items():   # FSDP: gather the model dim of this shard's experts
      for dim, (logical, entry) in enumerate(zip(expert_axes[name], spec)):
        if logical == "embed" and entry is not None:
          local[name] = jax.lax.all_gather(local[name], entry, axis=dim, tiled=True)
    bl, l, d = x.shape
    y, dropped = exchange(cfg.moe_exchange, fuse_swiglu(local), x.reshape(bl * l, d),
                          idx.reshape(bl * l, -1), w.reshape(bl * l, -1), cfg, dispatch,
                          expert_axis)
    return y.reshape((1, bl, l, d)), dropped.reshape((1,) * len(mesh.axis_names))

  rows = P(batch)
  partial = P(tensor[0] if len(tensor) == 1 else (tensor or None), batch)
  every = P(*mesh.axis_names)
  y_SxBxLxD, dropped = jax.shard_map(
      body, in_specs=(specs, rows, rows, rows), out_specs=(partial, every),
      check_vma=False)(dict(experts), x_BxLxD, idx_BxLxK, weights_BxLxK)
  # Devices that share tokens (along axes the batch is not split over) count them alike.
  copies = math.prod(mesh.shape[a] for a in mesh.axis_names if a not in token_axes)
  return y_SxBxLxD.sum(axis=0), (dropped.sum() // copies).astype(jnp.int32)

"""DeepSeekMoE (DeepSeek-V3 section 2.1.2): routed fine-grained experts + shared experts.

Router, following the V3 reference and HF's DeepseekV3 `noaux_tc` gate:
  1. logits in float32, scores s = sigmoid(logits) (V3) or softmax(logits) (V2);
  2. selection uses s + b, where b is the aux-loss-free correction bias (never the weights);
  3. group-limited routing: experts split into n_group groups, group score = sum of the
     top-2 biased scores (V3; 'max' for V2), keep topk_group groups, mask the rest to -inf
     (HF masks with 0.0; the reference's -inf is used here), then top-K;
  4. gate weights = unbiased s at the chosen experts, normalised to sum 1 if
     norm_topk_prob, then times routed_scaling_factor. (HF's V2 applies the scaling factor
     only when not normalising; every released V2 config has factor 1 or no normalisation,
     so the two agree.)

Dispatch implementations, registered by name in DISPATCH_IMPLS (cfg.moe_impl picks the one
training uses; the rollout engine decodes with 'capacity') and tested against each other:
  'dense'    every token through every expert, weights zero off the top-K: the exact oracle.
  'ragged'   sort the T*K assignments by expert, grouped matmuls with jax.lax.ragged_dot,
             unsort and combine.
  'grouped'  the same sort, then expert-pure tiles of rows as one batched matmul (the fast
             sparse path on CPU, where ragged_dot lowers to masked dense work).
  'capacity' expert-major rounds of a fixed number of slots per expert, one matmul batched
             over experts per round (few tokens: prefill and decode).
  'pallas'   the same sort, grouped matmuls as Pallas kernels (moe_pallas.py, which
             registers itself; config.py and decoder.py import it).
cfg.moe_impl may also be 'auto': `resolve_impl` picks 'pallas' for one TPU or GPU, 'ragged'
for several (a jit over a mesh cannot partition Pallas kernels), 'grouped' for CPUs.
Every dispatch is fn(experts, x_TxD, idx_TxK, weights_TxK, cfg) -> y_TxD over the experts in
`layers.fuse_swiglu` layout ({'w_gu' [E, D, 2F], 'w_down' [E, F, D]}), E read off the
weights, and drops every assignment whose expert index is E (one past the last): under
expert parallelism (expert_parallel.py) the dispatch runs on one shard's E_l experts with
K = 1 and local ids, E_l marking an empty row. How the routed experts meet their tokens is
`moe_ffn`'s choice: the dispatch over all experts (jit partitions it on a mesh), or an
exchange of cfg.moe_exchange under shard_map (training under `sharding.use_mesh`), or the
'gather' exchange inside the rollout engine's shard_map (expert_axis).
A new dispatch registers itself with `register_dispatch(name)`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import pallas_kernels

from r1jax.model import expert_parallel
from r1jax.model.layers import ParamSpec, fuse_swiglu, swiglu, swiglu_specs

# name -> fn(experts, x_TxD, idx_TxK, weights_TxK, cfg) -> y_TxD
DISPATCH_IMPLS: dict[str, Callable] = {}


def register_dispatch(name: str):
  def deco(fn):
    DISPATCH_IMPLS[name] = fn
    return fn
  return deco


def dispatch_fn(name: str) -> Callable:
  """The registered dispatch `name`; ValueError naming the registered ones otherwise."""
  if name not in DISPATCH_IMPLS:
    raise ValueError(f"unknown moe_impl {name!r}; registered: {sorted(DISPATCH_IMPLS)}")
  return DISPATCH_IMPLS[name]


def auto_impl(devices) -> str:
  """The dispatch moe_impl='auto' means for these devices (a list, Mesh or Sharding):
  'pallas' on one TPU or GPU; 'ragged' on several, because XLA cannot partition a Pallas
  kernel inside a jit over a multi-device mesh (lax.ragged_dot it can; under shard_map each
  shard is one device); 'grouped' on CPU, where Pallas kernels only run interpreted."""
  if isinstance(devices, jax.sharding.Mesh):
    devices = list(devices.devices.flat)
  elif isinstance(devices, jax.sharding.Sharding):
    devices = list(devices.device_set)
  elif hasattr(devices, "platform"):
    devices = [devices]
  pallas_kernels.backend_for(devices)  # raises for mixed platforms or one without a kernel
  if pallas_kernels.interpret_for(devices):
    return "grouped"
  return "pallas" if len(devices) == 1 else "ragged"


def resolve_impl(cfg, devices=None) -> str:
  """cfg.moe_impl with 'auto' resolved for the devices the model is compiled for (None:
  jax.devices()). Call it where the model config is built: inside a traced step the
  devices are not known, and moe_ffn falls back to jax.devices()."""
  if cfg.moe_impl != "auto":
    return cfg.moe_impl
  return auto_impl(jax.devices() if devices is None else devices)


def param_specs(cfg) -> dict:
  d, e, f = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
  specs = {
      "router": {"w": ParamSpec((d, e), ("embed", "exp_route")),
                 "bias": ParamSpec((e,), ("exp_route",), "zeros")},
      "experts": {
          "w_gate": ParamSpec((e, d, f), ("exp", "embed", "expert_mlp")),
          "w_up": ParamSpec((e, d, f), ("exp", "embed", "expert_mlp")),
          "w_down": ParamSpec((e, f, d), ("exp", "expert_mlp", "embed")),
      },
  }
  if cfg.n_shared_experts > 0:
    specs["shared"] = swiglu_specs(d, f * cfg.n_shared_experts)
  return specs


def compute_layout(p: dict, fuse_experts: bool = True) -> dict:
  """One MoE layer's stored weights in the layout `moe_ffn` runs on (SwiGLUs fused).
  fuse_experts=False keeps the routed experts as stored: under expert-parallel training
  they are fused inside the shard_map, per 'tensor' shard of their hidden dim."""
  experts = fuse_swiglu(p["experts"]) if fuse_experts else p["experts"]
  out = {"router": p["router"], "experts": experts}
  if "shared" in p:
    out["shared"] = fuse_swiglu(p["shared"])
  return out


def router_scores(router_p: dict, x_TxD, cfg):
  """Unbiased affinity scores s [T, E] in float32."""
  logits = x_TxD.astype(jnp.float32) @ router_p["w"].astype(jnp.float32)
  if cfg.scoring_func == "sigmoid":
    return jax.nn.sigmoid(logits)
  if cfg.scoring_func == "softmax":
    return jax.nn.softmax(logits, axis=-1)
  raise ValueError(f"unknown scoring_func {cfg.scoring_func!r}")


def route(router_p: dict, x_TxD, cfg):
  """Returns (expert_idx [T, K] int32, weights [T, K] f32, scores [T, E] f32)."""
  scores_TxE = router_scores(router_p, x_TxD, cfg)
  bias_E = jax.lax.stop_gradient(router_p["bias"].astype(jnp.float32))
  choice_TxE = scores_TxE + bias_E[None, :]
  t, e = choice_TxE.shape
  if cfg.n_group > 1:
    grouped_TxJxI = choice_TxE.reshape(t, cfg.n_group, e // cfg.n_group)
    if cfg.group_score == "top2_sum":
      group_scores_TxJ = jax.lax.top_k(grouped_TxJxI, 2)[0].sum(axis=-1)
    else:
      group_scores_TxJ = grouped_TxJxI.max(axis=-1)
    _, kept = jax.lax.top_k(group_scores_TxJ, cfg.topk_group)  # [T, topk_group]
    keep_TxJ = jax.nn.one_hot(kept, cfg.n_group, dtype=jnp.float32).sum(axis=1) > 0
    choice_TxE = jnp.where(keep_TxJ[:, :, None], grouped_TxJxI, -jnp.inf).reshape(t, e)
  _, idx_TxK = jax.lax.top_k(choice_TxE, cfg.num_experts_per_tok)
  weights_TxK = jnp.take_along_axis(scores_TxE, idx_TxK, axis=-1)
  if cfg.norm_topk_prob:
    weights_TxK = weights_TxK / (weights_TxK.sum(axis=-1, keepdims=True) + 1e-20)
  weights_TxK = weights_TxK * cfg.routed_scaling_factor
  return idx_TxK.astype(jnp.int32), weights_TxK, scores_TxE


def _num_experts(experts: dict) -> int:
  return experts["w_down"].shape[0]


@register_dispatch("dense")
def dense_dispatch(experts: dict, x_TxD, idx_TxK, weights_TxK, cfg):
  """Every token through every expert; exact oracle for the sparse paths."""
  t, e = x_TxD.shape[0], _num_experts(experts)
  combine_TxE = jnp.zeros((t, e), jnp.float32).at[jnp.arange(t)[:, None], idx_TxK].add(
      weights_TxK, mode="drop")
  y_TxExD = swiglu(x_TxD, experts, matmul=lambda x, w: jnp.einsum("td,edf->tef", x, w),
                   down_matmul=lambda h, w: jnp.einsum("tef,efd->ted", h, w))
  return jnp.einsum("ted,te->td", y_TxExD, combine_TxE.astype(x_TxD.dtype))


def _sort_by_expert(idx_TxK, weights_TxK, dtype, e: int):
  """The T*K = X assignments in expert order (stable), dropped ones (expert e) last:
  (order, token of each, its gate weight, whether it is kept, assignments per expert [E])."""
  t, k = idx_TxK.shape
  expert_X = idx_TxK.reshape(t * k)
  order_X = jnp.argsort(expert_X, stable=True)
  kept_X = expert_X[order_X] < e
  w_X = jnp.where(kept_X, weights_TxK.reshape(t * k)[order_X], 0).astype(dtype)
  group_sizes_E = jnp.bincount(expert_X, length=e).astype(jnp.int32)
  return order_X, order_X // k, w_X, kept_X, group_sizes_E


@register_dispatch("ragged")
def ragged_dispatch(experts: dict, x_TxD, idx_TxK, weights_TxK, cfg):
  """Sort assignments by expert, grouped matmuls (lax.ragged_dot), scatter-add back."""
  _, token_X, w_X, kept_X, sizes_E = _sort_by_expert(idx_TxK, weights_TxK, x_TxD.dtype,
                                                      _num_experts(experts))
  grouped = lambda x, w: jax.lax.ragged_dot(x, w, sizes_E)
  y_XxD = swiglu(x_TxD[token_X], experts, matmul=grouped)
  y_XxD = jnp.where(kept_X[:, None], y_XxD, 0) * w_X[:, None]  # rows past the groups: unset
  return jnp.zeros_like(x_TxD).at[token_X].add(y_XxD)


def group_tile(assignments: int, n_experts: int) -> int:
  """Rows per tile for `grouped_dispatch`: ~half an expert's mean load, a multiple of 8
  in [8, 128] (padding waste at most E * (tile - 1) rows)."""
  half_mean = assignments / (2 * n_experts)
  return int(min(128, max(8, -(-half_mean // 8) * 8)))


@register_dispatch("grouped")
def grouped_dispatch(experts: dict, x_TxD, idx_TxK, weights_TxK, cfg, tile: int | None = None):
  """Grouped matmuls over expert-sorted tiles: exact, static shapes, differentiable.

  The X = T*K assignments are sorted by expert and each expert's rows are padded to a
  multiple of the tile O, so every tile of O rows belongs to one expert (the grouped-GEMM
  layout of MegaBlocks, Gale et al. 2022, and of grouped-matmul kernels). The tiles' expert
  weights are gathered and all U tiles run as one batched matmul; padding rows are zeros
  and are never read back. Work is at most (X + E*(O - 1)) rows, against E/K times the
  needed work for 'dense'; XLA:CPU lowers lax.ragged_dot to masked dense work, so this is
  the fast sparse path on CPU. Gathering weights per tile costs U * D * F memory, so at
  large scale grouped-matmul kernels are the intended path.
  """
  t, k = idx_TxK.shape
  d = x_TxD.shape[-1]
  e = _num_experts(experts)
  x = t * k
  o = group_tile(x, e) if tile is None else int(tile)
  u = -(-(x + e * (o - 1)) // o)
  order_X, token_X, w_X, kept_X, counts_E = _sort_by_expert(idx_TxK, weights_TxK,
                                                           x_TxD.dtype, e)
  expert_X = jnp.minimum(idx_TxK.reshape(x)[order_X], e - 1)
  padded_E = -(-counts_E // o) * o
  padded_end_E = jnp.cumsum(padded_E)
  start_E = padded_end_E - padded_E            # first padded row of each expert
  first_E = jnp.cumsum(counts_E) - counts_E    # first sorted assignment of each expert
  dest_X = jnp.where(kept_X, start_E[expert_X] + jnp.arange(x) - first_E[expert_X], u * o)
  row_token = jnp.full((u * o,), t, jnp.int32).at[dest_X].set(token_X, mode="drop")
  tile_expert_U = jnp.minimum(
      jnp.searchsorted(padded_end_E, jnp.arange(u) * o, side="right"), e - 1)
  x_UxOxD = jnp.concatenate([x_TxD, jnp.zeros((1, d), x_TxD.dtype)])[row_token].reshape(u, o, d)
  tiles = jax.tree.map(lambda w: w[tile_expert_U], experts)
  y_rows = swiglu(x_UxOxD, tiles, matmul=lambda a, w: jnp.einsum("uod,udf->uof", a, w))
  y_XxD = jnp.where(kept_X[:, None], y_rows.reshape(-1, d)[jnp.minimum(dest_X, u * o - 1)], 0)
  return jnp.zeros_like(x_TxD).at[token_X].add(y_XxD * w_X[:, None])


def expert_capacity(tokens: int, cfg) -> int:
  """Token slots per expert and round for 'capacity': twice the mean load rounded up to a
  multiple of 8, or 4 when the mean load is at most one token.

  Enough for one round at the usual loads. Multiples of 8 ran fastest on XLA:CPU from 16
  tokens up; at 8 tokens (a 16-row batch split over two devices) 8 slots are mostly empty
  and 4 slots ran the routed experts ~20% faster.
  """
  mean = tokens * cfg.num_experts_per_tok / cfg.n_routed_experts
  slots = 4 if mean <= 1 else -(-2 * mean // 8) * 8
  return int(min(tokens, slots))


@register_dispatch("capacity")
def capacity_dispatch(experts: dict, x_TxD, idx_TxK, weights_TxK, cfg,
                      capacity: int | None = None):
  """Expert-major rounds for a few tokens, exactly: no assignment is ever dropped.

  The X = T*K assignments are ranked within their expert in token order; a round gathers
  the assignments of rank [r*O, (r+1)*O) of every expert into [E, O, D], runs the SwiGLUs
  as matmuls batched over E, and adds each output, times its gate weight, to its token.
  ceil(max load / O) rounds run (one, unless the routing is very uneven), so the result
  never depends on the capacity O (default `expert_capacity(T, cfg)`). Each round reads
  every expert's weights once, which is what a decode step costs.
  """
  t, d = x_TxD.shape
  e, k = _num_experts(experts), idx_TxK.shape[1]
  o = expert_capacity(t, cfg) if capacity is None else int(capacity)
  if o < 1:
    raise ValueError(f"capacity must be >= 1, got {o}")
  expert_X = idx_TxK.reshape(t * k)
  weight_X = weights_TxK.reshape(t * k).astype(x_TxD.dtype)
  onehot_XxE = jax.nn.one_hot(expert_X, e, dtype=jnp.int32)  # all zero at expert e (dropped)
  rank_X = jnp.sum((jnp.cumsum(onehot_XxE, axis=0) - 1) * onehot_XxE, axis=1)
  n_rounds = (jnp.max(jnp.sum(onehot_XxE, axis=0)) + o - 1) // o
  token_X = jnp.arange(t * k) // k
  x_pad = jnp.concatenate([x_TxD, jnp.zeros((1, d), x_TxD.dtype)])  # row t: empty slots
  batched = lambda a, w: jnp.einsum("eod,edf->eof", a, w)

  def one_round(r, y_TxD):
    slot_X = rank_X - r * o
    in_round_X = (slot_X >= 0) & (slot_X < o) & (expert_X < e)
    table_ExO = jnp.full((e, o), t, jnp.int32).at[
        expert_X, jnp.where(in_round_X, slot_X, o)].set(token_X, mode="drop")
    out_ExOxD = swiglu(x_pad[table_ExO], experts, matmul=batched)
    out_XxD = out_ExOxD[jnp.minimum(expert_X, e - 1), jnp.clip(slot_X, 0, o - 1)]
    out_XxD = out_XxD * jnp.where(in_round_X, weight_X, 0)[:, None]
    return y_TxD + out_XxD.reshape(t, k, d).sum(axis=1)

  return jax.lax.fori_loop(0, n_rounds, one_round, jnp.zeros_like(x_TxD))


def sequence_balance_loss(scores_TxE, idx_TxK, valid_BxL, cfg):
  """Complementary sequence-wise balance loss (V3 eqs. 17-20), without alpha.

  f_i = E / (K * L_b) * #{t in b : i in topK(t)},  P_i = mean_t s_{i,t} / sum_j s_{j,t};
  loss = mean over sequences b of sum_i f_i P_i. Padding (valid == False) is excluded.
  """
  b, l = valid_BxL.shape
  e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
  valid = valid_BxL.astype(jnp.float32)
  n_tok_B = jnp.maximum(valid.sum(axis=1), 1.0)
  sel_BxLxE = jax.nn.one_hot(idx_TxK, e, dtype=jnp.float32).sum(axis=1).reshape(b, l, e)
  f_BxE = e / (k * n_tok_B[:, None]) * jnp.einsum("ble,bl->be", sel_BxLxE, valid)
  s_norm = scores_TxE / scores_TxE.sum(axis=-1, keepdims=True)
  p_BxE = jnp.einsum("ble,bl->be", s_norm.reshape(b, l, e), valid) / n_tok_B[:, None]
  return jnp.mean(jnp.sum(f_BxE * p_BxE, axis=-1))


def moe_ffn(p: dict, x_BxLxD, valid_BxL, cfg, *, impl: str | None = None, expert_axis=None,
            mesh=None):
  """Routed + shared experts over `compute_layout` weights. Returns (y [B, L, D], stats).

  impl: the dispatch (default cfg.moe_impl; a still unresolved 'auto' takes jax.devices(),
  see `resolve_impl`). Tokens are routed where they are (routing is per token); the routed
  experts then run in one of three ways:
    expert_axis: inside a shard_map (the rollout engine's), the mesh axis (or axes) the
      routed experts are split over: the 'gather' exchange of `expert_parallel`.
    mesh: the training forward's context mesh (`expert_parallel.context_mesh`): the
      routed experts under jax.shard_map with cfg.moe_exchange (`expert_parallel`); p's
      experts are then the stored, unfused weights (`compute_layout(fuse_experts=False)`).
    neither: the dispatch over all experts, partitioned by jit if the arrays are sharded.
  stats: 'tokens_per_expert' [E] over valid tokens (all shards' under expert_axis),
  'dropped_assignments' (assignments the 'all_to_all' exchange's capacity dropped; 0 for the
  dropless ways) and 'balance_loss' (0 unless cfg.seq_aux_alpha > 0 and no expert_axis).
  """
  b, l, d = x_BxLxD.shape
  x_TxD = x_BxLxD.reshape(b * l, d)
  valid_T = valid_BxL.reshape(b * l).astype(jnp.float32)
  idx_TxK, weights_TxK, scores_TxE = route(p["router"], x_TxD, cfg)
  impl = impl or cfg.moe_impl
  if impl == "auto":
    impl = auto_impl(jax.devices())
  dispatch = dispatch_fn(impl)
  dropped = jnp.zeros((), jnp.int32)
  if expert_axis is not None:
    y_TxD, _ = expert_parallel.exchange("gather", p["experts"], x_TxD, idx_TxK, weights_TxK,
                                        cfg, dispatch, expert_axis)
  elif mesh is not None:
    k = idx_TxK.shape[1]
    axes = {n: s.axes for n, s in param_specs(cfg)["experts"].items()}
    y_BxLxD, dropped = expert_parallel.routed_experts(
        p["experts"], axes, x_BxLxD, idx_TxK.reshape(b, l, k), weights_TxK.reshape(b, l, k),
        cfg, dispatch, mesh)
    y_TxD = y_BxLxD.reshape(b * l, d)
  else:
    y_TxD = dispatch(p["experts"], x_TxD, idx_TxK, weights_TxK, cfg)
  if "shared" in p:
    y_TxD = y_TxD + swiglu(x_TxD, p["shared"])
  tokens_per_expert_E = jnp.einsum(
      "tke,t->e", jax.nn.one_hot(idx_TxK, cfg.n_routed_experts, dtype=jnp.float32), valid_T)
  if expert_axis is not None:
    tokens_per_expert_E = jax.lax.psum(tokens_per_expert_E, expert_axis)
  stats = {"tokens_per_expert": tokens_per_expert_E, "dropped_assignments": dropped}
  if cfg.seq_aux_alpha > 0 and expert_axis is None:
    stats["balance_loss"] = sequence_balance_loss(scores_TxE, idx_TxK, valid_BxL, cfg)
  else:
    stats["balance_loss"] = jnp.zeros((), jnp.float32)
  return y_TxD.reshape(b, l, d), stats


def update_router_bias(bias_E, tokens_per_expert_E, rate: float):
  """Aux-loss-free balancing (V3 section 2.1.2): b_i += u * sign(mean load - load_i).

  Works on stacked layers too ([M, E] biases and loads). Applied outside the optimizer,
  once per step, from the loads observed in that step.
  """
  load = tokens_per_expert_E.astype(jnp.float32)
  mean_load = jnp.mean(load, axis=-1, keepdims=True)
  return (bias_E.astype(jnp.float32) + rate * jnp.sign(mean_load - load)).astype(bias_E.dtype)

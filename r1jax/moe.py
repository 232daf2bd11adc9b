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

Dispatch implementations, chosen by cfg.moe_impl and tested against each other:
  'dense'  every token through every expert, weights zero off the top-K: the exact oracle.
  'ragged' sort the T*K assignments by expert, grouped matmuls with jax.lax.ragged_dot,
           unsort and combine.
  'grouped' the same sort, then expert-pure tiles of rows as one batched matmul (the fast
           sparse path on CPU, where ragged_dot lowers to masked dense work).
  'pallas' grouped-matmul kernels from pallas_kernels/ (registered by that package).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from r1jax.layers import ParamSpec, swiglu, swiglu_specs

# name -> fn(expert_params, x_TxD, expert_idx_TxK, weights_TxK, cfg) -> y_TxD
DISPATCH_IMPLS: dict[str, Callable] = {}


def register_dispatch(name: str):
  def deco(fn):
    DISPATCH_IMPLS[name] = fn
    return fn
  return deco


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
    grouped_TxGxEg = choice_TxE.reshape(t, cfg.n_group, e // cfg.n_group)
    if cfg.group_score == "top2_sum":
      group_scores_TxG = jax.lax.top_k(grouped_TxGxEg, 2)[0].sum(axis=-1)
    else:
      group_scores_TxG = grouped_TxGxEg.max(axis=-1)
    _, kept_TxKg = jax.lax.top_k(group_scores_TxG, cfg.topk_group)
    keep_TxG = jax.nn.one_hot(kept_TxKg, cfg.n_group, dtype=jnp.float32).sum(axis=1) > 0
    choice_TxE = jnp.where(keep_TxG[:, :, None], grouped_TxGxEg, -jnp.inf).reshape(t, e)
  _, idx_TxK = jax.lax.top_k(choice_TxE, cfg.num_experts_per_tok)
  weights_TxK = jnp.take_along_axis(scores_TxE, idx_TxK, axis=-1)
  if cfg.norm_topk_prob:
    weights_TxK = weights_TxK / (weights_TxK.sum(axis=-1, keepdims=True) + 1e-20)
  weights_TxK = weights_TxK * cfg.routed_scaling_factor
  return idx_TxK.astype(jnp.int32), weights_TxK, scores_TxE


@register_dispatch("dense")
def dense_dispatch(experts_p: dict, x_TxD, idx_TxK, weights_TxK, cfg):
  """Every token through every expert; exact oracle for the sparse paths."""
  t = x_TxD.shape[0]
  combine_TxE = jnp.zeros((t, cfg.n_routed_experts), jnp.float32)
  combine_TxE = combine_TxE.at[jnp.arange(t)[:, None], idx_TxK].add(weights_TxK)
  gate_TxExF = jax.nn.silu(jnp.einsum("td,edf->tef", x_TxD, experts_p["w_gate"]))
  h_TxExF = gate_TxExF * jnp.einsum("td,edf->tef", x_TxD, experts_p["w_up"])
  y_TxExD = jnp.einsum("tef,efd->ted", h_TxExF, experts_p["w_down"])
  return jnp.einsum("ted,te->td", y_TxExD, combine_TxE.astype(x_TxD.dtype))


@register_dispatch("ragged")
def ragged_dispatch(experts_p: dict, x_TxD, idx_TxK, weights_TxK, cfg):
  """Sort assignments by expert, grouped matmuls (lax.ragged_dot), scatter-add back."""
  _, token_of, w_sorted, group_sizes_E = _sort_by_expert(idx_TxK, weights_TxK, x_TxD.dtype, cfg)
  x_sorted = x_TxD[token_of]
  gate = jax.nn.silu(jax.lax.ragged_dot(x_sorted, experts_p["w_gate"], group_sizes_E))
  h = gate * jax.lax.ragged_dot(x_sorted, experts_p["w_up"], group_sizes_E)
  y_sorted = jax.lax.ragged_dot(h, experts_p["w_down"], group_sizes_E)
  return jnp.zeros_like(x_TxD).at[token_of].add(y_sorted * w_sorted[:, None])


def _sort_by_expert(idx_TxK, weights_TxK, dtype, cfg):
  """The T*K assignments in expert order (stable): (order, token of each, its gate weight,
  assignments per expert [E] int32)."""
  t, k = idx_TxK.shape
  flat_expert = idx_TxK.reshape(t * k)
  order = jnp.argsort(flat_expert, stable=True)
  w_sorted = weights_TxK.reshape(t * k)[order].astype(dtype)
  group_sizes_E = jnp.bincount(flat_expert, length=cfg.n_routed_experts).astype(jnp.int32)
  return order, order // k, w_sorted, group_sizes_E


def group_tile(assignments: int, n_experts: int) -> int:
  """Rows per tile for `grouped_dispatch`: ~half an expert's mean load, a multiple of 8
  in [8, 128] (padding waste at most E * (m - 1) rows)."""
  half_mean = assignments / (2 * n_experts)
  return int(min(128, max(8, -(-half_mean // 8) * 8)))


@register_dispatch("grouped")
def grouped_dispatch(experts_p: dict, x_TxD, idx_TxK, weights_TxK, cfg, tile: int | None = None):
  """Grouped matmuls over expert-sorted tiles: exact, static shapes, differentiable.

  The T*K assignments are sorted by expert and each expert's rows are padded to a multiple
  of the tile m, so every tile of m rows belongs to one expert (the grouped-GEMM layout
  of MegaBlocks, Gale et al. 2022, and of grouped-matmul kernels). The tiles' expert
  weights are gathered and all tiles run as one batched matmul; padding rows are zeros and
  are never read back. Work is at most (T*K + E*(m - 1)) rows, against E/K times the
  needed work for 'dense'; XLA:CPU lowers lax.ragged_dot to masked dense work, so this is
  the fast sparse path on CPU. Gathering weights per tile costs n_tiles * D * F memory, so
  at large scale the Pallas kernels are the intended path.
  """
  t, k = idx_TxK.shape
  d = x_TxD.shape[-1]
  e = cfg.n_routed_experts
  a = t * k
  m = group_tile(a, e) if tile is None else int(tile)
  n_tiles = -(-(a + e * (m - 1)) // m)
  order, token_A, w_sorted, counts_E = _sort_by_expert(idx_TxK, weights_TxK, x_TxD.dtype, cfg)
  sorted_expert = idx_TxK.reshape(a)[order]
  padded_E = -(-counts_E // m) * m
  padded_end_E = jnp.cumsum(padded_E)
  start_E = padded_end_E - padded_E            # first padded row of each expert
  first_E = jnp.cumsum(counts_E) - counts_E    # first sorted assignment of each expert
  dest_A = start_E[sorted_expert] + jnp.arange(a) - first_E[sorted_expert]
  row_token = jnp.full((n_tiles * m,), t, jnp.int32).at[dest_A].set(token_A)
  tile_expert = jnp.minimum(
      jnp.searchsorted(padded_end_E, jnp.arange(n_tiles) * m, side="right"), e - 1)
  x_rows = jnp.concatenate([x_TxD, jnp.zeros((1, d), x_TxD.dtype)])[row_token]
  x_NxMxD = x_rows.reshape(n_tiles, m, d)
  gate = jax.nn.silu(jnp.einsum("nmd,ndf->nmf", x_NxMxD, experts_p["w_gate"][tile_expert]))
  h_NxMxF = gate * jnp.einsum("nmd,ndf->nmf", x_NxMxD, experts_p["w_up"][tile_expert])
  y_rows = jnp.einsum("nmf,nfd->nmd", h_NxMxF, experts_p["w_down"][tile_expert]).reshape(-1, d)
  return jnp.zeros_like(x_TxD).at[token_A].add(y_rows[dest_A] * w_sorted[:, None])


def _dispatch_fn(cfg):
  if cfg.moe_impl == "pallas" and "pallas" not in DISPATCH_IMPLS:
    try:
      import pallas_kernels.moe_dispatch  # noqa: F401  (registers 'pallas')
    except ImportError as e:
      raise ValueError("moe_impl='pallas' needs pallas_kernels.moe_dispatch, which is not "
                       f"available: {e}") from e
  if cfg.moe_impl not in DISPATCH_IMPLS:
    raise ValueError(f"unknown moe_impl {cfg.moe_impl!r}; registered: {sorted(DISPATCH_IMPLS)}")
  return DISPATCH_IMPLS[cfg.moe_impl]


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


def moe_ffn(p: dict, x_BxLxD, valid_BxL, cfg):
  """Routed + shared experts. Returns (y [B, L, D], stats dict)."""
  b, l, d = x_BxLxD.shape
  x_TxD = x_BxLxD.reshape(b * l, d)
  idx_TxK, weights_TxK, scores_TxE = route(p["router"], x_TxD, cfg)
  y_TxD = _dispatch_fn(cfg)(p["experts"], x_TxD, idx_TxK, weights_TxK, cfg)
  if "shared" in p:
    y_TxD = y_TxD + swiglu(x_TxD, p["shared"])
  valid_T = valid_BxL.reshape(b * l).astype(jnp.float32)
  tokens_per_expert_E = jnp.einsum(
      "tke,t->e", jax.nn.one_hot(idx_TxK, cfg.n_routed_experts, dtype=jnp.float32), valid_T)
  stats = {"tokens_per_expert": tokens_per_expert_E}
  if cfg.seq_aux_alpha > 0:
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

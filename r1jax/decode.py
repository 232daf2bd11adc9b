"""The prefill and decode step of the rollout engine, laid out for small batches.

Why a separate step: a decode step multiplies a handful of rows by every weight of the
model once, so its cost is the number of kernels launched and the bytes of weight read,
not FLOPs. `model.forward_with_cache` is written for sequences (stacked layers under a
scan, separate projections, the MoE dispatch of training); this file re-lays the same
parameters once per rollout (`decode_params`) so that one step launches few, larger
kernels. The prefill runs the same code over the prompts; tests hold both to the full
forward's logits.

The layout, per layer:
  * the query down-projection (wq_a, or wq without q_lora) and the KV down-projection wkv_a
    read the same normed input, so they are one [D, Q + C + R] matmul;
  * the cache holds one array per layer, kv [B, S, C + R] = [c_kv (normed) | k_rope
    (rotated)], still (C + R) numbers per token per layer (DeepSeek-V2 section 2.1.3);
  * absorbed attention (DeepSeek-V2 appendix C): W_UK folded into the query
    (q_lat = q_nope W_UK^T, [H, C]), the query [q_lat | q_rope] scored against kv in one
    matmul, the weighted sum of kv taken once and W_UV, then W_O, applied after it;
  * SwiGLU gate and up weights concatenated ([D, 2F], experts [E, D, 2F]);
  * routed experts run expert-major with a capacity (`moe_decode`) in prefill and decode,
    whatever cfg.moe_impl (that setting picks the dispatch of training).
The layers are unrolled over a list, so each step reads the weights in place (a scan over
stacked weights slices them out every step).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax import mla, model, moe, rope
from r1jax.layers import dense, rms_norm


def _fuse_swiglu_weights(p: dict) -> dict:
  """SwiGLU weights with gate and up concatenated: {'w_gu': [..., D, 2F], 'w_down'}."""
  return {"w_gu": jnp.concatenate([p["w_gate"], p["w_up"]], axis=-1), "w_down": p["w_down"]}


def _swiglu_gu(x_TxD, p: dict):
  """layers.swiglu over `_fuse_swiglu_weights`: one matmul for gate and up."""
  gu_TxF2 = x_TxD @ p["w_gu"]
  f = gu_TxF2.shape[-1] // 2
  return (jax.nn.silu(gu_TxF2[:, :f]) * gu_TxF2[:, f:]) @ p["w_down"]


def _attention_params(p: dict, cfg) -> dict:
  d, h = cfg.hidden_size, cfg.num_attention_heads
  n, a = cfg.qk_nope_head_dim, cfg.v_head_dim
  if cfg.q_lora_rank > 0:
    q_in = p["wq_a"]
    out = {"q_norm": p["q_norm"], "wq_b": p["wq_b"].reshape(cfg.q_lora_rank, -1)}
  else:
    q_in = p["wq"].reshape(d, -1)
    out = {}
  w_uk_CxHxN, w_uv_CxHxA = p["wkv_b"][..., :n], p["wkv_b"][..., n:]
  out.update({
      "w_in": jnp.concatenate([q_in, p["wkv_a"]], axis=-1),
      "kv_norm": p["kv_norm"],
      "w_uk_HxNxC": jnp.transpose(w_uk_CxHxN, (1, 2, 0)),
      "w_uv_HxCxA": jnp.transpose(w_uv_CxHxA, (1, 0, 2)),
      "wo": p["wo"].reshape(h * a, d),
  })
  return out


def decode_params(params, cfg) -> dict:
  """The parameters re-laid-out for `decode_layers`, computed once per rollout, in the
  compute dtype of `model.forward` (`model.cast_params`)."""
  params = model.cast_params(params, cfg)
  out = {"embed": params["embed"], "final_norm": params["final_norm"],
         "head_DxV": model.output_head(params, cfg), "layers": []}
  for name in ("dense_layers", "moe_layers"):
    if name not in params:
      continue
    n = jax.tree.leaves(params[name])[0].shape[0]
    for i in range(n):
      p = jax.tree.map(lambda x: x[i], params[name])
      layer = {"attn_norm": p["attn_norm"], "mlp_norm": p["mlp_norm"],
               "attn": _attention_params(p["attn"], cfg)}
      if "mlp" in p:
        layer["mlp"] = _fuse_swiglu_weights(p["mlp"])
      else:
        layer["moe"] = {"router": p["moe"]["router"],
                        "experts": _fuse_swiglu_weights(p["moe"]["experts"])}
        if "shared" in p["moe"]:
          layer["moe"]["shared"] = _fuse_swiglu_weights(p["moe"]["shared"])
      out["layers"].append(layer)
  return out


# ---------------------------------------------------------------------------- experts

def expert_capacity(tokens: int, cfg) -> int:
  """Token slots per expert and round: twice the mean load rounded up to a multiple of 8,
  or 4 when the mean load is at most one token.

  Enough for one round at the usual loads. Multiples of 8 ran fastest on XLA:CPU from 16
  tokens up; at 8 tokens (a 16-row batch split over two devices) 8 slots are mostly empty
  and 4 slots ran the routed experts ~20% faster.
  """
  mean = tokens * cfg.num_experts_per_tok / cfg.n_routed_experts
  slots = 4 if mean <= 1 else -(-2 * mean // 8) * 8
  return int(min(tokens, slots))


def moe_decode(p: dict, x_TxD, cfg, capacity: int | None = None, expert_axis=None):
  """Routed + shared experts for a few tokens, exactly: no token is ever dropped.

  Expert-major: the T*K (token, expert) assignments are ranked within their expert in
  token order; a round gathers the assignments of rank [r*c, (r+1)*c) of every expert into
  [E, c, D], runs the SwiGLUs as matmuls batched over E, and adds each output, times its
  gate weight, to its token. ceil(max load / c) rounds run (one, unless the routing is
  very uneven), so the result never depends on the capacity c (default
  `expert_capacity(T, cfg)`). `p` is one layer's 'moe' entry of `decode_params`.

  expert_axis: inside shard_map, the mesh axis (or axes) the routed experts are split over,
  each shard holding its own rows and E / n experts (DeepSeek-V3 section 3.4: attention
  data-parallel, experts expert-parallel). The shards' tokens are all-gathered, each shard
  runs its experts over all of them, and the partial outputs are reduce-scattered back to
  the rows they came from: every shard reads only its share of the expert weights.
  """
  x_local = x_TxD
  if expert_axis is not None:
    x_TxD = jax.lax.all_gather(x_local, expert_axis, axis=0, tiled=True)
  t, d = x_TxD.shape
  w = p["experts"]
  e, k = w["w_gu"].shape[0], cfg.num_experts_per_tok
  c = expert_capacity(t, cfg) if capacity is None else int(capacity)
  if c < 1:
    raise ValueError(f"capacity must be >= 1, got {c}")
  idx_TxK, weights_TxK, _ = moe.route(p["router"], x_TxD, cfg)
  expert_A = idx_TxK.reshape(t * k)
  weight_A = weights_TxK.reshape(t * k).astype(x_TxD.dtype)
  if expert_axis is not None:  # this shard's experts are [first, first + e); others -> e
    expert_A = expert_A - jax.lax.axis_index(expert_axis) * e
    expert_A = jnp.where((expert_A >= 0) & (expert_A < e), expert_A, e)
  onehot_AxE = jax.nn.one_hot(expert_A, e, dtype=jnp.int32)  # all zero at expert e
  rank_A = jnp.sum((jnp.cumsum(onehot_AxE, axis=0) - 1) * onehot_AxE, axis=1)
  n_rounds = (jnp.max(jnp.sum(onehot_AxE, axis=0)) + c - 1) // c
  token_A = jnp.arange(t * k) // k
  x_pad = jnp.concatenate([x_TxD, jnp.zeros((1, d), x_TxD.dtype)])  # row t: empty slots
  f = w["w_down"].shape[1]

  def one_round(r, y_TxD):
    slot_A = rank_A - r * c
    in_round_A = (slot_A >= 0) & (slot_A < c) & (expert_A < e)  # expert e: another shard's
    table_ExC = jnp.full((e, c), t, jnp.int32).at[
        expert_A, jnp.where(in_round_A, slot_A, c)].set(token_A, mode="drop")
    gu_ExCxF2 = jnp.einsum("ecd,edf->ecf", x_pad[table_ExC], w["w_gu"])
    h_ExCxF = jax.nn.silu(gu_ExCxF2[..., :f]) * gu_ExCxF2[..., f:]
    out_ExCxD = jnp.einsum("ecf,efd->ecd", h_ExCxF, w["w_down"])
    out_AxD = out_ExCxD[jnp.minimum(expert_A, e - 1), jnp.clip(slot_A, 0, c - 1)]
    out_AxD = out_AxD * jnp.where(in_round_A, weight_A, 0)[:, None]
    return y_TxD + out_AxD.reshape(t, k, d).sum(axis=1)

  y_TxD = jax.lax.fori_loop(0, n_rounds, one_round, jnp.zeros_like(x_TxD))
  if expert_axis is not None:
    y_TxD = jax.lax.psum_scatter(y_TxD, expert_axis, scatter_dimension=0, tiled=True)
  if "shared" in p:
    y_TxD = y_TxD + _swiglu_gu(x_local, p["shared"])
  return y_TxD


# ---------------------------------------------------------------------------- the step

def _attention(p: dict, x_BxLxD, kv_BxSxK, positions_BxL, mask_BxLxS, cfg, fresh: bool):
  """Absorbed MLA for L queries per row; returns (output [B, L, D], kv with the new latents).

  fresh: the cache was empty and positions are 0..L-1, so the keys are exactly the L new
  latents (mask_BxLxS is then [B, L, L]); attending over them skips the empty slots.
  """
  b, l, _ = x_BxLxD.shape
  h, n, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
  c = cfg.kv_lora_rank
  a_BxLxI = dense(x_BxLxD, p["w_in"])
  q_in, kv_in = a_BxLxI[..., :-(c + r)], a_BxLxI[..., -(c + r):]
  if "wq_b" in p:
    q_in = dense(rms_norm(q_in, p["q_norm"], cfg.rms_norm_eps), p["wq_b"])
  q_BxLxHxK = q_in.reshape(b, l, h, n + r)
  ckv_BxLxC = rms_norm(kv_in[..., :c], p["kv_norm"], cfg.rms_norm_eps)
  krope_BxLxR = rope.apply_rope(kv_in[..., c:], positions_BxL, cfg)
  new_BxLxK = jnp.concatenate([ckv_BxLxC, krope_BxLxR], axis=-1).astype(kv_BxSxK.dtype)
  kv_BxSxK = kv_BxSxK.at[jnp.arange(b)[:, None], positions_BxL].set(new_BxLxK)
  kv = (new_BxLxK if fresh else kv_BxSxK).astype(x_BxLxD.dtype)

  q_rope_BxLxHxR = rope.apply_rope(q_BxLxHxK[..., n:], positions_BxL, cfg)
  q_lat_BxLxHxC = jnp.einsum("blhn,hnc->blhc", q_BxLxHxK[..., :n], p["w_uk_HxNxC"])
  q_BxLxHxK = jnp.concatenate([q_lat_BxLxHxC, q_rope_BxLxHxR], axis=-1)
  # these einsum layouts are the ones XLA:CPU runs fastest at decode shapes (L = 1)
  scores_BxHxLxS = jnp.einsum("blhk,bsk->bhls", q_BxLxHxK, kv) * rope.softmax_scale(cfg)
  scores_BxHxLxS = jnp.where(mask_BxLxS[:, None], scores_BxHxLxS.astype(jnp.float32),
                             mla.NEG_INF)
  probs_BxHxLxS = jax.nn.softmax(scores_BxHxLxS, axis=-1).astype(x_BxLxD.dtype)
  # the weighted sum over all C + R columns, then drop R: cheaper than slicing the cache
  o_lat_BxHxLxC = jnp.einsum("bhls,bsk->bhlk", probs_BxHxLxS, kv)[..., :c]
  o_BxLxHxA = jnp.einsum("bhlc,hca->blha", o_lat_BxHxLxC, p["w_uv_HxCxA"])
  return dense(o_BxLxHxA.reshape(b, l, -1), p["wo"]), kv_BxSxK


def init_caches(cfg, batch: int, max_len: int) -> list:
  """Empty per-layer caches kv [B, max_len, C + R] (c_kv then k_rope) in cfg.dtype."""
  k = cfg.kv_lora_rank + cfg.qk_rope_head_dim
  return [jnp.zeros((batch, max_len, k), model._DTYPES[cfg.dtype])
          for _ in range(cfg.num_hidden_layers)]


def decode_layers(dparams: dict, cfg, tokens_BxL, positions_BxL, caches: list, read_B=None,
                  fresh: bool = False, expert_axis=None):
  """L tokens per row through the unrolled layers, absorbed attention over the latents.

  The new latents are written at cache slot = position, and a query at position q attends
  to slots <= q, so stale slots (e.g. a shorter prompt's padding) are overwritten before
  anything reads them. caches: per layer kv [B, S, C + R] (`init_caches`).
  Returns (logits [B, V] float32 of the token at column read_B of each row (default the
  last), caches): the prefill reads each prompt's last token, a decode step its only one.
  fresh=True promises empty caches and positions 0..L-1 in every row (a prefill): attention
  then runs over the L new latents only instead of every cache slot.
  expert_axis: the routed experts are split over this mesh axis (see `moe_decode`).
  """
  b, l = tokens_BxL.shape
  s = caches[0].shape[1]
  keys_S = jnp.arange(l if fresh else s)
  mask_BxLxS = keys_S[None, None, :] <= positions_BxL[:, :, None]
  h_BxLxD = dparams["embed"][tokens_BxL]
  new_caches = []
  for p, kv_BxSxK in zip(dparams["layers"], caches):
    x_BxLxD = rms_norm(h_BxLxD, p["attn_norm"], cfg.rms_norm_eps)
    y_BxLxD, kv_BxSxK = _attention(p["attn"], x_BxLxD, kv_BxSxK, positions_BxL, mask_BxLxS, cfg,
                                   fresh)
    new_caches.append(kv_BxSxK)
    h_BxLxD = h_BxLxD + y_BxLxD
    x_TxD = rms_norm(h_BxLxD, p["mlp_norm"], cfg.rms_norm_eps).reshape(b * l, -1)
    y_TxD = _swiglu_gu(x_TxD, p["mlp"]) if "mlp" in p else moe_decode(p["moe"], x_TxD, cfg,
                                                                      expert_axis=expert_axis)
    h_BxLxD = h_BxLxD + y_TxD.reshape(b, l, -1)
  if l == 1:
    h_BxD = h_BxLxD[:, 0]
  else:
    read_B = jnp.full((b,), l - 1, jnp.int32) if read_B is None else read_B
    h_BxD = jnp.take_along_axis(h_BxLxD, read_B[:, None, None].astype(jnp.int32), axis=1)[:, 0]
  normed_BxD = rms_norm(h_BxD, dparams["final_norm"], cfg.rms_norm_eps)
  logits_BxV = jnp.matmul(normed_BxD, dparams["head_DxV"], preferred_element_type=jnp.float32)
  return logits_BxV, new_caches

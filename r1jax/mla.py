"""Multi-head Latent Attention (DeepSeek-V2 section 2.1, DeepSeek-V3 section 2.1.1).

Keys and values are compressed into one latent c_kv of width C (kv_lora_rank), RMS-normed,
plus a single decoupled RoPE key k_rope of width R shared by all heads. Only (c_kv, k_rope)
need caching: (C + R) numbers per token per layer.

Two ways to attend, equal in exact arithmetic:
  * 'naive': up-project c_kv with W_UKV into per-head keys k_nope [N] and values [A].
  * 'absorbed': fold W_UK into the query (q_lat = q_nope W_UK^T, width C) and W_UV after
    the attention-weighted sum, so attention runs against c_kv and k_rope directly. This is
    the decode path of the reference (`attn_impl == "absorb"`).

Attention is split into `project_kv` (what the cache stores) and `attend` (queries against
any latent sequence under a boolean mask), so the sampler reuses both.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax import rope
from r1jax.layers import ParamSpec, dense, rms_norm

NEG_INF = -1e30  # masked scores (finite, so a fully masked row stays NaN-free)


def param_specs(cfg) -> dict:
  d, h = cfg.hidden_size, cfg.num_attention_heads
  n, r, a, c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
  specs = {}
  if cfg.q_lora_rank > 0:
    q = cfg.q_lora_rank
    specs["wq_a"] = ParamSpec((d, q), ("embed", "q_lora"))
    specs["q_norm"] = ParamSpec((q,), ("q_lora",), "ones")
    specs["wq_b"] = ParamSpec((q, h, n + r), ("q_lora", "heads", "qk_head"))
  else:
    specs["wq"] = ParamSpec((d, h, n + r), ("embed", "heads", "qk_head"))
  specs["wkv_a"] = ParamSpec((d, c + r), ("embed", "kv_lora_rope"))
  specs["kv_norm"] = ParamSpec((c,), ("kv_lora",), "ones")
  specs["wkv_b"] = ParamSpec((c, h, n + a), ("kv_lora", "heads", "kv_head"))
  specs["wo"] = ParamSpec((h, a, d), ("heads", "v_head", "embed"))
  return specs


def project_queries(p: dict, x_BxLxD, positions_BxL, cfg):
  """Returns (q_nope [B, L, H, N], q_rope [B, L, H, R]) with RoPE applied."""
  if cfg.q_lora_rank > 0:
    cq_BxLxQ = rms_norm(dense(x_BxLxD, p["wq_a"]), p["q_norm"], cfg.rms_norm_eps)
    q_BxLxHxK = dense(cq_BxLxQ, p["wq_b"])
  else:
    q_BxLxHxK = dense(x_BxLxD, p["wq"])
  q_nope = q_BxLxHxK[..., :cfg.qk_nope_head_dim]
  q_rope = rope.apply_rope(q_BxLxHxK[..., cfg.qk_nope_head_dim:], positions_BxL, cfg)
  return q_nope, q_rope


def project_kv(p: dict, x_BxLxD, positions_BxL, cfg):
  """Returns the cacheable latents (c_kv [B, L, C] normed, k_rope [B, L, R] rotated)."""
  kv_BxLxCR = dense(x_BxLxD, p["wkv_a"])
  ckv_BxLxC = rms_norm(kv_BxLxCR[..., :cfg.kv_lora_rank], p["kv_norm"], cfg.rms_norm_eps)
  krope_BxLxR = rope.apply_rope(kv_BxLxCR[..., cfg.kv_lora_rank:], positions_BxL, cfg)
  return ckv_BxLxC, krope_BxLxR


def _softmax(scores_BxHxLxS, mask_BxLxS):
  scores = jnp.where(mask_BxLxS[:, None, :, :], scores_BxHxLxS.astype(jnp.float32), NEG_INF)
  return jax.nn.softmax(scores, axis=-1)


def attend(p: dict, q_nope_BxLxHxN, q_rope_BxLxHxR, ckv_BxSxC, krope_BxSxR, mask_BxLxS, cfg,
           impl: str | None = None):
  """Attention of L queries over S latent positions; returns the output [B, L, D]."""
  impl = impl or cfg.attention_impl
  n = cfg.qk_nope_head_dim
  scale = rope.softmax_scale(cfg)
  dtype = q_nope_BxLxHxN.dtype
  rope_scores = jnp.einsum("blhr,bsr->bhls", q_rope_BxLxHxR, krope_BxSxR)
  if impl == "naive":
    kv_BxSxHxK = dense(ckv_BxSxC, p["wkv_b"])
    k_nope_BxSxHxN, v_BxSxHxA = kv_BxSxHxK[..., :n], kv_BxSxHxK[..., n:]
    scores_BxHxLxS = jnp.einsum("blhn,bshn->bhls", q_nope_BxLxHxN, k_nope_BxSxHxN) + rope_scores
    probs = _softmax(scores_BxHxLxS * scale, mask_BxLxS).astype(dtype)
    out_BxLxHxA = jnp.einsum("bhls,bsha->blha", probs, v_BxSxHxA)
  elif impl == "absorbed":
    w_uk_CxHxN, w_uv_CxHxA = p["wkv_b"][..., :n], p["wkv_b"][..., n:]
    q_lat_BxLxHxC = jnp.einsum("blhn,chn->blhc", q_nope_BxLxHxN, w_uk_CxHxN)
    scores_BxHxLxS = jnp.einsum("blhc,bsc->bhls", q_lat_BxLxHxC, ckv_BxSxC) + rope_scores
    probs = _softmax(scores_BxHxLxS * scale, mask_BxLxS).astype(dtype)
    # [B, H, L, C] is the batched-matmul layout of probs @ c_kv; asking XLA:CPU for
    # [B, L, H, C] directly runs a slow generic dot (5x slower at decode shapes).
    o_lat_BxHxLxC = jnp.einsum("bhls,bsc->bhlc", probs, ckv_BxSxC)
    out_BxLxHxA = jnp.einsum("bhlc,cha->blha", o_lat_BxHxLxC, w_uv_CxHxA)
  else:
    raise ValueError(f"unknown attention_impl {impl!r}; expected 'naive' or 'absorbed'")
  return dense(out_BxLxHxA, p["wo"], 2)


def self_attention(p: dict, x_BxLxD, positions_BxL, mask_BxLxS, cfg):
  """Full-sequence MLA (training / teacher forcing): queries and keys from the same x."""
  q_nope, q_rope = project_queries(p, x_BxLxD, positions_BxL, cfg)
  ckv, krope = project_kv(p, x_BxLxD, positions_BxL, cfg)
  return attend(p, q_nope, q_rope, ckv, krope, mask_BxLxS, cfg)

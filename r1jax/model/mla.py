"""Multi-head Latent Attention (DeepSeek-V2 section 2.1, DeepSeek-V3 section 2.1.1).

Keys and values are compressed into one latent c_kv of width C (kv_lora_rank), RMS-normed,
plus a single decoupled RoPE key k_rope of width R shared by all heads. Only the latent
entry kv = [c_kv | k_rope] (Z = C + R numbers per token per layer) needs caching.

Two ways to attend, equal in exact arithmetic:
  * 'naive': up-project c_kv with W_UKV into per-head keys k_nope [N] and values [A].
  * 'absorbed': fold W_UK into the query (q_lat = q_nope W_UK^T, width C), score
    [q_lat | q_rope] against kv directly, and apply W_UV after the attention-weighted sum
    (DeepSeek-V2 appendix C; the reference's `attn_impl == "absorb"`). The rollout engine
    always decodes this way over its latent cache.

One computation serves training, prefill and decode. `compute_layout` turns the stored
weights (one array per HF tensor, with logical axes) into the layout attention runs on:
the query and KV down-projections concatenated into one [D, Q + Z] matmul (they read the
same normed input), W_UK and W_UV transposed for the absorbed products, W_O flattened. The
decoder computes it inside every training step (a concat and transposes, differentiable);
the rollout engine computes it once per set of weights. `project` yields the queries and
the new latent entries, `attend` scores queries against any latent sequence under a
boolean mask, and `attention` does both, optionally writing into a cache.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.model import rope
from r1jax.model.layers import ParamSpec, dense, rms_norm

NEG_INF = -1e30  # masked scores (finite, so a fully masked row stays NaN-free)
ATTENTION_IMPLS = ("naive", "absorbed")


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


def compute_layout(p: dict, cfg) -> dict:
  """The stored attention weights of one layer in the layout `project` / `attend` use."""
  d, n = cfg.hidden_size, cfg.qk_nope_head_dim
  if cfg.q_lora_rank > 0:
    q_in = p["wq_a"]
    out = {"q_norm": p["q_norm"], "wq_b": p["wq_b"].reshape(cfg.q_lora_rank, -1)}
  else:
    q_in = p["wq"].reshape(d, -1)
    out = {}
  out.update({
      "w_in": jnp.concatenate([q_in, p["wkv_a"]], axis=-1),
      "kv_norm": p["kv_norm"],
      "wkv_b": p["wkv_b"],
      "w_uk_HxNxC": jnp.transpose(p["wkv_b"][..., :n], (1, 2, 0)),
      "w_uv_HxCxA": jnp.transpose(p["wkv_b"][..., n:], (1, 0, 2)),
      "wo": p["wo"].reshape(-1, d),
  })
  return out


def project(pl: dict, x_BxLxD, positions_BxL, cfg):
  """(q_nope [B, L, H, N], q_rope [B, L, H, R] rotated, kv [B, L, Z] = [c_kv normed | k_rope
  rotated]) of the normed input x; pl is `compute_layout`'s output."""
  b, l, _ = x_BxLxD.shape
  h, n, r, c = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                cfg.kv_lora_rank)
  in_BxLxI = dense(x_BxLxD, pl["w_in"])
  q_in, kv_in_BxLxZ = in_BxLxI[..., :-(c + r)], in_BxLxI[..., -(c + r):]
  if cfg.q_lora_rank > 0:
    q_in = dense(rms_norm(q_in, pl["q_norm"], cfg.rms_norm_eps), pl["wq_b"])
  q_BxLxHxY = q_in.reshape(b, l, h, n + r)
  q_rope_BxLxHxR = rope.apply_rope(q_BxLxHxY[..., n:], positions_BxL, cfg)
  ckv_BxLxC = rms_norm(kv_in_BxLxZ[..., :c], pl["kv_norm"], cfg.rms_norm_eps)
  krope_BxLxR = rope.apply_rope(kv_in_BxLxZ[..., c:], positions_BxL, cfg)
  return q_BxLxHxY[..., :n], q_rope_BxLxHxR, jnp.concatenate([ckv_BxLxC, krope_BxLxR], axis=-1)


def _probs(scores_BxHxLxS, mask_BxLxS, dtype):
  scores = jnp.where(mask_BxLxS[:, None, :, :], scores_BxHxLxS.astype(jnp.float32), NEG_INF)
  return jax.nn.softmax(scores, axis=-1).astype(dtype)


def attend(pl: dict, q_nope_BxLxHxN, q_rope_BxLxHxR, kv_BxSxZ, mask_BxLxS, cfg, impl: str):
  """Attention of L queries over S latent entries kv [B, S, Z]; returns the output [B, L, D]."""
  b, l = q_nope_BxLxHxN.shape[:2]
  c = cfg.kv_lora_rank
  scale = rope.softmax_scale(cfg)
  dtype = q_nope_BxLxHxN.dtype
  if impl == "naive":
    n = cfg.qk_nope_head_dim
    up = dense(kv_BxSxZ[..., :c], pl["wkv_b"])  # [B, S, H, N + A]
    k_nope_BxSxHxN, v_BxSxHxA = up[..., :n], up[..., n:]
    scores_BxHxLxS = (jnp.einsum("blhn,bshn->bhls", q_nope_BxLxHxN, k_nope_BxSxHxN)
                      + jnp.einsum("blhr,bsr->bhls", q_rope_BxLxHxR, kv_BxSxZ[..., c:]))
    probs_BxHxLxS = _probs(scores_BxHxLxS * scale, mask_BxLxS, dtype)
    out_BxLxHxA = jnp.einsum("bhls,bsha->blha", probs_BxHxLxS, v_BxSxHxA)
  elif impl == "absorbed":
    q_lat_BxLxHxC = jnp.einsum("blhn,hnc->blhc", q_nope_BxLxHxN, pl["w_uk_HxNxC"])
    q_BxLxHxZ = jnp.concatenate([q_lat_BxLxHxC, q_rope_BxLxHxR], axis=-1)
    # These einsum layouts are the ones XLA:CPU runs fastest at decode shapes (L = 1); the
    # weighted sum runs over all Z columns and drops R after (cheaper than slicing kv).
    scores_BxHxLxS = jnp.einsum("blhz,bsz->bhls", q_BxLxHxZ, kv_BxSxZ)
    probs_BxHxLxS = _probs(scores_BxHxLxS * scale, mask_BxLxS, dtype)
    o_lat_BxHxLxC = jnp.einsum("bhls,bsz->bhlz", probs_BxHxLxS, kv_BxSxZ)[..., :c]
    out_BxLxHxA = jnp.einsum("bhlc,hca->blha", o_lat_BxHxLxC, pl["w_uv_HxCxA"])
  else:
    raise ValueError(f"unknown attention_impl {impl!r}; expected one of {ATTENTION_IMPLS}")
  return dense(out_BxLxHxA.reshape(b, l, -1), pl["wo"])


def attention(pl: dict, x_BxLxD, positions_BxL, mask_BxLxS, cfg, impl: str, cache_BxSxZ=None,
              fresh: bool = False):
  """MLA of the normed input x; returns (output [B, L, D], the cache with the new entries).

  Without a cache, queries attend to the L entries of x itself (training, teacher forcing;
  mask [B, L, L]). With one, the new entries are written at slot = position and the queries
  attend to the cache (mask [B, L, S]). fresh=True promises an empty cache and positions
  0..L-1 (a prefill): attention then runs over the L new entries only (mask [B, L, L]).
  """
  q_nope, q_rope, kv_BxLxZ = project(pl, x_BxLxD, positions_BxL, cfg)
  kv = kv_BxLxZ
  if cache_BxSxZ is not None:
    new_BxLxZ = kv_BxLxZ.astype(cache_BxSxZ.dtype)
    rows_Bx1 = jnp.arange(x_BxLxD.shape[0])[:, None]
    cache_BxSxZ = cache_BxSxZ.at[rows_Bx1, positions_BxL].set(new_BxLxZ)
    kv = (new_BxLxZ if fresh else cache_BxSxZ).astype(x_BxLxD.dtype)
  return attend(pl, q_nope, q_rope, kv, mask_BxLxS, cfg, impl), cache_BxSxZ

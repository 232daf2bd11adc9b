"""Grouped-query attention (Ainslie et al. 2023, "GQA"), as Qwen2 and Llama use it.

H query heads share Hkv key/value heads (H / Hkv queries per group; Hkv = H is multi-head
attention), each of size head_dim (Dh). Qwen2 adds biases to the q/k/v projections (not
to o); Llama has none (`attention_bias`). RoPE rotates q and k in HF's rotate_half layout
(rope.apply_rope). The cache holds K and V per KV head: one array [B, S, 2, Hkv, Dh] per
layer (keys at index 0, values at 1), so a rollout keeps 2 * Hkv * Dh numbers per token per
layer against MLA's C + R latent.

Same contract as mla.py: `param_specs` declares the stored weights (one per HF tensor),
`compute_layout` fuses q/k/v into one [D, (H + 2 Hkv) Dh] matmul (they read the same normed
input), and `attention` serves training, prefill and decode, optionally writing into a cache.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.model import config as config_lib
from r1jax.model import rope
from r1jax.model.layers import ParamSpec, dense

NEG_INF = -1e30  # masked scores (finite, so a fully masked row stays NaN-free)


def param_specs(cfg) -> dict:
  d, h, kv, dh = cfg.hidden_size, cfg.num_attention_heads, config_lib.num_kv_heads(cfg), cfg.head_dim
  specs = {"wq": ParamSpec((d, h, dh), ("embed", "heads", "head_dim")),
           "wk": ParamSpec((d, kv, dh), ("embed", "kv_heads", "head_dim")),
           "wv": ParamSpec((d, kv, dh), ("embed", "kv_heads", "head_dim")),
           "wo": ParamSpec((h, dh, d), ("heads", "head_dim", "embed"))}
  if cfg.attention_bias:
    specs["bq"] = ParamSpec((h, dh), ("heads", "head_dim"), "zeros")
    specs["bk"] = ParamSpec((kv, dh), ("kv_heads", "head_dim"), "zeros")
    specs["bv"] = ParamSpec((kv, dh), ("kv_heads", "head_dim"), "zeros")
  return specs


def compute_layout(p: dict, cfg) -> dict:
  """The stored attention weights of one layer in the layout `attention` runs on."""
  d = cfg.hidden_size
  out = {"w_qkv": jnp.concatenate([p["wq"].reshape(d, -1), p["wk"].reshape(d, -1),
                                   p["wv"].reshape(d, -1)], axis=-1),
         "wo": p["wo"].reshape(-1, d)}
  if "bq" in p:
    out["b_qkv"] = jnp.concatenate([p["bq"].reshape(-1), p["bk"].reshape(-1),
                                    p["bv"].reshape(-1)])
  return out


def init_cache(cfg, batch: int, max_len: int, dtype) -> jax.Array:
  """An empty cache [B, max_len, 2, Hkv, Dh] (keys, then values)."""
  return jnp.zeros((batch, max_len, 2, config_lib.num_kv_heads(cfg), cfg.head_dim), dtype)


def project(pl: dict, x_BxLxD, positions_BxL, cfg):
  """(q [B, L, H, Dh] rotated, kv [B, L, 2, Hkv, Dh] = keys rotated and values)."""
  b, l, _ = x_BxLxD.shape
  h, kv, dh = cfg.num_attention_heads, config_lib.num_kv_heads(cfg), cfg.head_dim
  qkv = dense(x_BxLxD, pl["w_qkv"])
  if "b_qkv" in pl:
    qkv = qkv + pl["b_qkv"].astype(qkv.dtype)[None, None, :]
  q_BxLxHxD = rope.apply_rope(qkv[..., :h * dh].reshape(b, l, h, dh), positions_BxL, cfg)
  k_BxLxKxD = rope.apply_rope(qkv[..., h * dh:(h + kv) * dh].reshape(b, l, kv, dh),
                              positions_BxL, cfg)
  v_BxLxKxD = qkv[..., (h + kv) * dh:].reshape(b, l, kv, dh)
  return q_BxLxHxD, jnp.stack([k_BxLxKxD, v_BxLxKxD], axis=2)


def attend(pl: dict, q_BxLxHxD, kv_BxSx2xKxD, mask_BxLxS, cfg):
  """Attention of L queries over S cached keys/values; returns the output [B, L, D]."""
  b, l, h, dh = q_BxLxHxD.shape
  kv = kv_BxSx2xKxD.shape[3]
  q_BxLxKxGxD = q_BxLxHxD.reshape(b, l, kv, h // kv, dh)  # query head i uses KV head i // G
  scores = jnp.einsum("blkgd,bskd->bkgls", q_BxLxKxGxD, kv_BxSx2xKxD[:, :, 0])
  scores = scores.astype(jnp.float32) * rope.softmax_scale(cfg)
  scores = jnp.where(mask_BxLxS[:, None, None, :, :], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(q_BxLxHxD.dtype)
  out_BxLxKxGxD = jnp.einsum("bkgls,bskd->blkgd", probs, kv_BxSx2xKxD[:, :, 1])
  return dense(out_BxLxKxGxD.reshape(b, l, h * dh), pl["wo"])


def attention(pl: dict, x_BxLxD, positions_BxL, mask_BxLxS, cfg, cache=None, fresh: bool = False):
  """GQA of the normed input x; returns (output [B, L, D], the cache with the new entries).

  Cache semantics as `mla.attention`: without one, queries attend to x's own L entries;
  with one [B, S, 2, Hkv, Dh], the new keys/values are written at slot = position and the
  queries attend to the cache; fresh=True (a prefill) attends over the L new entries only.
  """
  q, kv_BxLx2xKxD = project(pl, x_BxLxD, positions_BxL, cfg)
  kv = kv_BxLx2xKxD
  if cache is not None:
    new = kv_BxLx2xKxD.astype(cache.dtype)
    rows_Bx1 = jnp.arange(x_BxLxD.shape[0])[:, None]
    cache = cache.at[rows_Bx1, positions_BxL].set(new)
    kv = (new if fresh else cache).astype(x_BxLxD.dtype)
  return attend(pl, q, kv, mask_BxLxS, cfg), cache

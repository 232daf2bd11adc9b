"""The cached prefill and decode step of the rollout engine: model/'s block over a latent cache.

A decode step multiplies a handful of rows by every weight of the model once, so its cost is
the number of kernels launched and the bytes of weight read, not FLOPs. Two things make it
cheap, and neither is a second copy of the model:
  * `decode_params` computes the weights' compute layout (`decoder.layer_layout`: fused
    projections and SwiGLUs, W_UK / W_UV transposed) once per set of weights rather than once
    per step, and lays the stacked layers out as a list, so each step reads every weight in
    place (a scan over stacked weights slices them out every step);
  * every layer runs `decoder.block` with a cache: absorbed attention over the latent
    entries kv [B, S, Z] = [c_kv | k_rope] (Z = C + R numbers per token per layer,
    DeepSeek-V2 section 2.1.3 and appendix C), and the 'capacity' MoE dispatch, which runs
    expert-major rounds batched over experts (whatever cfg.moe_impl picks for training).
The prefill runs the same code over the prompts. Tests hold both to the full forward's logits.
A GQA model (Qwen2, Llama; cfg.attention_type == 'gqa') runs the same path, its cache
holding keys and values per KV head ([B, S, 2, Hkv, Dh] per layer) instead of the latent.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.model import decoder, gqa
from r1jax.model.layers import rms_norm

DECODE_ATTENTION = "absorbed"
DECODE_DISPATCH = "capacity"


def decode_params(params, cfg) -> dict:
  """The parameters laid out for `decode_layers`, in the compute dtype of `decoder.forward`.

  Compute it once per set of weights (the rollout engine does, outside the jitted rollout)
  and pass it to every rollout with those weights.
  """
  params = decoder.cast_params(params, cfg)
  out = {"embed": params["embed"], "final_norm": params["final_norm"],
         "head_DxV": decoder.output_head(params, cfg), "layers": []}
  for name in ("dense_layers", "moe_layers"):
    if name not in params:
      continue
    n = jax.tree.leaves(params[name])[0].shape[0]
    for i in range(n):
      layer = jax.tree.map(lambda x, i=i: x[i], params[name])
      out["layers"].append(decoder.layer_layout(layer, cfg))
  return out


def init_caches(cfg, batch: int, max_len: int) -> list:
  """Empty per-layer caches in cfg.dtype: MLA kv [B, max_len, Z] (c_kv then k_rope), GQA
  [B, max_len, 2, Hkv, Dh] (keys then values, `gqa.init_cache`)."""
  dtype = jnp.dtype(cfg.dtype)
  if cfg.attention_type == "gqa":
    return [gqa.init_cache(cfg, batch, max_len, dtype) for _ in range(cfg.num_hidden_layers)]
  z = cfg.kv_lora_rank + cfg.qk_rope_head_dim
  return [jnp.zeros((batch, max_len, z), dtype) for _ in range(cfg.num_hidden_layers)]


def decode_layers(dparams: dict, cfg, tokens_BxL, positions_BxL, caches: list, read_B=None,
                  fresh: bool = False, expert_axis=None):
  """L tokens per row through every layer's block, writing their latents into the caches.

  The new latents are written at cache slot = position, and a query at position q attends
  to slots <= q, so stale slots (e.g. a shorter prompt's padding) are overwritten before
  anything reads them. caches: per layer, as `init_caches` makes them.
  Returns (logits [B, V] float32 of the token at column read_B of each row (default the
  last), caches): the prefill reads each prompt's last token, a decode step its only one.
  fresh=True promises empty caches and positions 0..L-1 in every row (a prefill): attention
  then runs over the L new latents only instead of every cache slot.
  expert_axis: the routed experts are split over this mesh axis (see `moe.moe_ffn`).
  """
  b, l = tokens_BxL.shape
  s = caches[0].shape[1]
  keys_S = jnp.arange(l if fresh else s)
  mask_BxLxS = keys_S[None, None, :] <= positions_BxL[:, :, None]
  valid_BxL = jnp.ones((b, l), bool)
  h_BxLxD = dparams["embed"][tokens_BxL]
  new_caches = []
  for p, cache in zip(dparams["layers"], caches):
    h_BxLxD, _, cache = decoder.block(
        p, h_BxLxD, positions_BxL, mask_BxLxS, valid_BxL, cfg, cache=cache, fresh=fresh,
        attention_impl=DECODE_ATTENTION, moe_impl=DECODE_DISPATCH, expert_axis=expert_axis)
    new_caches.append(cache)
  if l == 1:
    h_BxD = h_BxLxD[:, 0]
  else:
    read_B = jnp.full((b,), l - 1, jnp.int32) if read_B is None else read_B
    h_BxD = jnp.take_along_axis(h_BxLxD, read_B[:, None, None].astype(jnp.int32), axis=1)[:, 0]
  normed_BxD = rms_norm(h_BxD, dparams["final_norm"], cfg.rms_norm_eps)
  logits_BxV = jnp.matmul(normed_BxD, dparams["head_DxV"], preferred_element_type=jnp.float32)
  return logits_BxV, new_caches

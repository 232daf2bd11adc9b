"""The DeepSeek-V3 architecture (and the dense GQA family) as pure functions over a dict of arrays.

The config selects the attention (`attention_type`: 'mla' or 'gqa', see gqa.py) and the FFN
(MoE layers after `first_k_dense_replace` dense ones; all dense for Qwen2 / Llama); the
same parameter tree, block, forward and rollout path serve both.

Dimension key (names carry shapes, e.g. `kv_BxSxZ`; one meaning per letter):
  B batch  L sequence  S key / cache positions  T tokens (B*L)  D model dim  H heads  V vocab
  Q q_lora_rank  C kv_lora_rank  N qk_nope_head_dim  R qk_rope_head_dim  A v_head_dim
  Y query/key head (N + R)  Z latent cache entry (C + R)  F FFN hidden (dense or expert)
  (GQA: Hkv key/value heads, Dh head_dim; its cache entry is [2, Hkv, Dh])
  E routed experts  K experts per token  X assignments (T*K)  J expert groups  I experts
  per group  M MoE layers  U tiles  O slots per expert (tile rows, capacity)
  G GRPO group size  P padded prompt width  W rollout row width (prompt + new tokens)

Layout: the first `first_k_dense_replace` layers (dense FFN) and the remaining MoE layers are
stored stacked (leading 'layers' axis) and run with lax.scan, so compile time does not grow
with depth. `param_specs(cfg)` is the single declaration of every parameter's shape and
logical axes; init, the logical-axis tree and the parameter counts read off it.

One block serves training, prefill and decode (`block`): it runs on a layer's weights in
compute layout (`layer_layout`: attention projections and SwiGLUs fused), which `forward`
computes inside every step and the rollout engine once per set of weights; with a cache
it writes the new latents and attends over the cache.

Multi-token prediction (V3 section 2.2): module k (1..mtp_depth) combines the previous
depth's hidden state h^{k-1} at position i with the embedding of token i+k:
h'^k = W_k [RMSNorm(emb(t_{i+k})); RMSNorm(h^{k-1})], runs one transformer block and the
shared output head, predicting token i+k+1. The concatenation order (embedding first)
follows the released checkpoint (`eh_proj`), which is the reverse of the paper's equation.
h^0 is the main model's last hidden state before the final norm.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.model import config as config_lib
from r1jax.model import expert_parallel, gqa, mla, moe
from r1jax.model import moe_pallas  # noqa: F401  registers moe_impl='pallas'
from r1jax.model.layers import (ParamSpec, dense, fuse_swiglu, init_from_specs, is_spec, rms_norm,
                                stack_specs, swiglu, swiglu_specs)

# ---------------------------------------------------------------------------- parameters

def _layer_specs(cfg, kind: str) -> dict:
  d = cfg.hidden_size
  specs = {"attn_norm": ParamSpec((d,), ("embed",), "ones"),
           "attn": _attention(cfg).param_specs(cfg),
           "mlp_norm": ParamSpec((d,), ("embed",), "ones")}
  if kind == "dense":
    specs["mlp"] = swiglu_specs(d, cfg.intermediate_size)
  else:
    specs["moe"] = moe.param_specs(cfg)
  return specs


def _attention(cfg):
  """The attention module the config selects (mla or gqa; same functions, same contract)."""
  return gqa if cfg.attention_type == "gqa" else mla


def _mtp_block_kind(cfg) -> str:
  return "moe" if config_lib.num_moe_layers(cfg) > 0 else "dense"


def param_specs(cfg) -> dict:
  """The tree of ParamSpec declaring every parameter (shapes + logical axes)."""
  d, v = cfg.hidden_size, cfg.vocab_size
  specs = {"embed": ParamSpec((v, d), ("vocab", "embed"))}
  k, m = cfg.first_k_dense_replace, config_lib.num_moe_layers(cfg)
  if k > 0:
    specs["dense_layers"] = stack_specs(_layer_specs(cfg, "dense"), k)
  if m > 0:
    specs["moe_layers"] = stack_specs(_layer_specs(cfg, "moe"), m)
  specs["final_norm"] = ParamSpec((d,), ("embed",), "ones")
  if not cfg.tie_word_embeddings:
    specs["lm_head"] = ParamSpec((d, v), ("embed", "vocab"))
  if cfg.mtp_depth > 0:
    mtp = {"enorm": ParamSpec((d,), ("embed",), "ones"),
           "hnorm": ParamSpec((d,), ("embed",), "ones"),
           "eh_proj": ParamSpec((2 * d, d), ("mtp_concat", "embed")),
           "block": _layer_specs(cfg, _mtp_block_kind(cfg)),
           "final_norm": ParamSpec((d,), ("embed",), "ones")}
    specs["mtp"] = stack_specs(mtp, cfg.mtp_depth, "mtp_layers")
  return specs


def init_params(cfg, key: jax.Array) -> dict:
  """Random parameters (normal(init_std) weights, unit norms, zero router bias)."""
  config_lib.validate_model_config(cfg)
  return init_from_specs(param_specs(cfg), key, cfg.init_std, jnp.dtype(cfg.param_dtype))


def param_axes(cfg) -> dict:
  """Logical axis names of every parameter, a pytree parallel to init_params' output."""
  return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=is_spec)


def param_shapes(cfg) -> dict:
  return jax.tree.map(lambda s: s.shape, param_specs(cfg), is_leaf=is_spec)


def router_biases(params: dict):
  return params["moe_layers"]["moe"]["router"]["bias"] if "moe_layers" in params else None


def with_router_biases(params: dict, bias_MxE) -> dict:
  """Returns params with the MoE layers' correction biases replaced (pure)."""
  if "moe_layers" not in params:
    return params
  new = dict(params)
  layers = dict(new["moe_layers"])
  moe_p = dict(layers["moe"])
  moe_p["router"] = {**moe_p["router"], "bias": bias_MxE}
  layers["moe"] = moe_p
  new["moe_layers"] = layers
  return new


# ---------------------------------------------------------------------------- forward

def layer_layout(p: dict, cfg, fuse_experts: bool = True) -> dict:
  """One layer's stored weights in the layout `block` runs on (see mla / moe compute_layout;
  fuse_experts=False under expert-parallel training, see `moe.moe_ffn`'s mesh)."""
  out = {"attn_norm": p["attn_norm"], "mlp_norm": p["mlp_norm"],
         "attn": _attention(cfg).compute_layout(p["attn"], cfg)}
  if "mlp" in p:
    out["mlp"] = fuse_swiglu(p["mlp"])
  else:
    out["moe"] = moe.compute_layout(p["moe"], fuse_experts)
  return out


def block(p: dict, x_BxLxD, positions_BxL, mask_BxLxS, valid_BxL, cfg, *, cache=None,
          fresh: bool = False, attention_impl: str | None = None, moe_impl: str | None = None,
          expert_axis=None, mesh=None):
  """One pre-norm transformer block over `layer_layout` weights: (x, MoE stats or None, cache).

  cache / fresh: see `mla.attention` (latent cache [B, S, Z]) and `gqa.attention` (per KV
  head [B, S, 2, Hkv, Dh]). attention_impl (MLA only) / moe_impl override the config's (the
  rollout engine decodes absorbed, with the 'capacity' dispatch); expert_axis, mesh: see
  `moe.moe_ffn`.
  """
  h = rms_norm(x_BxLxD, p["attn_norm"], cfg.rms_norm_eps)
  if cfg.attention_type == "gqa":
    y, cache = gqa.attention(p["attn"], h, positions_BxL, mask_BxLxS, cfg, cache, fresh)
  else:
    y, cache = mla.attention(p["attn"], h, positions_BxL, mask_BxLxS, cfg,
                             attention_impl or cfg.attention_impl, cache, fresh)
  x_BxLxD = x_BxLxD + y
  h = rms_norm(x_BxLxD, p["mlp_norm"], cfg.rms_norm_eps)
  if "mlp" in p:
    return x_BxLxD + swiglu(h, p["mlp"]), None, cache
  y, stats = moe.moe_ffn(p["moe"], h, valid_BxL, cfg, impl=moe_impl, expert_axis=expert_axis,
                         mesh=mesh)
  return x_BxLxD + y, stats, cache


def attention_mask(positions_BxL, segment_ids_BxL):
  """Causal within each segment: query i sees key j iff pos_j <= pos_i and same segment."""
  causal = positions_BxL[:, None, :] <= positions_BxL[:, :, None]
  same_segment = segment_ids_BxL[:, None, :] == segment_ids_BxL[:, :, None]
  return causal & same_segment


def positions_from_segments(segment_ids_BxL):
  """Positions restarting at 0 at every segment start (packed sequences)."""
  l = segment_ids_BxL.shape[1]
  idx = jnp.broadcast_to(jnp.arange(l)[None, :], segment_ids_BxL.shape)
  starts = jnp.concatenate([jnp.ones_like(segment_ids_BxL[:, :1], dtype=bool),
                            segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1)
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - start_idx


def cast_params(params, cfg):
  """Floating weights in cfg.dtype, the router kept in float32 (as the reference)."""
  dtype = jnp.dtype(cfg.dtype)
  def cast(path, x):
    x = jnp.asarray(x)   # numpy params (e.g. from hf.load_checkpoint) must index with tracers
    in_router = any(getattr(p, "key", None) == "router" for p in path)
    return x if in_router or not jnp.issubdtype(x.dtype, jnp.floating) else x.astype(dtype)
  return jax.tree_util.tree_map_with_path(cast, params)


def _run_stack(layers_p, h, positions, mask, valid, cfg, mesh=None):
  """lax.scan over stacked layers (compile time flat in depth), or a Python loop when
  cfg.scan_layers is False (faster backward on CPU for shallow models). mesh: see block."""
  def step(carry, layer_p):
    out, stats, _ = block(layer_layout(layer_p, cfg, mesh is None), carry, positions, mask,
                          valid, cfg, mesh=mesh)
    return out, stats
  if cfg.scan_layers:
    return jax.lax.scan(step, h, layers_p)
  n = jax.tree.leaves(layers_p)[0].shape[0]
  all_stats = []
  for i in range(n):
    h, stats = step(h, jax.tree.map(lambda x, i=i: x[i], layers_p))
    all_stats.append(stats)
  if all_stats[0] is None:
    return h, None
  return h, jax.tree.map(lambda *xs: jnp.stack(xs), *all_stats)


def _head(params, h_BxLxD, norm_w, cfg):
  w_DxV = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
  normed = rms_norm(h_BxLxD, norm_w, cfg.rms_norm_eps)
  return dense(normed, w_DxV, preferred_element_type=jnp.float32)


def output_head(params, cfg):
  """The [D, V] output projection (shared by the main model and every MTP module)."""
  return params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]


def forward(params: dict, tokens_BxL, cfg, *, positions=None, segment_ids=None,
            return_hidden: bool = False, compute_logits: bool = True):
  """Logits [B, L, V] (float32) and aux.

  aux: 'tokens_per_expert' [M, E] (valid tokens only), 'dropped_assignments' [M] (routed
  assignments the 'all_to_all' exchange's capacity dropped, see `expert_parallel`),
  'balance_loss' (mean over MoE layers of the sequence-wise loss, without alpha), 'mtp_logits' [mtp_depth, B, L, V] when
  mtp_depth > 0 (module k at position i predicts token i+k+1), and 'hidden' (the
  final-normed hidden state [B, L, D]) when return_hidden. compute_logits=False returns None
  for the logits (callers that project the hidden state in chunks, e.g. GRPO's log-probs).
  segment_ids: 0 marks padding; equal ids attend to each other causally. When positions is
  None they restart at every segment.
  Under `sharding.use_mesh(mesh)` with cfg.moe_exchange != 'none' and the routed experts
  split over the mesh, the routed experts run expert-parallel (`expert_parallel`).
  """
  b, l = tokens_BxL.shape
  if segment_ids is None:
    segment_ids = jnp.ones((b, l), jnp.int32)
  if positions is None:
    positions = positions_from_segments(segment_ids)
  p = cast_params(params, cfg)
  valid_BxL = segment_ids != 0
  mask_BxLxL = attention_mask(positions, segment_ids)
  h = p["embed"][tokens_BxL]
  mesh = expert_parallel.context_mesh(cfg)
  if "dense_layers" in p:
    h, _ = _run_stack(p["dense_layers"], h, positions, mask_BxLxL, valid_BxL, cfg)
  aux = {}
  if "moe_layers" in p:
    h, stats = _run_stack(p["moe_layers"], h, positions, mask_BxLxL, valid_BxL, cfg, mesh)
    aux["tokens_per_expert"] = stats["tokens_per_expert"]
    aux["dropped_assignments"] = stats["dropped_assignments"]
    aux["balance_loss"] = jnp.mean(stats["balance_loss"])
  else:
    aux["balance_loss"] = jnp.zeros((), jnp.float32)
  logits = _head(p, h, p["final_norm"], cfg) if compute_logits else None
  if return_hidden:
    aux["hidden"] = rms_norm(h, p["final_norm"], cfg.rms_norm_eps)
  if cfg.mtp_depth > 0:
    aux["mtp_logits"] = _mtp(p, h, tokens_BxL, positions, mask_BxLxL, valid_BxL, cfg, mesh)
  return logits, aux


def _mtp(p, h_BxLxD, tokens_BxL, positions, mask, valid, cfg, mesh=None):
  """Runs the MTP modules in sequence; returns logits [mtp_depth, B, L, V]."""
  def step(carry, xs):
    h_prev, depth = carry
    mod = xs
    # Token i+depth at position i (depth counts from 1); past the end: token 0, masked in the loss.
    shifted = jnp.roll(tokens_BxL, -depth, axis=1)
    emb = p["embed"][shifted]
    both = jnp.concatenate([rms_norm(emb, mod["enorm"], cfg.rms_norm_eps),
                            rms_norm(h_prev, mod["hnorm"], cfg.rms_norm_eps)], axis=-1)
    h_k = dense(both, mod["eh_proj"])
    h_k, _, _ = block(layer_layout(mod["block"], cfg, mesh is None), h_k, positions, mask,
                      valid, cfg, mesh=mesh)
    return (h_k, depth + 1), _head(p, h_k, mod["final_norm"], cfg)
  _, logits = jax.lax.scan(step, (h_BxLxD, jnp.int32(1)), p["mtp"])
  return logits


def check_tokens(tokens, cfg) -> np.ndarray:
  """Host-side validation: integer ids of rank 2 inside [0, vocab_size)."""
  arr = np.asarray(tokens)
  if arr.ndim != 2:
    raise ValueError(f"tokens must be [batch, length], got shape {arr.shape}")
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
  if arr.size and (arr.min() < 0 or arr.max() >= cfg.vocab_size):
    bad = arr[(arr < 0) | (arr >= cfg.vocab_size)]
    raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}); got {bad[:5].tolist()}")
  return arr


def checked_forward(params, tokens_BxL, cfg, **kwargs):
  """forward() after rejecting out-of-vocabulary ids (jnp indexing would clip them silently)."""
  config_lib.validate_model_config(cfg)
  return forward(params, jnp.asarray(check_tokens(tokens_BxL, cfg)), cfg, **kwargs)


# ---------------------------------------------------------------------------- accounting

def count_params(cfg) -> dict:
  """{'total', 'activated', 'embedding', 'mtp'} parameter counts, shape-only.

  'total' excludes the MTP modules (as V3's 671B does). 'activated' counts the weights one
  token's computation uses: everything except the non-selected routed experts and the
  input embedding table (a lookup reads one row). This is the convention that reproduces
  DeepSeek's published figures best: V2 236B/20.9B (paper: 21B), V3 671.0B/36.6B (37B),
  V2-Lite 15.7B/2.45B (2.4B). Counting the embedding instead gives 21.4B, 37.6B, 2.66B.
  """
  config_lib.validate_model_config(cfg)
  specs = param_specs(cfg)
  mtp = specs.pop("mtp", None)
  def size(tree):
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(tree, is_leaf=is_spec))
  total = size(specs)
  routed = size(specs["moe_layers"]["moe"]["experts"]) if "moe_layers" in specs else 0
  inactive = routed * (1 - cfg.num_experts_per_tok / cfg.n_routed_experts) if routed else 0
  embedding = size(specs["embed"])
  return {"total": total, "activated": int(round(total - inactive - embedding)),
          "embedding": embedding, "mtp": size(mtp) if mtp is not None else 0}


def flops_per_token(cfg, seq_len: int) -> dict:
  """Model FLOPs per token: 2 per activated matmul weight plus causal attention.

  The embedding lookup, norms and the router's elementwise work are not counted. Attention
  (naive form) costs 2 * H * (N + R + A) multiply-adds per visible key; a causal sequence
  sees (L + 1) / 2 keys on average. 'train' is 3x 'forward' (backward = 2x forward).
  """
  counts = count_params(cfg)
  matmul = counts["activated"] - _norm_and_bias_params(cfg)
  if cfg.tie_word_embeddings:  # the tied table is used as the output head
    matmul += counts["embedding"]
  per_layer_attn = 2 * cfg.num_attention_heads * (config_lib.qk_head_dim(cfg)
                                                  + config_lib.v_head_dim(cfg))
  attn = cfg.num_hidden_layers * per_layer_attn * (seq_len + 1) / 2
  fwd = 2 * matmul + attn
  return {"forward": float(fwd), "train": float(3 * fwd)}


def _norm_and_bias_params(cfg) -> int:
  """Parameters that are not matmul weights (norm scales, router and q/k/v biases), MTP excluded."""
  specs = param_specs(cfg)
  specs.pop("mtp", None)
  total = 0
  for path, s in jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]:
    name = getattr(path[-1], "key", "")
    if name.endswith("norm") or name in ("bias", "bq", "bk", "bv"):
      total += int(np.prod(s.shape))
  return total

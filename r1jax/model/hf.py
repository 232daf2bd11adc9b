"""HF safetensors checkpoints <-> r1jax params, for DeepSeek V2 / V3, Qwen2 and Llama layouts.

Why this file exists: researchers start from hub checkpoints (V3, V2-Lite, R1
distills of the same architecture) and want to hand results back in the same
form. It maps HF's config.json onto our model config, streams tensors one at a
time into preallocated stacked arrays, and writes the hub layout back.

Layout facts (checked against transformers' DeepseekV3 and the hub checkpoints):
  * torch `nn.Linear` weights are [out, in]; ours are [in, out] with the head axes
    split out (e.g. kv_b_proj [H*(N+A), C] -> wkv_b [C, H, N+A]).
  * the hub stores routed experts one by one,
    model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight; transformers 5
    fuses them in memory (experts.gate_up_proj [E, 2F, D], experts.down_proj
    [E, D, F]); both are read, the hub layout is written.
  * V3's multi-token-prediction module j sits at model.layers.{num_hidden_layers+j}
    (layer 61 on the hub) with enorm, hnorm, eh_proj, shared_head.norm and copies
    of embed_tokens / shared_head.head (skipped: we share the main ones).
  * q/k RoPE dims are stored in the reference's interleaved order and r1jax
    applies interleaved RoPE, so no permutation is needed.
  * `head_dim` in HF's DeepSeek config equals qk_rope_head_dim; it is not the attention
    head size and is ignored there.
  * Qwen2 / Llama (model_type 'qwen2' / 'llama', R1's distilled students) map onto
    attention_type 'gqa' with a dense FFN in every layer: q/k/v_proj [Hkv*Dh or H*Dh, D]
    (biases [H*Dh] on Qwen2), o_proj [D, H*Dh], mlp.{gate,up,down}_proj; their q/k are
    stored for HF's rotate_half RoPE, which r1jax applies for gqa, so again no permutation.
    head_dim is the attention head size there (Qwen2 omits it: hidden_size / heads). A
    Qwen2 config is written for attention_bias=True, a Llama one otherwise.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

from absl import logging
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from r1jax.model import config as config_lib

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_DEFAULT_SHARD_BYTES = 5 * 1024**3

# HF config.json keys copied one to one onto our config.
_SAME_NAME = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
              "intermediate_size", "moe_intermediate_size", "n_routed_experts",
              "n_shared_experts", "num_experts_per_tok", "first_k_dense_replace",
              "norm_topk_prob", "routed_scaling_factor", "rms_norm_eps",
              "max_position_embeddings", "tie_word_embeddings")
_V2_TOPK_METHODS = ("greedy", "group_limited_greedy")
DENSE_MODEL_TYPES = ("qwen2", "llama")
_DENSE_SAME_NAME = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "intermediate_size", "rms_norm_eps",
                    "max_position_embeddings", "tie_word_embeddings")


# ----------------------------------------------------------------------------
# config.json <-> model config
# ----------------------------------------------------------------------------


def _rope_fields(d: dict) -> dict:
  """RoPE fields from either `rope_scaling` (hub) or `rope_parameters` (transformers 5)."""
  rope = d.get("rope_parameters")
  if rope is None:
    rope = d.get("rope_scaling")
  rope = dict(rope or {})
  theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
  kind = rope.get("rope_type", rope.get("type", "default")) or "default"
  out = {"rope_theta": float(theta)}
  if kind == "default":
    out["rope_scaling_type"] = "none"
    return out
  if kind == "llama3":
    need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    absent = [k for k in need if rope.get(k) is None]
    if absent:
      raise ValueError(f"llama3 rope scaling lacks field(s) {absent}")
    out.update(rope_scaling_type="llama3", llama3_factor=float(rope["factor"]),
               llama3_low_freq_factor=float(rope["low_freq_factor"]),
               llama3_high_freq_factor=float(rope["high_freq_factor"]),
               llama3_original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    return out
  if kind != "yarn":
    raise ValueError(f"rope scaling type {kind!r} is not supported (only 'default', 'yarn' and "
                     "'llama3')")
  if rope.get("attention_factor") is not None:
    raise ValueError("rope 'attention_factor' is not supported: r1jax derives it from mscale and "
                     "mscale_all_dim as DeepSeek does")
  if rope.get("truncate", True) is False:
    raise ValueError("rope 'truncate': false is not supported (DeepSeek's YaRN truncates)")
  if "original_max_position_embeddings" not in rope:
    raise ValueError("yarn rope scaling needs 'original_max_position_embeddings'")
  orig = int(rope["original_max_position_embeddings"])
  factor = rope.get("factor")
  if factor is None:  # HF's rule: the ratio of the post- and pre-YaRN context lengths.
    factor = d["max_position_embeddings"] / orig
  out.update(rope_scaling_type="yarn", yarn_factor=float(factor),
             yarn_original_max_position_embeddings=orig,
             yarn_beta_fast=float(rope.get("beta_fast") or 32.0),
             yarn_beta_slow=float(rope.get("beta_slow") or 1.0),
             yarn_mscale=float(rope.get("mscale") or 0.0),
             yarn_mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0))
  return out


def _routing_fields(d: dict) -> dict:
  """Scoring function and group-limited routing for V3 ('noaux_tc') and V2 configs."""
  model_type = d.get("model_type", "deepseek_v3")
  default_scoring = "softmax" if model_type == "deepseek_v2" else "sigmoid"
  scoring = d.get("scoring_func", default_scoring)
  if scoring not in config_lib.SCORING_FUNCS:
    raise ValueError(f"config.json 'scoring_func' {scoring!r} is not one of "
                     f"{config_lib.SCORING_FUNCS}")
  default_method = "greedy" if model_type == "deepseek_v2" else "noaux_tc"
  method = d.get("topk_method", default_method)
  n_group, topk_group = d.get("n_group") or 1, d.get("topk_group") or 1
  if method == "noaux_tc":
    group_score = "top2_sum"
  elif method == "greedy":
    group_score, n_group, topk_group = "max", 1, 1
  elif method == "group_limited_greedy":
    group_score = "max"
  else:
    raise ValueError(f"config.json 'topk_method' {method!r} is not supported "
                     f"(expected 'noaux_tc' or one of {_V2_TOPK_METHODS})")
  return {"scoring_func": scoring, "group_score": group_score, "n_group": int(n_group),
          "topk_group": int(topk_group)}


def _check_supported(d: dict) -> None:
  if d.get("quantization_config"):
    raise ValueError("quantized checkpoints (config.json 'quantization_config', e.g. V3's fp8 "
                     "blocks) are not supported: dequantize to bfloat16 first")
  if d.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json 'hidden_act' must be 'silu', got {d['hidden_act']!r}")
  if d.get("mlp_bias", False):
    raise ValueError("config.json 'mlp_bias' true is not supported (the SwiGLU FFN has no biases)")
  if d.get("model_type") in DENSE_MODEL_TYPES:
    _check_dense_supported(d)
    return
  if d.get("attention_bias", False):
    raise ValueError("config.json 'attention_bias' true is not supported (DeepSeek has no biases)")
  if d.get("rope_interleave", True) is False:
    raise ValueError("config.json 'rope_interleave' false is not supported: r1jax expects the "
                     "reference's interleaved RoPE layout")
  if d.get("moe_layer_freq", 1) != 1:
    raise ValueError(f"config.json 'moe_layer_freq' must be 1, got {d['moe_layer_freq']!r}")
  kv_heads = d.get("num_key_value_heads")
  if kv_heads is not None and kv_heads != d.get("num_attention_heads"):
    raise ValueError(f"config.json 'num_key_value_heads' ({kv_heads}) must equal "
                     f"'num_attention_heads' ({d.get('num_attention_heads')}) for MLA")


def _check_dense_supported(d: dict) -> None:
  """Qwen2 / Llama fields r1jax does not implement."""
  if d.get("use_sliding_window", False):
    raise ValueError("config.json 'use_sliding_window' true is not supported: r1jax's GQA "
                     "attends over the full context")
  sliding = [t for t in d.get("layer_types") or () if t != "full_attention"]
  if sliding:
    raise ValueError(f"config.json 'layer_types' holds {sorted(set(sliding))}: only "
                     "'full_attention' layers are supported")
  if d["model_type"] == "llama" and d.get("attention_bias", False):
    raise ValueError("config.json 'attention_bias' true is not supported for llama (it adds an "
                     "o_proj bias; r1jax's GQA has q/k/v biases only, as Qwen2)")
  if (d.get("pretraining_tp") or 1) != 1:
    raise ValueError(f"config.json 'pretraining_tp' must be 1, got {d['pretraining_tp']!r}")


def _dense_config_from_hf(d: dict, overrides: dict):
  """Qwen2 / Llama config.json -> a gqa model config with a dense FFN in every layer."""
  missing = [k for k in _DENSE_SAME_NAME[:4] + ("intermediate_size",) if k not in d]
  if missing:
    raise ValueError(f"config.json lacks required field(s) {missing}")
  defaults = config_lib.model_defaults()
  fields = {k: type(defaults[k])(d[k]) for k in _DENSE_SAME_NAME if d.get(k) is not None}
  fields.setdefault("num_key_value_heads", fields["num_attention_heads"])
  head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
  fields.update(attention_type="gqa", head_dim=int(head_dim),
                attention_bias=d["model_type"] == "qwen2",
                first_k_dense_replace=fields["num_hidden_layers"], n_routed_experts=0,
                n_shared_experts=0, mtp_depth=0)
  fields.update(_rope_fields(d))
  if fields["rope_scaling_type"] == "yarn":
    raise ValueError(f"config.json rope scaling 'yarn' is not supported for {d['model_type']!r} "
                     "(only 'default' and 'llama3')")
  fields.update(overrides)
  return config_lib.make_model_config(**fields)


def config_from_hf(hf_config: dict, **overrides):
  """Our model config from an HF config.json dict (then `overrides`).

  model_type 'qwen2' / 'llama': attention_type 'gqa', dense FFN in every layer (see
  `_dense_config_from_hf`). DeepSeek V2/V3 (any other model_type):
  q_lora_rank None -> 0; num_nextn_predict_layers (or num_mtp_layers) -> mtp_depth;
  V2 'greedy' routing -> n_group = topk_group = 1; V2 'group_limited_greedy' ->
  group score 'max'. Raises ValueError for anything r1jax cannot represent.
  """
  d = dict(hf_config)
  _check_supported(d)
  if d.get("model_type") in DENSE_MODEL_TYPES:
    return _dense_config_from_hf(d, overrides)
  missing = [k for k in _SAME_NAME[:8] if k not in d]
  if missing:
    raise ValueError(f"config.json lacks required field(s) {missing}")
  fields = {}
  defaults = config_lib.model_defaults()
  for k in _SAME_NAME:
    if d.get(k) is not None:
      fields[k] = type(defaults[k])(d[k])
  fields["q_lora_rank"] = int(d.get("q_lora_rank") or 0)
  fields["mtp_depth"] = int(d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0)
  fields.update(_rope_fields(d))
  fields.update(_routing_fields(d))
  fields.update(overrides)
  return config_lib.make_model_config(**fields)


def config_to_hf(cfg) -> dict:
  """HF config.json dict (hub spelling: `rope_scaling` + `rope_theta`) for our config.

  Sigmoid scoring is written as DeepseekV3 ('noaux_tc'), softmax as DeepseekV2
  ('greedy' or 'group_limited_greedy'). Raises ValueError for a routing that
  neither HF class expresses.
  """
  config_lib.validate_model_config(cfg)
  if cfg.attention_type == "gqa":
    return _dense_config_to_hf(cfg)
  d = {k: cfg[k] for k in _SAME_NAME}
  if cfg.scoring_func == "sigmoid":
    if cfg.n_group > 1 and cfg.group_score != "top2_sum":
      raise ValueError("HF DeepseekV3 scores groups by the sum of their top-2 experts; "
                       f"group_score {cfg.group_score!r} has no HF spelling")
    d.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
             topk_method="noaux_tc")
  else:
    if cfg.n_group > 1 and cfg.group_score != "max":
      raise ValueError("HF DeepseekV2 scores groups by their max expert; "
                       f"group_score {cfg.group_score!r} has no HF spelling")
    d.update(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2",
             topk_method="greedy" if cfg.n_group == 1 else "group_limited_greedy")
  d.update(scoring_func=cfg.scoring_func, n_group=cfg.n_group, topk_group=cfg.topk_group,
           q_lora_rank=cfg.q_lora_rank or None, num_key_value_heads=cfg.num_attention_heads,
           num_nextn_predict_layers=cfg.mtp_depth, hidden_act="silu", attention_bias=False,
           moe_layer_freq=1, rope_theta=cfg.rope_theta, torch_dtype=cfg.param_dtype)
  if cfg.rope_scaling_type == "yarn":
    rope = {"type": "yarn", "factor": cfg.yarn_factor,
            "original_max_position_embeddings": cfg.yarn_original_max_position_embeddings,
            "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow}
    if cfg.yarn_mscale:
      rope["mscale"] = cfg.yarn_mscale
    if cfg.yarn_mscale_all_dim:
      rope["mscale_all_dim"] = cfg.yarn_mscale_all_dim
    d["rope_scaling"] = rope
  else:
    d["rope_scaling"] = None
  return d


def _dense_config_to_hf(cfg) -> dict:
  """Qwen2 (attention_bias) or Llama config.json for a gqa config with dense FFNs."""
  if not config_lib.is_dense(cfg):
    raise ValueError("attention_type 'gqa' with MoE layers has no HF spelling: set "
                     "first_k_dense_replace = num_hidden_layers")
  d = {k: cfg[k] for k in _DENSE_SAME_NAME}
  d["num_key_value_heads"] = config_lib.num_kv_heads(cfg)
  d.update(head_dim=cfg.head_dim, hidden_act="silu", rope_theta=cfg.rope_theta,
           torch_dtype=cfg.param_dtype, mlp_bias=False)
  if cfg.attention_bias:
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
      raise ValueError(f"Qwen2 derives head_dim as hidden_size / num_attention_heads; head_dim "
                       f"{cfg.head_dim} != {cfg.hidden_size} / {cfg.num_attention_heads}")
    d.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False)
  else:
    d.update(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False)
  if cfg.rope_scaling_type == "llama3":
    d["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.llama3_factor,
                         "low_freq_factor": cfg.llama3_low_freq_factor,
                         "high_freq_factor": cfg.llama3_high_freq_factor,
                         "original_max_position_embeddings":
                             cfg.llama3_original_max_position_embeddings}
  else:
    d["rope_scaling"] = None
  return d


# ----------------------------------------------------------------------------
# The tensor map: one entry per HF tensor (per expert on the hub)
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One hub tensor and the slice of one stacked r1jax leaf it fills.

  kind 'linear': hf is [out, in] with in = prod(shape[:n_in]) and out the rest,
  ours = hf.T.reshape(shape); kind 'copy': ours = hf (vectors, the embedding); kind
  'vector': hf is flat, ours = hf.reshape(shape) (per-head biases).
  """
  name: str
  leaf: tuple[str, ...]
  stack: tuple[int, ...]   # sizes of the leading stacked axes of the leaf
  index: tuple[int, ...]   # this tensor's position along them
  shape: tuple[int, ...]   # the slice's shape in our layout
  kind: str
  n_in: int = 1            # how many leading dims of `shape` form the input axis

  def hf_shape(self) -> tuple[int, ...]:
    if self.kind == "copy":
      return self.shape
    if self.kind == "vector":
      return (int(np.prod(self.shape)),)
    return (int(np.prod(self.shape[self.n_in:])), int(np.prod(self.shape[:self.n_in])))


def _block_entries(cfg, kind: str, prefix: str, leaf: tuple, stack: tuple, index: tuple):
  """Entries for one decoder block ('dense' or 'moe') at HF name `prefix`."""
  d, h = cfg.hidden_size, cfg.num_attention_heads
  n, r, a = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
  q, c = cfg.q_lora_rank, cfg.kv_lora_rank

  def e(name, sub, shape, k="linear", extra=(), n_in=1):
    return _Entry(prefix + name, leaf + sub, stack + tuple(s for s, _ in extra),
                  index + tuple(i for _, i in extra), shape, k, n_in)

  out = [e("input_layernorm.weight", ("attn_norm",), (d,), "copy"),
         e("post_attention_layernorm.weight", ("mlp_norm",), (d,), "copy")]
  at = "self_attn."
  if cfg.attention_type == "gqa":
    kv, dh = config_lib.num_kv_heads(cfg), cfg.head_dim
    out += [e(at + "q_proj.weight", ("attn", "wq"), (d, h, dh)),
            e(at + "k_proj.weight", ("attn", "wk"), (d, kv, dh)),
            e(at + "v_proj.weight", ("attn", "wv"), (d, kv, dh)),
            e(at + "o_proj.weight", ("attn", "wo"), (h, dh, d), n_in=2)]
    if cfg.attention_bias:
      out += [e(at + "q_proj.bias", ("attn", "bq"), (h, dh), "vector"),
              e(at + "k_proj.bias", ("attn", "bk"), (kv, dh), "vector"),
              e(at + "v_proj.bias", ("attn", "bv"), (kv, dh), "vector")]
  elif q:
    out += [e(at + "q_a_proj.weight", ("attn", "wq_a"), (d, q)),
            e(at + "q_a_layernorm.weight", ("attn", "q_norm"), (q,), "copy"),
            e(at + "q_b_proj.weight", ("attn", "wq_b"), (q, h, n + r))]
  else:
    out.append(e(at + "q_proj.weight", ("attn", "wq"), (d, h, n + r)))
  if cfg.attention_type == "mla":
    out += [e(at + "kv_a_proj_with_mqa.weight", ("attn", "wkv_a"), (d, c + r)),
            e(at + "kv_a_layernorm.weight", ("attn", "kv_norm"), (c,), "copy"),
            e(at + "kv_b_proj.weight", ("attn", "wkv_b"), (c, h, n + a)),
            e(at + "o_proj.weight", ("attn", "wo"), (h, a, d), n_in=2)]
  if kind == "dense":
    f = cfg.intermediate_size
    out += [e("mlp.gate_proj.weight", ("mlp", "w_gate"), (d, f)),
            e("mlp.up_proj.weight", ("mlp", "w_up"), (d, f)),
            e("mlp.down_proj.weight", ("mlp", "w_down"), (f, d))]
    return out
  ne, fe = cfg.n_routed_experts, cfg.moe_intermediate_size
  out += [e("mlp.gate.weight", ("moe", "router", "w"), (d, ne)),
          e("mlp.gate.e_score_correction_bias", ("moe", "router", "bias"), (ne,), "copy")]
  for x in range(ne):
    ex = ((ne, x),)
    out += [e(f"mlp.experts.{x}.gate_proj.weight", ("moe", "experts", "w_gate"), (d, fe), extra=ex),
            e(f"mlp.experts.{x}.up_proj.weight", ("moe", "experts", "w_up"), (d, fe), extra=ex),
            e(f"mlp.experts.{x}.down_proj.weight", ("moe", "experts", "w_down"), (fe, d), extra=ex)]
  if cfg.n_shared_experts:
    fs = fe * cfg.n_shared_experts
    out += [e("mlp.shared_experts.gate_proj.weight", ("moe", "shared", "w_gate"), (d, fs)),
            e("mlp.shared_experts.up_proj.weight", ("moe", "shared", "w_up"), (d, fs)),
            e("mlp.shared_experts.down_proj.weight", ("moe", "shared", "w_down"), (fs, d))]
  return out


def _entries(cfg) -> list[_Entry]:
  """Every hub tensor r1jax reads or writes for `cfg`, in a stable order."""
  d, v = cfg.hidden_size, cfg.vocab_size
  k, m, depth = cfg.first_k_dense_replace, config_lib.num_moe_layers(cfg), cfg.mtp_depth
  out = [_Entry("model.embed_tokens.weight", ("embed",), (), (), (v, d), "copy")]
  for i in range(k):
    out += _block_entries(cfg, "dense", f"model.layers.{i}.", ("dense_layers",), (k,), (i,))
  for i in range(m):
    out += _block_entries(cfg, "moe", f"model.layers.{k + i}.", ("moe_layers",), (m,), (i,))
  out.append(_Entry("model.norm.weight", ("final_norm",), (), (), (d,), "copy"))
  if not cfg.tie_word_embeddings:
    out.append(_Entry("lm_head.weight", ("lm_head",), (), (), (d, v), "linear"))
  block_kind = "moe" if m > 0 else "dense"
  for j in range(depth):
    p = f"model.layers.{cfg.num_hidden_layers + j}."
    st, ix = (depth,), (j,)
    out += [_Entry(p + "enorm.weight", ("mtp", "enorm"), st, ix, (d,), "copy"),
            _Entry(p + "hnorm.weight", ("mtp", "hnorm"), st, ix, (d,), "copy"),
            _Entry(p + "eh_proj.weight", ("mtp", "eh_proj"), st, ix, (2 * d, d), "linear"),
            _Entry(p + "shared_head.norm.weight", ("mtp", "final_norm"), st, ix, (d,), "copy")]
    out += _block_entries(cfg, block_kind, p, ("mtp", "block"), st, ix)
  return out


def _mtp_shared_copies(cfg) -> list[str]:
  """MTP tensors the hub stores but r1jax shares with the main model."""
  names = []
  for j in range(cfg.mtp_depth):
    p = f"model.layers.{cfg.num_hidden_layers + j}."
    names += [p + "embed_tokens.weight", p + "shared_head.head.weight"]
  return names


_FUSED = re.compile(r"^(.*)mlp\.experts\.(gate_up_proj|down_proj)$")


def _to_ours(entry: _Entry, t: np.ndarray) -> np.ndarray:
  want = entry.hf_shape()
  if t.shape != want:
    raise ValueError(f"tensor {entry.name!r} has shape {list(t.shape)}, expected {list(want)}")
  if entry.kind == "copy":
    return t
  if entry.kind == "vector":
    return t.reshape(entry.shape)
  return t.T.reshape(entry.shape)


def _to_hf(entry: _Entry, x: np.ndarray) -> np.ndarray:
  if entry.kind == "copy":
    return np.ascontiguousarray(x)
  if entry.kind == "vector":
    return np.ascontiguousarray(x.reshape(entry.hf_shape()))
  return np.ascontiguousarray(x.reshape(entry.hf_shape()[::-1]).T)


def _get(tree: dict, path: tuple):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree: dict, path: tuple, value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _few(names, n: int = 5) -> str:
  names = sorted(names)
  more = f" (and {len(names) - n} more)" if len(names) > n else ""
  return ", ".join(names[:n]) + more


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------


def _shard_files(path: str) -> list[str]:
  index = os.path.join(path, _INDEX)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not weight_map:
      raise ValueError(f"{index} has no 'weight_map'")
    files = sorted(set(weight_map.values()))
  elif os.path.exists(os.path.join(path, _SINGLE)):
    files = [_SINGLE]
  else:
    raise ValueError(f"no {_SINGLE} or {_INDEX} in {path!r}")
  files = [os.path.join(path, f) for f in files]
  absent = [f for f in files if not os.path.exists(f)]
  if absent:
    raise ValueError(f"checkpoint shard(s) listed in the index are missing: {_few(absent)}")
  return files


def _hf_layers_from(names, first: int) -> set[int]:
  """HF layer indices >= `first` among `names` (MTP modules sit after the decoder)."""
  found = set()
  for n in names:
    m = re.match(r"^model\.layers\.(\d+)\.", n)
    if m and int(m.group(1)) >= first:
      found.add(int(m.group(1)))
  return found


def read_config(path: str) -> dict:
  cpath = os.path.join(path, "config.json")
  if not os.path.exists(cpath):
    raise ValueError(f"no config.json in {path!r}")
  with open(cpath) as f:
    return json.load(f)


def load_checkpoint(path: str, **overrides):
  """Reads an HF DeepSeek V2/V3, Qwen2 or Llama checkpoint directory; returns (cfg, params).

  `overrides` are model config fields applied after config.json (e.g.
  moe_impl='ragged', param_dtype='bfloat16', mtp_depth=0 to drop the MTP module:
  stored MTP modules past the requested depth are skipped with a logged note).
  Without an mtp_depth override, MTP modules that config.json names but the checkpoint
  does not hold at all (transformers saves none) are left out with a logged warning.
  Tensors stream one at a time from model.safetensors or the shards named in
  model.safetensors.index.json into preallocated stacked numpy arrays of
  cfg.param_dtype, so host memory holds the checkpoint once. params leaves are
  numpy arrays (place them on devices with jax.device_put and the shardings).
  Raises ValueError naming missing, unexpected, duplicated or misshapen tensors.
  """
  hf_config = read_config(path)
  n_mtp_stored = int(hf_config.get("num_nextn_predict_layers",
                                   hf_config.get("num_mtp_layers", 0)) or 0)
  cfg = config_from_hf(hf_config, **overrides)
  dtype = _NP_DTYPES[cfg.param_dtype]
  entries = _entries(cfg)
  by_name = {e.name: e for e in entries}
  fused = {}  # (prefix of an MoE block) -> its gate/up/down entries, for the fused layout
  for e in entries:
    m = re.match(r"^(.*)mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$", e.name)
    if m:
      fused.setdefault(m.group(1), {}).setdefault(m.group(2), []).append(e)
  skip = set(_mtp_shared_copies(cfg))
  if cfg.tie_word_embeddings:
    skip.add("lm_head.weight")

  params = {}
  for e in entries:
    try:
      _get(params, e.leaf)
    except KeyError:
      _set(params, e.leaf, np.empty(e.stack + e.shape, dtype=dtype))
  filled: set[str] = set()
  unexpected, skipped, dropped_mtp = [], [], []
  first_unused_layer = cfg.num_hidden_layers + cfg.mtp_depth

  def fill(e: _Entry, t: np.ndarray):
    if e.name in filled:
      raise ValueError(f"tensor {e.name!r} appears more than once in the checkpoint")
    _get(params, e.leaf)[e.index] = _to_ours(e, t).astype(dtype, copy=False)
    filled.add(e.name)

  for fname in _shard_files(path):
    with safe_open(fname, framework="numpy") as f:
      for name in f.keys():
        if name in by_name:
          fill(by_name[name], f.get_tensor(name))
        elif name in skip:
          skipped.append(name)
        elif (m := _FUSED.match(name)) and m.group(1) in fused:
          _fill_fused(fused[m.group(1)], m.group(2), f.get_tensor(name), fill)
        elif n_mtp_stored and _hf_layers_from([name], first_unused_layer):
          dropped_mtp.append(name)
        else:
          unexpected.append(name)

  if unexpected:
    raise ValueError(f"{len(unexpected)} unexpected tensor(s) in {path!r}: {_few(unexpected)}")
  missing = [e.name for e in entries if e.name not in filled]
  optional_bias = [n for n in missing if n.endswith("e_score_correction_bias")]
  if optional_bias and cfg.scoring_func == "softmax":  # V2 has no correction bias: zeros.
    for n in optional_bias:
      e = by_name[n]
      _get(params, e.leaf)[e.index] = 0
    missing = [n for n in missing if n not in optional_bias]
  if missing and "mtp_depth" not in overrides:
    kept = _stored_mtp_depth(cfg, filled)
    if kept < cfg.mtp_depth:
      # transformers writes num_nextn_predict_layers=1 but no MTP weights: load without them.
      absent = [n for n in missing if _hf_layers_from([n], cfg.num_hidden_layers + kept)]
      logging.warning("config.json asks for %d MTP module(s) but %s holds no tensor of HF "
                      "layer(s) %s (%d absent, e.g. %s): loading with mtp_depth=%d",
                      cfg.mtp_depth, path, sorted(_hf_layers_from(absent, 0)), len(absent),
                      _few(absent, 2), kept)
      cfg = config_from_hf(hf_config, **{**overrides, "mtp_depth": kept})
      _drop_mtp(params, kept)
      missing = [n for n in missing if n not in absent]
  if missing:
    raise ValueError(_missing_message(cfg, path, missing))
  if skipped:
    logging.info("Skipped %d tensor(s) that duplicate the shared embedding/head: %s",
                 len(skipped), _few(skipped, 2))
  if dropped_mtp:
    layers = sorted(_hf_layers_from(dropped_mtp, first_unused_layer))
    logging.info("mtp_depth=%d: skipped %d tensor(s) of the MTP module(s) at HF layer(s) %s",
                 cfg.mtp_depth, len(dropped_mtp), layers)
  return cfg, params


def _stored_mtp_depth(cfg, filled) -> int:
  """How many leading MTP modules of `cfg` have at least one tensor in `filled`."""
  present = _hf_layers_from(filled, cfg.num_hidden_layers)
  depth = 0
  while depth < cfg.mtp_depth and cfg.num_hidden_layers + depth in present:
    depth += 1
  if present - set(range(cfg.num_hidden_layers, cfg.num_hidden_layers + depth)):
    return cfg.mtp_depth  # a gap between stored modules: not a cleanly absent tail
  return depth


def _drop_mtp(params: dict, depth: int) -> None:
  """Keeps the first `depth` MTP modules of params (none: no 'mtp' entry)."""
  if depth == 0:
    params.pop("mtp", None)
  else:
    params["mtp"] = _map_leaves(params["mtp"], lambda x: x[:depth].copy())


def _map_leaves(tree: dict, fn) -> dict:
  return {k: _map_leaves(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _missing_message(cfg, path: str, missing) -> str:
  """The missing-tensor error, with the override that would match the checkpoint."""
  msg = f"{len(missing)} tensor(s) missing from {path!r}: {_few(missing)}"
  mtp_layers = _hf_layers_from(missing, cfg.num_hidden_layers)
  if all(_hf_layers_from([n], cfg.num_hidden_layers) for n in missing):
    depth = min(mtp_layers) - cfg.num_hidden_layers
    return (msg + f"; they belong to MTP module(s) at HF layer(s) {sorted(mtp_layers)}: pass "
            f"mtp_depth={depth} to load_checkpoint to load the modules before them")
  return (msg + "; the checkpoint holds fewer tensors than its config.json describes: "
          "correct config.json, or pass the fields that match the tensors as overrides "
          "(e.g. load_checkpoint(path, num_hidden_layers=..., n_routed_experts=...))")


def _fill_fused(group: dict, which: str, t: np.ndarray, fill) -> None:
  """Splits transformers 5's fused expert tensors into per-expert hub entries.

  gate_up_proj is [E, 2F, D] (gate rows first, then up); down_proj is [E, D, F].
  """
  if which == "gate_up_proj":
    ne, two_f = len(group["gate"]), 2 * group["gate"][0].shape[-1]
    if t.ndim != 3 or t.shape[:2] != (ne, two_f):
      raise ValueError(f"fused tensor '{group['gate'][0].name.split('experts.')[0]}experts."
                       f"gate_up_proj' has shape {list(t.shape)}, expected [{ne}, {two_f}, D]")
    half = two_f // 2
    for x, (g, u) in enumerate(zip(group["gate"], group["up"])):
      fill(g, t[x, :half])
      fill(u, t[x, half:])
  else:
    if t.ndim != 3 or t.shape[0] != len(group["down"]):
      raise ValueError(f"fused tensor '{group['down'][0].name.split('experts.')[0]}experts."
                       f"down_proj' has shape {list(t.shape)}, expected [{len(group['down'])}, D, F]")
    for x, dn in enumerate(group["down"]):
      fill(dn, t[x])


# ----------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------


def _hf_tensors(cfg, params):
  """Yields (hub name, nbytes, make) for every tensor save_checkpoint writes; make()
  converts that one tensor to the hub layout only when its shard is written."""
  zero_bias = {}  # V2 (softmax) checkpoints carry no correction bias: omit an all-zero one.
  for e in _entries(cfg):
    try:
      leaf = _get(params, e.leaf)
    except KeyError:
      raise ValueError(f"params lack {'/'.join(e.leaf)} (needed for {e.name!r})") from None
    if cfg.scoring_func == "softmax" and e.leaf[-1] == "bias":
      if e.leaf not in zero_bias:
        zero_bias[e.leaf] = not np.any(np.asarray(leaf))
      if zero_bias[e.leaf]:
        continue
    want = e.stack + e.shape
    if tuple(leaf.shape) != want:
      raise ValueError(f"params {'/'.join(e.leaf)} has shape {list(leaf.shape)}, expected "
                       f"{list(want)} for this config")
    n = int(np.prod(e.shape)) * np.dtype(leaf.dtype).itemsize
    yield e.name, n, (lambda e=e, leaf=leaf: _to_hf(e, np.asarray(leaf[e.index])))
  # The hub's V3 MTP module carries its own copies of the embedding and the head.
  embed = params["embed"]
  head_VxD = (lambda: np.asarray(embed)) if cfg.tie_word_embeddings else (
      lambda: np.asarray(params["lm_head"]).T)
  nbytes = int(np.prod(embed.shape)) * np.dtype(embed.dtype).itemsize
  for name in _mtp_shared_copies(cfg):
    if name.endswith("embed_tokens.weight"):
      yield name, nbytes, lambda: np.ascontiguousarray(np.asarray(embed))
    else:
      yield name, nbytes, lambda: np.ascontiguousarray(head_VxD())


def save_checkpoint(cfg, params, path: str, *, max_shard_bytes: int = _DEFAULT_SHARD_BYTES) -> None:
  """Writes `params` as an HF hub-layout checkpoint directory (config.json + safetensors).

  Per-expert tensors, [out, in] weights, config.json with `rope_scaling`. Splits
  into model-0000i-of-0000N.safetensors plus an index when the tensors exceed
  `max_shard_bytes`; holds at most one shard's converted tensors in memory.
  Tensors keep the dtype of params (so load -> save -> load is bit-exact). With
  softmax scoring (V2) an all-zero router bias is omitted, as V2 checkpoints have none.
  """
  hf_config = config_to_hf(cfg)
  plan = list(_hf_tensors(cfg, params))
  shards, size = [[]], 0
  for item in plan:
    if shards[-1] and size + item[1] > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += item[1]
  os.makedirs(path, exist_ok=True)
  for stale in os.listdir(path):
    if stale == _SINGLE or stale == _INDEX or re.match(r"^model-\d+-of-\d+\.safetensors$", stale):
      os.remove(os.path.join(path, stale))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
    f.write("\n")
  if len(shards) == 1:
    save_file({name: make() for name, _, make in shards[0]}, os.path.join(path, _SINGLE),
              metadata={"format": "pt"})
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file({name: make() for name, _, make in shard}, os.path.join(path, fname),
              metadata={"format": "pt"})
    weight_map.update({name: fname for name, _, _ in shard})
  with open(os.path.join(path, _INDEX), "w") as f:
    json.dump({"metadata": {"total_size": sum(n for _, n, _ in plan)},
               "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    f.write("\n")

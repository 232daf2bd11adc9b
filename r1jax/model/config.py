"""Model configuration: the defaults, the validation, and the derived sizes.

A model config is an `ml_collections.ConfigDict`. Field names follow HF's
`DeepseekV3Config` where one exists, so a researcher can read a hub config.json
beside it; the comments give the paper symbol. Every check raises `ValueError`
naming the offending field, because a wrong config that runs is the worst bug.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from pallas_kernels.backends import fit_tiling

from r1jax.model import mla, moe
from r1jax.model import moe_pallas  # registers 'pallas' before validation reads the registry

SCORING_FUNCS = ("sigmoid", "softmax")
GROUP_SCORES = ("top2_sum", "max")
ROPE_SCALING_TYPES = ("none", "yarn")
DTYPES = ("float32", "bfloat16", "float16")


def model_defaults() -> ml_collections.ConfigDict:
  """All model fields with their defaults (a DeepSeek-V3-shaped miniature)."""
  c = ml_collections.ConfigDict()
  c.vocab_size = 256                # V
  c.hidden_size = 64                # D
  c.num_hidden_layers = 2
  c.num_attention_heads = 4         # H
  c.q_lora_rank = 32                # Q; 0 means a full-rank query projection (V2-Lite)
  c.kv_lora_rank = 32               # C (d_c in the V2 paper)
  c.qk_nope_head_dim = 16           # N (d_h)
  c.qk_rope_head_dim = 8            # R (d_h^R), one RoPE key head shared by all heads
  c.v_head_dim = 16                 # A
  c.intermediate_size = 128         # dense FFN hidden size
  c.moe_intermediate_size = 32      # F, per fine-grained expert
  c.n_routed_experts = 8            # E (N_r in the V3 paper)
  c.n_shared_experts = 1            # N_s
  c.num_experts_per_tok = 2         # K (K_r)
  c.n_group = 2                     # M, expert groups (node-limited routing)
  c.topk_group = 1                  # groups kept per token
  c.first_k_dense_replace = 1       # the first k layers use a dense FFN
  c.scoring_func = "sigmoid"        # 'sigmoid' (V3) or 'softmax' (V2)
  c.group_score = "top2_sum"        # 'top2_sum' (V3) or 'max' (V2 group-limited greedy)
  c.norm_topk_prob = True           # normalise the K gate weights to sum 1
  c.routed_scaling_factor = 2.5     # applied after normalisation
  c.seq_aux_alpha = 0.0             # alpha, sequence-wise balance loss weight (0 = off)
  c.rms_norm_eps = 1e-6
  c.rope_theta = 10000.0
  c.max_position_embeddings = 512
  c.rope_scaling_type = "none"      # 'none' or 'yarn'
  c.yarn_factor = 1.0               # s
  c.yarn_original_max_position_embeddings = 512
  c.yarn_beta_fast = 32.0
  c.yarn_beta_slow = 1.0
  c.yarn_mscale = 1.0               # 0 means "not given" (HF semantics)
  c.yarn_mscale_all_dim = 1.0       # 0 means "not given"
  c.mtp_depth = 0                   # D in V3 section 2.2 (0 = off)
  c.mtp_lambda = 0.3                # lambda, MTP loss weight
  c.attention_impl = "naive"        # 'naive' or 'absorbed'
  c.moe_impl = "dense"              # a registered dispatch (moe.DISPATCH_IMPLS): 'dense'
                                    # (oracle), 'ragged', 'grouped', 'capacity', 'pallas';
                                    # or 'auto' (moe.resolve_impl: pallas on one TPU/GPU)
  c.pallas_backend = "auto"         # moe_impl='pallas' kernel: 'auto' (from the platform compiled
                                    # for), 'tpu' (Mosaic) or 'gpu' (Triton); see moe_pallas
  c.pallas_tile_m = 0               # gmm tiles (rows, contracted, output columns);
  c.pallas_tile_k = 0               # 0 = pallas_kernels.default_tiling for the backend
  c.pallas_tile_n = 0               # and compute dtype
  c.scan_layers = True              # lax.scan over layers; False unrolls (shallow CPU models)
  c.param_dtype = "float32"
  c.dtype = "float32"               # compute dtype; the router always runs in float32
  c.init_std = 0.02
  c.tie_word_embeddings = False
  return c


def make_model_config(**overrides) -> ml_collections.ConfigDict:
  """Defaults with `overrides` applied, validated."""
  c = model_defaults()
  for k, v in overrides.items():
    if k not in c:
      raise ValueError(f"unknown model config field {k!r}")
    c[k] = v
  validate_model_config(c)
  return c


def _positive(cfg, *names):
  for n in names:
    v = cfg[n]
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"model config field {n!r} must be positive, got {v!r}")


def validate_model_config(cfg) -> None:
  """Raises ValueError naming the field for any inconsistent model config."""
  defaults = model_defaults()
  for k in defaults:
    if k not in cfg:
      raise ValueError(f"model config is missing field {k!r}")
  _positive(cfg, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "rms_norm_eps", "rope_theta", "max_position_embeddings", "init_std")
  if cfg.qk_rope_head_dim % 2:
    raise ValueError(f"model config field 'qk_rope_head_dim' must be even, got {cfg.qk_rope_head_dim}")
  if cfg.q_lora_rank < 0:
    raise ValueError(f"model config field 'q_lora_rank' must be >= 0 (0 = none), got {cfg.q_lora_rank}")
  if not 0 <= cfg.first_k_dense_replace <= cfg.num_hidden_layers:
    raise ValueError("model config field 'first_k_dense_replace' must be in "
                     f"[0, num_hidden_layers], got {cfg.first_k_dense_replace}")
  if cfg.first_k_dense_replace > 0:
    _positive(cfg, "intermediate_size")
  if num_moe_layers(cfg) > 0 or cfg.mtp_depth > 0:
    _positive(cfg, "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok",
              "n_group", "topk_group", "routed_scaling_factor")
    if cfg.n_shared_experts < 0:
      raise ValueError(f"model config field 'n_shared_experts' must be >= 0, got {cfg.n_shared_experts}")
    if cfg.n_routed_experts % cfg.n_group:
      raise ValueError(f"model config field 'n_routed_experts' ({cfg.n_routed_experts}) must be "
                       f"divisible by 'n_group' ({cfg.n_group})")
    if cfg.topk_group > cfg.n_group:
      raise ValueError(f"model config field 'topk_group' ({cfg.topk_group}) must not exceed "
                       f"'n_group' ({cfg.n_group})")
    kept = cfg.topk_group * (cfg.n_routed_experts // cfg.n_group)
    if cfg.num_experts_per_tok > kept:
      raise ValueError(f"model config field 'num_experts_per_tok' ({cfg.num_experts_per_tok}) exceeds "
                       f"the {kept} experts in the kept groups (topk_group * n_routed_experts / n_group)")
    if cfg.group_score == "top2_sum" and cfg.n_group > 1 and cfg.n_routed_experts // cfg.n_group < 2:
      raise ValueError("model config field 'group_score' is 'top2_sum' but groups hold fewer than 2 "
                       "experts (n_routed_experts / n_group < 2)")
  for field, allowed in (("attention_impl", mla.ATTENTION_IMPLS),
                         ("moe_impl", tuple(sorted(moe.DISPATCH_IMPLS)) + ("auto",)),
                         ("pallas_backend", moe_pallas.PALLAS_BACKENDS),
                         ("scoring_func", SCORING_FUNCS), ("group_score", GROUP_SCORES),
                         ("rope_scaling_type", ROPE_SCALING_TYPES), ("param_dtype", DTYPES),
                         ("dtype", DTYPES)):
    if cfg[field] not in allowed:
      raise ValueError(f"model config field {field!r} must be one of {allowed}, got {cfg[field]!r}")
  _check_pallas_tiles(cfg)
  if cfg.rope_scaling_type == "yarn":
    _positive(cfg, "yarn_factor", "yarn_original_max_position_embeddings", "yarn_beta_fast",
              "yarn_beta_slow")
  if cfg.mtp_depth < 0:
    raise ValueError(f"model config field 'mtp_depth' must be >= 0, got {cfg.mtp_depth}")
  if cfg.seq_aux_alpha < 0:
    raise ValueError(f"model config field 'seq_aux_alpha' must be >= 0, got {cfg.seq_aux_alpha}")


def _check_pallas_tiles(cfg) -> None:
  """Tile fields are >= 0 and legal for every kernel pallas_backend may pick ('auto':
  both), so a bad tile fails here rather than at the first lowering."""
  fields = ("pallas_tile_m", "pallas_tile_k", "pallas_tile_n")
  for n in fields:
    v = cfg[n]
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise ValueError(f"model config field {n!r} must be an int >= 0 (0 = default), got {v!r}")
  backends = ("tpu", "gpu") if cfg.pallas_backend == "auto" else (cfg.pallas_backend,)
  big = 1 << 16  # larger than any tile: the check sees the tile itself, not a shrunk one
  for backend in backends:
    try:
      dtype = jnp.dtype(cfg.dtype)  # numpy alone cannot parse "bfloat16"
      fit_tiling(moe_pallas.tiling(cfg, backend, dtype), big, big, big, backend, dtype)
    except ValueError as err:
      name = dict(zip(("tiling.tm", "tiling.tk", "tiling.tn"), fields))
      field = next((f for t, f in name.items() if t in str(err)), "pallas_tile_m")
      raise ValueError(f"model config field {field!r} is not a legal {backend} tile for dtype "
                       f"{cfg.dtype} (pallas_backend={cfg.pallas_backend!r}): {err}") from None


def num_moe_layers(cfg) -> int:
  return cfg.num_hidden_layers - cfg.first_k_dense_replace


def qk_head_dim(cfg) -> int:
  return cfg.qk_nope_head_dim + cfg.qk_rope_head_dim

"""Model configuration: the defaults, the validation, and the derived sizes.

A model config is an `ml_collections.ConfigDict`. Field names follow HF's
`DeepseekV3Config` (or Qwen2Config / LlamaConfig) where one exists, so a researcher can
read a hub config.json beside it; the comments give the paper symbol.

Two fields select the architecture of the one decoder: `attention_type` ('mla': DeepSeek's
Multi-head Latent Attention, mla.py; 'gqa': grouped-query attention as in Qwen2 / Llama,
gqa.py) and the FFN layout (`first_k_dense_replace` dense layers, then MoE layers; a dense
model such as Qwen2 or Llama sets first_k_dense_replace = num_hidden_layers and
n_routed_experts = 0). Fields of the attention not selected are ignored. Every check raises
`ValueError` naming the offending field, because a wrong config that runs is the worst bug.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from pallas_kernels.backends import fit_tiling

from r1jax.model import expert_parallel, mla, moe
from r1jax.model import moe_pallas  # registers 'pallas' before validation reads the registry

SCORING_FUNCS = ("sigmoid", "softmax")
GROUP_SCORES = ("top2_sum", "max")
ROPE_SCALING_TYPES = ("none", "yarn", "llama3")
ATTENTION_TYPES = ("mla", "gqa")
DTYPES = ("float32", "bfloat16", "float16")


def model_defaults() -> ml_collections.ConfigDict:
  """All model fields with their defaults (a DeepSeek-V3-shaped miniature)."""
  c = ml_collections.ConfigDict()
  c.vocab_size = 256                # V
  c.hidden_size = 64                # D
  c.num_hidden_layers = 2
  c.num_attention_heads = 4         # H
  c.attention_type = "mla"          # 'mla' (DeepSeek) or 'gqa' (grouped-query: Qwen2, Llama)
  c.num_key_value_heads = 0         # gqa: KV heads (divides H; 0 = H, i.e. multi-head)
  c.head_dim = 16                   # gqa: query / key / value head size
  c.attention_bias = False          # gqa: biases on the q/k/v projections (Qwen2), none on o
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
  c.rope_scaling_type = "none"      # 'none', 'yarn' (mla) or 'llama3' (gqa)
  c.yarn_factor = 1.0               # s
  c.yarn_original_max_position_embeddings = 512
  c.yarn_beta_fast = 32.0
  c.yarn_beta_slow = 1.0
  c.yarn_mscale = 1.0               # 0 means "not given" (HF semantics)
  c.yarn_mscale_all_dim = 1.0       # 0 means "not given"
  c.llama3_factor = 8.0             # Llama-3 rope scaling (rope.inv_freq): wavelengths longer
  c.llama3_low_freq_factor = 1.0    # than original / low_freq_factor are divided by factor,
  c.llama3_high_freq_factor = 4.0   # shorter than original / high_freq_factor kept, a smooth
  c.llama3_original_max_position_embeddings = 8192  # blend between
  c.mtp_depth = 0                   # D in V3 section 2.2 (0 = off)
  c.mtp_lambda = 0.3                # lambda, MTP loss weight
  c.attention_impl = "naive"        # mla: 'naive' or 'absorbed' (gqa has one form)
  c.moe_impl = "dense"              # a registered dispatch (moe.DISPATCH_IMPLS): 'dense'
                                    # (oracle), 'ragged', 'grouped', 'capacity', 'pallas';
                                    # or 'auto' (moe.resolve_impl: pallas on one TPU/GPU)
  c.moe_exchange = "none"           # routed experts under a mesh (sharding.use_mesh) with the
                                    # experts split over 'expert' (expert_parallel.py): 'none'
                                    # (jit partitions them), 'gather' (dropless all_gather +
                                    # psum_scatter), 'all_to_all' (fixed capacity, drops past
                                    # it, counted), 'ragged' (dropless ragged_all_to_all)
  c.moe_capacity_factor = 1.25      # 'all_to_all': rows per destination shard are
                                    # ceil(factor * local assignments / expert shards)
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
            "rms_norm_eps", "rope_theta", "max_position_embeddings", "init_std")
  if cfg.attention_type not in ATTENTION_TYPES:
    raise ValueError(f"model config field 'attention_type' must be one of {ATTENTION_TYPES}, "
                     f"got {cfg.attention_type!r}")
  if cfg.attention_type == "mla":
    _check_mla(cfg)
  else:
    _check_gqa(cfg)
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
  if cfg.moe_exchange not in expert_parallel.EXCHANGES:
    raise ValueError(f"model config field 'moe_exchange' must be one of "
                     f"{expert_parallel.EXCHANGES}, got {cfg.moe_exchange!r}")
  cf = cfg.moe_capacity_factor
  if not isinstance(cf, (int, float)) or isinstance(cf, bool) or not cf > 0:
    raise ValueError(f"model config field 'moe_capacity_factor' must be a number > 0, got {cf!r}")
  _check_pallas_tiles(cfg)
  if cfg.rope_scaling_type == "yarn":
    _positive(cfg, "yarn_factor", "yarn_original_max_position_embeddings", "yarn_beta_fast",
              "yarn_beta_slow")
  if cfg.rope_scaling_type == "llama3":
    _positive(cfg, "llama3_factor", "llama3_low_freq_factor", "llama3_high_freq_factor",
              "llama3_original_max_position_embeddings")
    if cfg.llama3_high_freq_factor <= cfg.llama3_low_freq_factor:
      raise ValueError("model config field 'llama3_high_freq_factor' "
                       f"({cfg.llama3_high_freq_factor}) must exceed 'llama3_low_freq_factor' "
                       f"({cfg.llama3_low_freq_factor})")
  if cfg.mtp_depth < 0:
    raise ValueError(f"model config field 'mtp_depth' must be >= 0, got {cfg.mtp_depth}")
  if cfg.seq_aux_alpha < 0:
    raise ValueError(f"model config field 'seq_aux_alpha' must be >= 0, got {cfg.seq_aux_alpha}")


def _check_mla(cfg) -> None:
  _positive(cfg, "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
  if cfg.qk_rope_head_dim % 2:
    raise ValueError(f"model config field 'qk_rope_head_dim' must be even, got {cfg.qk_rope_head_dim}")
  if cfg.q_lora_rank < 0:
    raise ValueError(f"model config field 'q_lora_rank' must be >= 0 (0 = none), got {cfg.q_lora_rank}")
  if cfg.rope_scaling_type == "llama3":
    raise ValueError("model config field 'rope_scaling_type' 'llama3' needs attention_type 'gqa' "
                     "(MLA checkpoints use 'yarn')")
  if cfg.num_key_value_heads not in (0, cfg.num_attention_heads):
    raise ValueError(f"model config field 'num_key_value_heads' ({cfg.num_key_value_heads}) must "
                     "be 0 (or num_attention_heads) with attention_type 'mla' (MLA caches one latent, "
                     "not KV heads)")
  if cfg.attention_bias:
    raise ValueError("model config field 'attention_bias' must be False with attention_type 'mla'")


def _check_gqa(cfg) -> None:
  _positive(cfg, "head_dim")
  if cfg.head_dim % 2:
    raise ValueError(f"model config field 'head_dim' must be even (RoPE pairs), got {cfg.head_dim}")
  kv = cfg.num_key_value_heads
  if not isinstance(kv, int) or isinstance(kv, bool) or kv < 0:
    raise ValueError(f"model config field 'num_key_value_heads' must be an int >= 0, got {kv!r}")
  if cfg.num_attention_heads % num_kv_heads(cfg):
    raise ValueError(f"model config field 'num_key_value_heads' ({kv}) must divide "
                     f"'num_attention_heads' ({cfg.num_attention_heads})")
  if cfg.mtp_depth:
    raise ValueError("model config field 'mtp_depth' must be 0 with attention_type 'gqa' "
                     "(multi-token prediction is DeepSeek-V3's, over MLA)")
  if cfg.rope_scaling_type == "yarn":
    raise ValueError("model config field 'rope_scaling_type' 'yarn' is implemented for "
                     "attention_type 'mla' only (DeepSeek's YaRN); gqa supports 'none' and 'llama3'")


def num_kv_heads(cfg) -> int:
  """KV heads of grouped-query attention (num_key_value_heads, 0 meaning H)."""
  return cfg.num_key_value_heads or cfg.num_attention_heads


def is_dense(cfg) -> bool:
  """Every layer has a dense FFN (no MoE layer, no MTP module)."""
  return num_moe_layers(cfg) == 0 and cfg.mtp_depth == 0


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
  """The size a query and key head are scored over (N + R for MLA, head_dim for GQA)."""
  if cfg.attention_type == "gqa":
    return cfg.head_dim
  return cfg.qk_nope_head_dim + cfg.qk_rope_head_dim


def v_head_dim(cfg) -> int:
  return cfg.head_dim if cfg.attention_type == "gqa" else cfg.v_head_dim

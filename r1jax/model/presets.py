"""Named model configs: released DeepSeek-family shapes and their tiny twins.

Every large model has a tiny twin with the same features (MLA with q-LoRA or not, group-
limited sigmoid or softmax routing, YaRN, dense-first layers, MTP) so tests exercise the
same code paths. The large ones are checked by parameter counts and shape-only init.
Sources: the config.json files of deepseek-ai/DeepSeek-V3, deepseek-ai/DeepSeek-V2-Lite and
moonshotai/Moonlight-16B-A3B on the HF hub.

The dense students of R1's distillation (R1 section 2.4) are GQA models with a dense SwiGLU
FFN in every layer (`_dense`): Qwen2.5 (q/k/v biases) and Llama-3.1 (no biases, Llama-3 rope
scaling). Sources: the config.json files of Qwen/Qwen2.5-{0.5B,1.5B,7B},
Qwen/Qwen2.5-Math-1.5B, deepseek-ai/DeepSeek-R1-Distill-{Qwen-1.5B,Qwen-7B,Llama-8B} and
meta-llama/Llama-3.1-8B on the HF hub.
"""
from __future__ import annotations

import ml_collections

from r1jax.model import config as config_lib


def tiny() -> ml_collections.ConfigDict:
  """Tests: 2 layers (1 dense), 8 experts in 2 groups, q-LoRA, ~0.15M parameters."""
  return config_lib.make_model_config()


def small() -> ml_collections.ConfigDict:
  """CPU-trainable: a few million parameters, V3 features (groups, shared expert, MTP)."""
  return config_lib.make_model_config(
      vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
      q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
      intermediate_size=768, moe_intermediate_size=128, n_routed_experts=16, n_shared_experts=1,
      num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
      max_position_embeddings=1024, mtp_depth=1)


def deepseek_v3() -> ml_collections.ConfigDict:
  """DeepSeek-V3 / R1: 671B total, 37B activated, one MTP module."""
  return config_lib.make_model_config(
      vocab_size=129280, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
      q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
      v_head_dim=128, intermediate_size=18432, moe_intermediate_size=2048,
      n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
      first_k_dense_replace=3, scoring_func="sigmoid", group_score="top2_sum",
      norm_topk_prob=True, routed_scaling_factor=2.5, rope_theta=10000.0,
      max_position_embeddings=163840, rope_scaling_type="yarn", yarn_factor=40.0,
      yarn_original_max_position_embeddings=4096, yarn_beta_fast=32.0, yarn_beta_slow=1.0,
      yarn_mscale=1.0, yarn_mscale_all_dim=1.0, mtp_depth=1, param_dtype="bfloat16",
      dtype="bfloat16")


def deepseek_v2_lite() -> ml_collections.ConfigDict:
  """DeepSeek-V2-Lite: 15.7B total, 2.4B activated, softmax routing, no q-LoRA."""
  return config_lib.make_model_config(
      vocab_size=102400, hidden_size=2048, num_hidden_layers=27, num_attention_heads=16,
      q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
      v_head_dim=128, intermediate_size=10944, moe_intermediate_size=1408,
      n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
      first_k_dense_replace=1, scoring_func="softmax", group_score="max",
      norm_topk_prob=False, routed_scaling_factor=1.0, rope_theta=10000.0,
      max_position_embeddings=163840, rope_scaling_type="yarn", yarn_factor=40.0,
      yarn_original_max_position_embeddings=4096, yarn_beta_fast=32.0, yarn_beta_slow=1.0,
      yarn_mscale=0.707, yarn_mscale_all_dim=0.707, param_dtype="bfloat16", dtype="bfloat16")


def moonlight_16b_a3b() -> ml_collections.ConfigDict:
  """Moonlight-16B-A3B: the V3 architecture at 16B total / 3B activated."""
  return config_lib.make_model_config(
      vocab_size=163840, hidden_size=2048, num_hidden_layers=27, num_attention_heads=16,
      q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
      v_head_dim=128, intermediate_size=11264, moe_intermediate_size=1408,
      n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
      first_k_dense_replace=1, scoring_func="sigmoid", group_score="top2_sum",
      norm_topk_prob=True, routed_scaling_factor=2.446, rope_theta=50000.0,
      max_position_embeddings=8192, param_dtype="bfloat16", dtype="bfloat16")


def tiny_v3() -> ml_collections.ConfigDict:
  """deepseek_v3's tiny twin: YaRN, 4 groups keep 2, 3 layers (1 dense), MTP."""
  return config_lib.make_model_config(
      num_hidden_layers=3, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
      rope_scaling_type="yarn", yarn_factor=4.0, yarn_original_max_position_embeddings=128,
      max_position_embeddings=512, mtp_depth=1)


def tiny_v2_lite() -> ml_collections.ConfigDict:
  """deepseek_v2_lite's tiny twin: softmax routing, no q-LoRA, 2 shared experts."""
  return config_lib.make_model_config(
      q_lora_rank=0, n_shared_experts=2, num_experts_per_tok=3, n_group=1, topk_group=1,
      scoring_func="softmax", group_score="max", norm_topk_prob=False,
      routed_scaling_factor=1.0)


def _dense(**fields) -> ml_collections.ConfigDict:
  """A dense GQA model: every layer a dense SwiGLU FFN, no MoE, no MTP."""
  n = fields["num_hidden_layers"]
  return config_lib.make_model_config(
      attention_type="gqa", first_k_dense_replace=n, n_routed_experts=0, n_shared_experts=0,
      **fields)


def _qwen2(**fields) -> ml_collections.ConfigDict:
  return _dense(attention_bias=True, head_dim=fields.pop("head_dim", 128), rms_norm_eps=1e-6,
                param_dtype="bfloat16", dtype="bfloat16", **fields)


def qwen2_5_0_5b() -> ml_collections.ConfigDict:
  """Qwen2.5-0.5B: 0.49B, 14 heads over 2 KV heads of 64, tied embeddings."""
  return _qwen2(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, head_dim=64, intermediate_size=4864,
                rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True)


def qwen2_5_1_5b() -> ml_collections.ConfigDict:
  """Qwen2.5-1.5B: 1.54B, 12 heads over 2 KV heads, tied embeddings."""
  return _qwen2(vocab_size=151936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                num_key_value_heads=2, intermediate_size=8960, rope_theta=1000000.0,
                max_position_embeddings=131072, tie_word_embeddings=True)


def qwen2_5_7b() -> ml_collections.ConfigDict:
  """Qwen2.5-7B: 7.62B, 28 heads over 4 KV heads, untied embeddings, vocab 152064."""
  return _qwen2(vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, intermediate_size=18944, rope_theta=1000000.0,
                max_position_embeddings=131072, tie_word_embeddings=False)


def qwen2_5_math_1_5b() -> ml_collections.ConfigDict:
  """Qwen2.5-Math-1.5B: Qwen2.5-1.5B's shape with rope theta 10000 and a 4096 context."""
  return _qwen2(vocab_size=151936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                num_key_value_heads=2, intermediate_size=8960, rope_theta=10000.0,
                max_position_embeddings=4096, tie_word_embeddings=True)


def r1_distill_qwen_1_5b() -> ml_collections.ConfigDict:
  """DeepSeek-R1-Distill-Qwen-1.5B: Qwen2.5-Math-1.5B with untied embeddings (1.78B)."""
  return _qwen2(vocab_size=151936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                num_key_value_heads=2, intermediate_size=8960, rope_theta=10000.0,
                max_position_embeddings=131072, tie_word_embeddings=False)


def r1_distill_qwen_7b() -> ml_collections.ConfigDict:
  """DeepSeek-R1-Distill-Qwen-7B: Qwen2.5-Math-7B's shape (7.62B), rope theta 10000."""
  return _qwen2(vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, intermediate_size=18944, rope_theta=10000.0,
                max_position_embeddings=131072, tie_word_embeddings=False)


def llama3_1_8b() -> ml_collections.ConfigDict:
  """Llama-3.1-8B: 8.03B, 32 heads over 8 KV heads, Llama-3 rope scaling (factor 8)."""
  return _dense(vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, intermediate_size=14336, rms_norm_eps=1e-5,
                rope_theta=500000.0, max_position_embeddings=131072, rope_scaling_type="llama3",
                llama3_factor=8.0, llama3_low_freq_factor=1.0, llama3_high_freq_factor=4.0,
                llama3_original_max_position_embeddings=8192, tie_word_embeddings=False,
                param_dtype="bfloat16", dtype="bfloat16")


def r1_distill_llama_8b() -> ml_collections.ConfigDict:
  """DeepSeek-R1-Distill-Llama-8B: Llama-3.1-8B's architecture (8.03B)."""
  return llama3_1_8b()


def tiny_qwen2() -> ml_collections.ConfigDict:
  """The Qwen2.5 / R1-Distill-Qwen twin: GQA 4 heads over 2 KV heads, q/k/v biases, tied."""
  return _dense(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, intermediate_size=128, attention_bias=True,
                rope_theta=1000000.0, tie_word_embeddings=True)


def tiny_llama() -> ml_collections.ConfigDict:
  """The Llama-3.1 / R1-Distill-Llama twin: GQA without biases, Llama-3 rope scaling, untied."""
  return _dense(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, intermediate_size=128, rms_norm_eps=1e-5,
                rope_theta=500000.0, rope_scaling_type="llama3", llama3_factor=8.0,
                llama3_low_freq_factor=1.0, llama3_high_freq_factor=4.0,
                llama3_original_max_position_embeddings=64, tie_word_embeddings=False)


PRESETS = {
    "tiny": tiny, "small": small, "deepseek_v3": deepseek_v3,
    "deepseek_v2_lite": deepseek_v2_lite, "moonlight_16b_a3b": moonlight_16b_a3b,
    "tiny_v3": tiny_v3, "tiny_v2_lite": tiny_v2_lite,
    "qwen2_5_0_5b": qwen2_5_0_5b, "qwen2_5_1_5b": qwen2_5_1_5b, "qwen2_5_7b": qwen2_5_7b,
    "qwen2_5_math_1_5b": qwen2_5_math_1_5b, "r1_distill_qwen_1_5b": r1_distill_qwen_1_5b,
    "r1_distill_qwen_7b": r1_distill_qwen_7b, "llama3_1_8b": llama3_1_8b,
    "r1_distill_llama_8b": r1_distill_llama_8b, "tiny_qwen2": tiny_qwen2,
    "tiny_llama": tiny_llama,
}


def get(name: str, **overrides) -> ml_collections.ConfigDict:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  cfg = PRESETS[name]()
  for k, v in overrides.items():
    if k not in cfg:
      raise ValueError(f"unknown model config field {k!r}")
    cfg[k] = v
  config_lib.validate_model_config(cfg)
  return cfg

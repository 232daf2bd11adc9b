"""The dense GQA family (Qwen2, Llama: R1's distillation students) in the one model code.

Fixtures tests/fixtures/hf_tiny_{qwen2,llama} are tiny seeded HF Qwen2ForCausalLM /
LlamaForCausalLM checkpoints with HF's logits and greedy tokens (make_hf_fixtures.py):
qwen2 has q/k/v biases and tied embeddings, llama untied embeddings, Llama-3 rope scaling
and a sharded checkpoint; both 4 query heads over 2 KV heads.
"""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import sharding
from r1jax.model import config as config_lib
from r1jax.model import decoder, hf, presets, rope
from r1jax.rollout import decode, sampler

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
NAMES = ("qwen2", "llama")
PROMPTS = [[17, 200, 31], [5, 9, 250, 77, 3, 140, 66], [101], [42, 43, 44, 45, 46]]
NEW = 6
TOL = 1e-4

_LOADED, _FORWARD = {}, {}


def _path(name):
  return os.path.join(FIXTURES, f"hf_tiny_{name}")


def _load(name):
  if name not in _LOADED:
    cfg, params = hf.load_checkpoint(_path(name))
    _LOADED[name] = (cfg, jax.tree.map(jnp.asarray, params))
  return _LOADED[name]


def _forward(name):
  if name not in _FORWARD:
    cfg, _ = _load(name)
    _FORWARD[name] = jax.jit(lambda p, t: decoder.forward(p, t, cfg)[0])
  return _FORWARD[name]


def _golden(name):
  return np.load(os.path.join(_path(name), "golden.npz"))


# ---------------------------------------------------------------------------- HF parity

@pytest.mark.parametrize("name", NAMES)
def test_config_maps_to_gqa_dense(name):
  cfg, params = _load(name)
  assert cfg.attention_type == "gqa" and config_lib.is_dense(cfg)
  assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
  assert cfg.attention_bias == (name == "qwen2")
  assert cfg.tie_word_embeddings == (name == "qwen2")
  assert ("lm_head" in params) == (name == "llama")
  assert cfg.rope_scaling_type == ("llama3" if name == "llama" else "none")
  attn = params["dense_layers"]["attn"]
  assert attn["wk"].shape == (2, 64, 2, 16) and attn["wq"].shape == (2, 64, 4, 16)
  assert ("bq" in attn) == (name == "qwen2")


@pytest.mark.parametrize("name", NAMES)
def test_logits_parity(name):
  """Every position's logits within 1e-4 of HF's (float32)."""
  cfg, params = _load(name)
  g = _golden(name)
  got = np.asarray(_forward(name)(params, jnp.asarray(g["tokens_BxL"])))
  err = np.abs(got - g["logits_BxLxV"]).max()
  print(f"{name}: max |logits - HF| = {err:.2e}")
  assert err < TOL


@pytest.mark.parametrize("name", NAMES)
def test_greedy_equals_hf_generate(name):
  cfg, params = _load(name)
  g = _golden(name)
  prompt, want = g["gen_prompt_BxP"], g["gen_ids_BxT"]
  out = sampler.generate(params, cfg, list(prompt), jax.random.key(0),
                         max_new_tokens=want.shape[1] - prompt.shape[1], temperature=0.0)
  np.testing.assert_array_equal(np.asarray(out.tokens), want)


@pytest.mark.parametrize("name", NAMES)
def test_save_then_load_round_trip(name, tmp_path):
  cfg, params = hf.load_checkpoint(_path(name))
  hf.save_checkpoint(cfg, params, str(tmp_path), max_shard_bytes=100_000)
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  conf = hf.read_config(str(tmp_path))
  assert conf["model_type"] == name and conf["num_key_value_heads"] == 2
  cfg2, params2 = hf.load_checkpoint(str(tmp_path))
  assert cfg2.to_dict() == cfg.to_dict()
  assert jax.tree.structure(params) == jax.tree.structure(params2)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  # The written tensors are HF's own: same names and values as the fixture's.
  src, dst = _tensors(_path(name)), _tensors(str(tmp_path))
  assert sorted(src) == sorted(dst)
  for k in src:
    np.testing.assert_array_equal(src[k], dst[k], err_msg=k)


def _tensors(path):
  from safetensors.numpy import load_file
  out = {}
  for f in sorted(os.listdir(path)):
    if f.endswith(".safetensors"):
      out.update(load_file(os.path.join(path, f)))
  return out


@pytest.mark.parametrize("edit,match", [
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(layer_types=["sliding_attention", "full_attention"]), "layer_types"),
    (dict(rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)), "dynamic"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0,
                               original_max_position_embeddings=64)), "yarn"),
    (dict(rope_parameters=dict(rope_type="llama3", rope_theta=1e4, factor=8.0)),
     "low_freq_factor"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
])
def test_unsupported_hf_fields_raise(edit, match):
  conf = {**hf.read_config(_path("qwen2")), **edit}
  with pytest.raises(ValueError, match=match):
    hf.config_from_hf(conf)


def test_llama_attention_bias_raises():
  conf = {**hf.read_config(_path("llama")), "attention_bias": True}
  with pytest.raises(ValueError, match="attention_bias"):
    hf.config_from_hf(conf)


def test_hub_spelling_rope_scaling():
  """Hub Llama-3.1 configs spell `rope_theta` + `rope_scaling`, as config_to_hf writes them."""
  conf = hf.read_config(_path("llama"))
  rope_p = conf.pop("rope_parameters")
  conf["rope_theta"] = rope_p.pop("rope_theta")
  conf["rope_scaling"] = rope_p
  cfg = hf.config_from_hf(conf)
  assert cfg.to_dict() == _load("llama")[0].to_dict()


def test_gradients_reach_every_weight():
  """Training runs through the same forward: every leaf (biases included) gets a gradient."""
  cfg, params = _load("qwen2")
  tokens = jnp.asarray(_golden("qwen2")["tokens_BxL"])

  def loss(p):
    logits = decoder.forward(p, tokens[:, :-1], cfg)[0]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0, path


def test_flops_count_gqa_attention():
  cfg = presets.get("tiny_llama")
  per_layer = 2 * 4 * (16 + 16)  # 2 x H x (key + value head sizes)
  want = 2 * (decoder.count_params(cfg)["activated"] - 5 * 64) + 2 * per_layer * (9 + 1) / 2
  assert decoder.flops_per_token(cfg, 9)["forward"] == want  # 5 norms of D = 64


# ---------------------------------------------------------------------------- RoPE

def test_llama3_inv_freq_matches_formula_by_band():
  """Llama-3 scaling: kept below L / high, divided by factor above L / low, blended between."""
  cfg = presets.get("tiny_llama", rope_theta=10000.0)  # L = 64, factor 8, low 1, high 4
  got = rope.inv_freq(cfg)
  base = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
  wavelen = 2 * math.pi / base
  assert (wavelen < 16).any() and (wavelen > 64).any() and ((wavelen >= 16) & (wavelen <= 64)).any()
  for i, (f, lam) in enumerate(zip(base, wavelen)):
    if lam < 16:
      want = f
    elif lam > 64:
      want = f / 8
    else:
      s = (64 / lam - 1) / (4 - 1)
      want = (1 - s) * f / 8 + s * f
    np.testing.assert_allclose(got[i], want, rtol=1e-6, err_msg=f"dim pair {i}")


def test_llama3_inv_freq_matches_transformers():
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  conf = transformers.LlamaConfig(**{k: v for k, v in hf.read_config(_path("llama")).items()
                                     if k not in ("architectures", "transformers_version")})
  want, factor = ROPE_INIT_FUNCTIONS["llama3"](conf, "cpu")
  np.testing.assert_allclose(rope.inv_freq(_load("llama")[0]), want.numpy(), rtol=1e-6)
  assert factor == 1.0 == rope.attention_factor(_load("llama")[0])


def test_rotate_half_layout_by_hand():
  """GQA rotates x[i] with x[i + d/2] (HF's rotate_half), not adjacent pairs."""
  cfg = presets.get("tiny_qwen2", head_dim=4, num_attention_heads=1, num_key_value_heads=1,
                    hidden_size=4, rope_theta=100.0)
  x = jnp.asarray([[[1.0, 2.0, 3.0, 4.0]]])
  pos = jnp.asarray([[3]])
  got = np.asarray(rope.apply_rope(x, pos, cfg))[0, 0]
  a0, a1 = 3 * 1.0, 3 * 100.0 ** -0.5
  want = [1 * math.cos(a0) - 3 * math.sin(a0), 2 * math.cos(a1) - 4 * math.sin(a1),
          3 * math.cos(a0) + 1 * math.sin(a0), 4 * math.cos(a1) + 2 * math.sin(a1)]
  np.testing.assert_allclose(got, want, rtol=1e-5)


# ---------------------------------------------------------------------------- rollout

def test_greedy_equals_teacher_forced_argmax():
  cfg, params = _load("qwen2")
  out = sampler.generate(params, cfg, PROMPTS, jax.random.key(0), max_new_tokens=NEW,
                         temperature=0.0)
  tokens = np.asarray(out.tokens)
  logits = np.asarray(_forward("qwen2")(params, jnp.asarray(tokens)))
  for b, p in enumerate(PROMPTS):
    n = len(p)
    np.testing.assert_array_equal(tokens[b, :n], p)
    np.testing.assert_array_equal(tokens[b, n:n + NEW], logits[b, n - 1:n + NEW - 1].argmax(-1))


@pytest.mark.parametrize("name", NAMES)
def test_prefill_then_decode_equals_full_forward(name):
  cfg, params = _load(name)
  seq_BxL = np.random.default_rng(0).integers(2, cfg.vocab_size, (2, 12)).astype(np.int32)
  lengths = np.array([3, 7], np.int32)
  n_steps = 5
  full = np.asarray(_forward(name)(params, jnp.asarray(seq_BxL)))
  prompt_BxP, lens = sampler.pad_prompts([seq_BxL[0, :3], seq_BxL[1, :7]], bucket=8)
  dparams = jax.jit(lambda p: decode.decode_params(p, cfg))(params)
  logits, caches = jax.jit(lambda p, t, n: sampler.prefill(p, cfg, t, n, 8 + n_steps))(
      dparams, jnp.asarray(prompt_BxP), jnp.asarray(lens))
  assert all(c.shape == (2, 8 + n_steps, 2, 2, 16) for c in caches)  # [B, S, k|v, Hkv, Dh]
  rows = np.arange(2)
  np.testing.assert_allclose(np.asarray(logits), full[rows, lengths - 1], atol=TOL, rtol=TOL)
  step = jax.jit(lambda p, t, pos, c: decode.decode_layers(p, cfg, t[:, None], pos[:, None], c))
  for i in range(n_steps):
    pos = lengths + i
    logits, caches = step(dparams, jnp.asarray(seq_BxL[rows, pos]), jnp.asarray(pos), caches)
    np.testing.assert_allclose(np.asarray(logits), full[rows, pos], atol=TOL, rtol=TOL)


def test_cache_bytes_per_token():
  cfg, _ = _load("qwen2")
  per_token = sampler.cache_bytes_per_token(cfg)
  assert per_token["cache"] == 2 * 2 * 2 * 16 * 4  # layers x (k, v) x Hkv x Dh x float32
  assert per_token["mha"] == 2 * 2 * 4 * 16 * 4
  assert per_token["ratio"] == 2.0


def test_sampled_logprobs_equal_forward_recompute():
  cfg, params = _load("llama")
  out = sampler.generate(params, cfg, PROMPTS, jax.random.key(3), max_new_tokens=NEW,
                         temperature=0.7, top_k=20, top_p=0.9)
  tokens = np.asarray(out.tokens)
  logp = np.asarray(jax.nn.log_softmax(_forward("llama")(params, jnp.asarray(tokens)), axis=-1))
  mask = np.asarray(out.completion_mask)
  got = np.asarray(out.logprobs)
  for b in range(len(PROMPTS)):
    cols = np.nonzero(mask[b])[0]
    np.testing.assert_allclose(got[b, cols], logp[b, cols - 1, tokens[b, cols]], atol=TOL)


@pytest.mark.parametrize("axes", [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 8}])
def test_sharded_rollout_equals_unsharded(axes):
  """Heads and KV heads split over 'tensor' (one partitioned program), or one rollout per shard."""
  cfg, params = _load("qwen2")
  mesh = sharding.make_mesh(axes)
  assert (sampler.Sampler(cfg, mesh).plan is None) == ("tensor" in axes)
  prompts = (PROMPTS * 2)[:8]
  keys = jax.random.split(jax.random.key(1), 8)
  ref = sampler.generate(params, cfg, prompts, keys, max_new_tokens=NEW)
  out = sampler.generate(params, cfg, prompts, keys, max_new_tokens=NEW, mesh=mesh,
                         prompt_bucket=1)
  np.testing.assert_array_equal(np.asarray(ref.tokens), np.asarray(out.tokens))
  np.testing.assert_allclose(np.asarray(ref.logprobs), np.asarray(out.logprobs), atol=1e-5)


def test_kv_heads_shard_over_tensor():
  cfg = presets.get("tiny_qwen2")
  mesh = sharding.make_mesh({"data": 4, "tensor": 2})
  shd = sharding.param_shardings(cfg, mesh)
  attn = shd["dense_layers"]["attn"]
  assert tuple(attn["wk"].spec) == (None, None, "tensor", None)  # [layers, D, Hkv, Dh]
  assert tuple(attn["bq"].spec) == (None, "tensor", None)
  assert tuple(attn["wo"].spec)[:2] == (None, "tensor")


# ---------------------------------------------------------------------------- config, presets

@pytest.mark.parametrize("overrides,field", [
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(head_dim=15), "head_dim"),
    (dict(attention_type="mqa"), "attention_type"),
    (dict(rope_scaling_type="yarn"), "rope_scaling_type"),
    (dict(llama3_high_freq_factor=0.5, rope_scaling_type="llama3"), "llama3_high_freq_factor"),
    (dict(mtp_depth=1), "mtp_depth"),
    (dict(first_k_dense_replace=1), "n_routed_experts"),  # MoE layers need experts
])
def test_gqa_config_validation(overrides, field):
  with pytest.raises(ValueError, match=field):
    presets.get("tiny_qwen2", **overrides)


def test_mla_rejects_gqa_fields():
  with pytest.raises(ValueError, match="num_key_value_heads"):
    presets.get("tiny", num_key_value_heads=2)
  with pytest.raises(ValueError, match="attention_bias"):
    presets.get("tiny", attention_bias=True)
  with pytest.raises(ValueError, match="llama3"):
    presets.get("tiny", rope_scaling_type="llama3")


# Published sizes: the "Number of Parameters" on the Qwen2.5 model cards (Qwen/Qwen2.5-0.5B:
# 0.49B, -1.5B: 1.54B, -7B: 7.61B; Qwen2.5-Math-1.5B shares 1.5B's shape) and the hub's
# safetensors parameter counts for deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (1.78B),
# -Qwen-7B (7.62B), -Llama-8B (8.03B) and meta-llama/Llama-3.1-8B (8.03B).
PUBLISHED = {"qwen2_5_0_5b": 0.49e9, "qwen2_5_1_5b": 1.54e9, "qwen2_5_7b": 7.61e9,
             "qwen2_5_math_1_5b": 1.54e9, "r1_distill_qwen_1_5b": 1.78e9,
             "r1_distill_qwen_7b": 7.62e9, "llama3_1_8b": 8.03e9, "r1_distill_llama_8b": 8.03e9}
TWINS = {"qwen2_5_0_5b": "tiny_qwen2", "qwen2_5_1_5b": "tiny_qwen2", "qwen2_5_7b": "tiny_qwen2",
         "qwen2_5_math_1_5b": "tiny_qwen2", "r1_distill_qwen_1_5b": "tiny_qwen2",
         "r1_distill_qwen_7b": "tiny_qwen2", "llama3_1_8b": "tiny_llama",
         "r1_distill_llama_8b": "tiny_llama"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_counts_match_published(name):
  cfg = presets.get(name)
  total = decoder.count_params(cfg)["total"]
  assert abs(total - PUBLISHED[name]) / PUBLISHED[name] < 0.01, total
  twin = presets.get(TWINS[name])
  for field in ("attention_type", "attention_bias", "rope_scaling_type"):
    assert twin[field] == cfg[field], field
  assert config_lib.is_dense(twin) and config_lib.is_dense(cfg)
  assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
  assert cfg.num_key_value_heads < cfg.num_attention_heads


def test_qwen2_5_0_5b_count_by_hand():
  """24 layers x (q/k/v/o with biases + SwiGLU + 2 norms) + tied embedding + final norm."""
  d, f, v, h, kv, dh = 896, 4864, 151936, 14, 2, 64
  layer = d * h * dh + 2 * d * kv * dh + h * dh * d + h * dh + 2 * kv * dh + 3 * d * f + 2 * d
  assert decoder.count_params(presets.get("qwen2_5_0_5b"))["total"] == 24 * layer + v * d + d


def test_large_preset_shape_only_init():
  cfg = presets.get("llama3_1_8b")
  shapes = jax.eval_shape(lambda k: decoder.init_params(cfg, k), jax.random.key(0))
  assert shapes["dense_layers"]["attn"]["wk"].shape == (32, 4096, 8, 128)
  assert shapes["lm_head"].shape == (4096, 128256)
  assert "moe_layers" not in shapes


def test_hf_config_written_for_presets():
  d = hf.config_to_hf(presets.get("r1_distill_qwen_1_5b"))
  assert d["model_type"] == "qwen2" and d["tie_word_embeddings"] is False
  d = hf.config_to_hf(presets.get("llama3_1_8b"))
  assert d["model_type"] == "llama" and d["rope_scaling"]["rope_type"] == "llama3"
  back = hf.config_from_hf(json.loads(json.dumps(d)), param_dtype="bfloat16", dtype="bfloat16")
  assert back.to_dict() == presets.get("llama3_1_8b").to_dict()

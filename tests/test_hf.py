"""HF checkpoint parity and the reader/writer's contract (r1jax/model/hf.py).

The fixtures in tests/fixtures/hf_tiny_* are tiny seeded HF DeepseekV3ForCausalLM
checkpoints with HF's own logits (tests/fixtures/make_hf_fixtures.py writes them).
Run `pytest tests/test_hf.py -s -k parity` to see the measured max errors.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from r1jax.model import decoder
from r1jax.model import hf

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
NAMES = ("v3", "noq", "yarn", "v2")
IMPLS = [(m, a) for m in ("dense", "ragged") for a in ("naive", "absorbed")]
TOL = 1e-4


def _fixture(name: str) -> str:
  return os.path.join(FIXTURES, f"hf_tiny_{name}")


def _golden(name: str):
  return np.load(os.path.join(_fixture(name), "golden.npz"))


def _read_tensors(path: str) -> dict[str, np.ndarray]:
  out = {}
  for fname in sorted(os.listdir(path)):
    if fname.endswith(".safetensors"):
      with safe_open(os.path.join(path, fname), framework="numpy") as f:
        for k in f.keys():
          out[k] = f.get_tensor(k)
  return out


def _write_variant(src: str, dst: str, tensors: dict, config_edit=None) -> str:
  """A single-file copy of checkpoint `src` with `tensors` and an edited config.json."""
  os.makedirs(dst, exist_ok=True)
  save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  conf = hf.read_config(src)
  if config_edit:
    conf = config_edit(conf)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(conf, f)
  return dst


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


def _assert_params_identical(a: dict, b: dict):
  fa, fb = _flat(a), _flat(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert fa[k].dtype == fb[k].dtype, k
    assert np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])), k


# ---------------------------------------------------------------------------- logits parity

_JITTED = {}
_MAX_ERRORS = {}


def _forward_fn(name: str, moe_impl: str, attention_impl: str):
  """One jitted forward per (fixture, impls); shared by every test in this module."""
  key = (name, moe_impl, attention_impl)
  if key not in _JITTED:
    cfg, params = hf.load_checkpoint(_fixture(name), moe_impl=moe_impl,
                                     attention_impl=attention_impl)
    fn = jax.jit(lambda p, t: decoder.forward(p, t, cfg)[0])
    _JITTED[key] = (cfg, params, fn)
  return _JITTED[key]


@pytest.mark.parametrize("moe_impl,attention_impl", IMPLS)
@pytest.mark.parametrize("name", NAMES)
def test_logits_parity_with_hf(name, moe_impl, attention_impl):
  g = _golden(name)
  _, params, fn = _forward_fn(name, moe_impl, attention_impl)
  logits = np.asarray(fn(params, jnp.asarray(g["tokens_BxL"])))
  want = g["logits_BxLxV"]
  assert logits.shape == want.shape
  err = float(np.abs(logits - want).max())
  _MAX_ERRORS[(name, moe_impl, attention_impl)] = err
  print(f"\nHF parity {name:5s} moe={moe_impl:6s} attention={attention_impl:8s} "
        f"max|logits - HF| = {err:.2e}")
  assert err <= TOL, f"max abs logits error {err} > {TOL}"


def test_fixtures_are_sensitive_to_router_bias_and_norms():
  """Zeroing the correction bias or the RMSNorm weights moves the logits far past TOL,
  so the parity tests above really check that those tensors are applied."""
  g = _golden("v3")
  _, params, fn = _forward_fn("v3", "dense", "naive")
  tokens = jnp.asarray(g["tokens_BxL"])
  base = np.asarray(fn(params, tokens))
  no_bias = jax.tree.map(lambda x: x, params)
  no_bias["moe_layers"]["moe"]["router"] = dict(params["moe_layers"]["moe"]["router"])
  no_bias["moe_layers"]["moe"]["router"]["bias"] = np.zeros_like(
      params["moe_layers"]["moe"]["router"]["bias"])
  assert np.abs(np.asarray(fn(no_bias, tokens)) - base).max() > 100 * TOL
  unit_norm = dict(params, final_norm=np.ones_like(params["final_norm"]))
  assert np.abs(np.asarray(fn(unit_norm, tokens)) - base).max() > 100 * TOL


@pytest.mark.parametrize("name,change", [
    ("yarn", dict(yarn_mscale=0.6)),             # HF's cos/sin attention factor becomes 1
    ("v3", dict(rope_scaling_type="none")),      # YaRN frequencies
    ("v3", dict(n_group=1, topk_group=1)),       # V3 group-limited routing
    ("v2", dict(n_group=1, topk_group=1)),       # V2 group-limited greedy
    ("noq", dict(norm_topk_prob=True)),          # gate normalisation
])
def test_fixtures_are_sensitive_to_config(name, change):
  """Each fixture setting changes HF's logits by far more than TOL, so matching them
  at TOL means our model implements that setting as HF does."""
  cfg, params = hf.load_checkpoint(_fixture(name), **change)
  g = _golden(name)
  logits = jax.jit(lambda p, t: decoder.forward(p, t, cfg)[0])(params, jnp.asarray(g["tokens_BxL"]))
  assert np.abs(np.asarray(logits) - g["logits_BxLxV"]).max() > 100 * TOL


# ---------------------------------------------------------------------------- layout

@pytest.mark.parametrize("name", NAMES)
def test_loaded_params_match_model_layout(name):
  cfg, params = hf.load_checkpoint(_fixture(name))
  got = {k: tuple(v.shape) for k, v in _flat(params).items()}
  want = {k: tuple(v) for k, v in _flat(decoder.param_shapes(cfg)).items()}
  assert got == want
  assert all(v.dtype == np.float32 for v in _flat(params).values())


def test_weight_orientation_against_raw_tensors():
  """Spot checks of the [out, in] -> [in, out] mapping and the head-axis splits."""
  raw = _read_tensors(_fixture("v3"))
  cfg, p = hf.load_checkpoint(_fixture("v3"))
  h, n, a = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
  assert cfg.first_k_dense_replace == 1 and cfg.q_lora_rank == 32
  kv_b = raw["model.layers.1.self_attn.kv_b_proj.weight"]  # [H*(N+A), C]
  np.testing.assert_array_equal(p["moe_layers"]["attn"]["wkv_b"][0, :, 2, n + 3],
                                kv_b[2 * (n + a) + n + 3])
  o = raw["model.layers.0.self_attn.o_proj.weight"]  # [D, H*A]
  np.testing.assert_array_equal(p["dense_layers"]["attn"]["wo"][0, 3, 5], o[:, 3 * a + 5])
  down = raw["model.layers.1.mlp.experts.6.down_proj.weight"]  # [D, F]
  np.testing.assert_array_equal(p["moe_layers"]["moe"]["experts"]["w_down"][0, 6], down.T)
  np.testing.assert_array_equal(p["moe_layers"]["moe"]["router"]["bias"][0],
                                raw["model.layers.1.mlp.gate.e_score_correction_bias"])
  np.testing.assert_array_equal(p["lm_head"], raw["lm_head.weight"].T)
  assert h == 4


def test_tied_embeddings_have_no_lm_head():
  cfg, params = hf.load_checkpoint(_fixture("noq"))
  assert cfg.tie_word_embeddings and "lm_head" not in params
  assert cfg.q_lora_rank == 0 and "wq" in params["dense_layers"]["attn"]


# ---------------------------------------------------------------------------- MTP

def test_mtp_module_loads_into_params_mtp():
  raw = _read_tensors(_fixture("v3"))
  cfg, params = hf.load_checkpoint(_fixture("v3"))
  assert cfg.mtp_depth == 1 and cfg.num_hidden_layers == 2
  mtp = params["mtp"]
  np.testing.assert_array_equal(mtp["eh_proj"][0], raw["model.layers.2.eh_proj.weight"].T)
  np.testing.assert_array_equal(mtp["enorm"][0], raw["model.layers.2.enorm.weight"])
  np.testing.assert_array_equal(mtp["final_norm"][0], raw["model.layers.2.shared_head.norm.weight"])
  np.testing.assert_array_equal(mtp["block"]["moe"]["experts"]["w_up"][0, 3],
                                raw["model.layers.2.mlp.experts.3.up_proj.weight"].T)
  logits, aux = jax.jit(lambda p, t: decoder.forward(p, t, cfg))(
      params, jnp.asarray(_golden("v3")["tokens_BxL"]))
  assert aux["mtp_logits"].shape == (1,) + logits.shape


def test_mtp_depth_zero_skips_the_module(caplog):
  with caplog.at_level(logging.INFO):
    cfg0, p0 = hf.load_checkpoint(_fixture("v3"), mtp_depth=0)
  assert "mtp_depth=0: skipped" in caplog.text and "layer(s) [2]" in caplog.text
  _, p1 = hf.load_checkpoint(_fixture("v3"))
  assert cfg0.mtp_depth == 0 and "mtp" not in p0
  p1.pop("mtp")
  _assert_params_identical(p0, p1)


def test_asking_for_more_mtp_depth_than_stored_names_the_missing_tensors():
  with pytest.raises(ValueError, match=r"missing.*model\.layers\.3\."):
    hf.load_checkpoint(_fixture("v3"), mtp_depth=2)


def _without_mtp(tmp_path, drop=()) -> str:
  """The v3 fixture as transformers saves it: num_nextn_predict_layers 1, no MTP tensors."""
  raw = {k: v for k, v in _read_tensors(_fixture("v3")).items()
         if not k.startswith("model.layers.2.") and k not in drop}
  return _write_variant(_fixture("v3"), str(tmp_path / "no_mtp"), raw)


def test_checkpoint_without_its_mtp_module_loads_without_it(tmp_path, caplog):
  path = _without_mtp(tmp_path)
  assert hf.read_config(path)["num_nextn_predict_layers"] == 1
  with caplog.at_level(logging.WARNING):
    cfg, params = hf.load_checkpoint(path)
  assert "no tensor of HF layer(s) [2]" in caplog.text and "mtp_depth=0" in caplog.text
  assert "model.layers.2.eh_proj.weight" in caplog.text
  cfg0, want = hf.load_checkpoint(_fixture("v3"), mtp_depth=0)
  assert cfg.to_dict() == cfg0.to_dict() and "mtp" not in params
  _assert_params_identical(params, want)
  # Asked for explicitly, the absent module is an error that says what to pass instead.
  with pytest.raises(ValueError, match=r"model\.layers\.2\..*pass mtp_depth=0"):
    hf.load_checkpoint(path, mtp_depth=1)


def test_checkpoint_without_mtp_and_one_more_tensor_names_that_tensor(tmp_path):
  name = "model.layers.1.self_attn.kv_b_proj.weight"
  with pytest.raises(ValueError, match=r"1 tensor\(s\) missing.*kv_b_proj.*overrides") as e:
    hf.load_checkpoint(_without_mtp(tmp_path, drop=(name,)))
  assert name in str(e.value) and "eh_proj" not in str(e.value)


# ---------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("name", NAMES)
def test_load_save_load_is_bit_exact_and_writes_the_hub_layout(name, tmp_path):
  cfg, params = hf.load_checkpoint(_fixture(name))
  out = str(tmp_path / "ckpt")
  hf.save_checkpoint(cfg, params, out)
  cfg2, params2 = hf.load_checkpoint(out)
  assert cfg2.to_dict() == cfg.to_dict()
  _assert_params_identical(params, params2)
  # The written tensors are exactly HF's own save_pretrained output (names and bytes).
  ours, theirs = _read_tensors(out), _read_tensors(_fixture(name))
  assert sorted(ours) == sorted(theirs)
  for k in theirs:
    assert ours[k].dtype == theirs[k].dtype and np.array_equal(ours[k], theirs[k]), k
  conf = hf.read_config(out)
  assert "rope_parameters" not in conf and "rope_theta" in conf


def test_save_shards_and_reloads(tmp_path):
  cfg, params = hf.load_checkpoint(_fixture("v3"))
  out = str(tmp_path / "sharded")
  hf.save_checkpoint(cfg, params, out, max_shard_bytes=100_000)
  files = sorted(os.listdir(out))
  shards = [f for f in files if f.startswith("model-")]
  assert len(shards) > 2 and "model.safetensors.index.json" in files
  assert shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    index = json.load(f)
  assert set(index["weight_map"]) == set(_read_tensors(out))
  _, params2 = hf.load_checkpoint(out)
  _assert_params_identical(params, params2)


def test_bfloat16_param_dtype_round_trips(tmp_path):
  cfg, params = hf.load_checkpoint(_fixture("noq"), param_dtype="bfloat16")
  assert params["embed"].dtype == jnp.bfloat16
  hf.save_checkpoint(cfg, params, str(tmp_path / "bf16"))
  assert _read_tensors(str(tmp_path / "bf16"))["model.embed_tokens.weight"].dtype == jnp.bfloat16
  _, params2 = hf.load_checkpoint(str(tmp_path / "bf16"), param_dtype="bfloat16")
  _assert_params_identical(params, params2)


@pytest.mark.parametrize("name", ["yarn", "v2"])
def test_saved_checkpoint_loads_in_transformers(name, tmp_path):
  """Our hub-spelling config.json (rope_scaling) rebuilds the same HF model (V3 and V2)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg, params = hf.load_checkpoint(_fixture(name))
  out = str(tmp_path / "for_hf")
  hf.save_checkpoint(cfg, params, out)
  m = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  assert type(m).__name__ == hf.config_to_hf(cfg)["architectures"][0]
  g = _golden(name)
  with torch.no_grad():
    logits = m(torch.tensor(g["tokens_BxL"]).long()).logits.numpy()
  np.testing.assert_allclose(logits, g["logits_BxLxV"], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- layouts and errors

def test_fused_expert_layout_loads_like_the_hub_layout(tmp_path):
  """transformers 5 fuses experts in memory: gate_up_proj [E, 2F, D], down_proj [E, D, F]."""
  cfg, want = hf.load_checkpoint(_fixture("v3"))
  raw = _read_tensors(_fixture("v3"))
  fused = {}
  for layer in (1, 2):  # the MoE layer and the MTP block
    p = f"model.layers.{layer}.mlp.experts."
    gate_up, down = [], []
    for e in range(cfg.n_routed_experts):
      gate_up.append(np.concatenate([raw.pop(f"{p}{e}.gate_proj.weight"),
                                     raw.pop(f"{p}{e}.up_proj.weight")], axis=0))
      down.append(raw.pop(f"{p}{e}.down_proj.weight"))
    fused[p + "gate_up_proj"] = np.stack(gate_up)
    fused[p + "down_proj"] = np.stack(down)
  path = _write_variant(_fixture("v3"), str(tmp_path / "fused"), {**raw, **fused})
  _, got = hf.load_checkpoint(path)
  _assert_params_identical(got, want)


def test_missing_tensor_is_named(tmp_path):
  raw = _read_tensors(_fixture("noq"))
  del raw["model.layers.1.mlp.experts.5.up_proj.weight"]
  path = _write_variant(_fixture("noq"), str(tmp_path / "missing"), raw)
  with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.mlp\.experts\.5\.up_proj"):
    hf.load_checkpoint(path)


@pytest.mark.parametrize("extra", ["model.layers.0.self_attn.rotary_emb.inv_freq",
                                   "model.layers.2.input_layernorm.weight"])  # no MTP in noq
def test_unexpected_tensor_is_named(extra, tmp_path):
  raw = _read_tensors(_fixture("noq"))
  raw[extra] = np.ones(4, np.float32)
  path = _write_variant(_fixture("noq"), str(tmp_path / "unexpected"), raw)
  with pytest.raises(ValueError, match="unexpected.*" + extra.replace(".", r"\.")):
    hf.load_checkpoint(path)


def test_misshapen_tensor_is_named(tmp_path):
  raw = _read_tensors(_fixture("noq"))
  raw["model.layers.0.self_attn.kv_b_proj.weight"] = raw[
      "model.layers.0.self_attn.kv_b_proj.weight"].T.copy()
  path = _write_variant(_fixture("noq"), str(tmp_path / "shape"), raw)
  with pytest.raises(ValueError, match=r"kv_b_proj.*shape"):
    hf.load_checkpoint(path)


def test_missing_shard_and_missing_dir_raise(tmp_path):
  d = str(tmp_path / "partial")
  shutil.copytree(_fixture("yarn"), d)
  os.remove(os.path.join(d, "model-00002-of-00003.safetensors"))
  with pytest.raises(ValueError, match="model-00002-of-00003"):
    hf.load_checkpoint(d)
  with pytest.raises(ValueError, match="config.json"):
    hf.load_checkpoint(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------- config.json

def _v3_conf():
  return hf.read_config(_fixture("v3"))


def test_rope_parameters_and_rope_scaling_spellings_agree():
  new = _v3_conf()  # transformers 5: rope_parameters, rope_theta inside it
  assert "rope_parameters" in new and "rope_scaling" not in new
  old = dict(new)
  rope = dict(old.pop("rope_parameters"))
  old["rope_theta"] = rope.pop("rope_theta")
  rope["type"] = rope.pop("rope_type")
  old["rope_scaling"] = rope
  a, b = hf.config_from_hf(new), hf.config_from_hf(old)
  assert a.to_dict() == b.to_dict()
  assert (a.rope_scaling_type, a.yarn_factor, a.yarn_original_max_position_embeddings) == (
      "yarn", 4.0, 64)
  assert (a.yarn_beta_fast, a.yarn_beta_slow, a.yarn_mscale, a.yarn_mscale_all_dim) == (
      32.0, 1.0, 1.0, 1.0)
  assert a.rope_theta == 10000.0
  plain = hf.config_from_hf(hf.read_config(_fixture("noq")))
  assert plain.rope_scaling_type == "none" and plain.rope_theta == 50000.0


def test_head_dim_is_not_the_attention_head_size():
  conf = _v3_conf()
  conf["head_dim"] = 999
  cfg = hf.config_from_hf(conf)
  assert (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (16, 8, 16)


def test_yarn_mscale_absent_means_zero_and_factor_defaults_to_length_ratio():
  conf = _v3_conf()
  conf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0,
                             "original_max_position_embeddings": 64}
  cfg = hf.config_from_hf(conf)
  assert cfg.yarn_factor == 256 / 64 and cfg.yarn_mscale == 0.0 and cfg.yarn_mscale_all_dim == 0.0
  assert (cfg.yarn_beta_fast, cfg.yarn_beta_slow) == (32.0, 1.0)


V2_LITE_LIKE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 64, "moe_intermediate_size": 16,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
    "n_shared_experts": 2, "n_routed_experts": 8, "num_experts_per_tok": 3,
    "routed_scaling_factor": 1.0, "kv_lora_rank": 32, "q_lora_rank": None,
    "qk_rope_head_dim": 8, "v_head_dim": 16, "qk_nope_head_dim": 16, "topk_method": "greedy",
    "n_group": 1, "topk_group": 1, "moe_layer_freq": 1, "first_k_dense_replace": 1,
    "norm_topk_prob": False, "scoring_func": "softmax", "aux_loss_alpha": 0.001,
    "seq_aux": True, "hidden_act": "silu", "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6, "rope_theta": 10000, "tie_word_embeddings": False,
    "attention_bias": False, "rope_scaling": {
        "beta_fast": 32, "beta_slow": 1, "factor": 4, "mscale": 0.707,
        "mscale_all_dim": 0.707, "original_max_position_embeddings": 256, "type": "yarn"},
}


def test_v2_lite_config_maps_to_softmax_and_full_rank_queries():
  cfg = hf.config_from_hf(V2_LITE_LIKE)
  assert cfg.scoring_func == "softmax" and cfg.q_lora_rank == 0
  assert (cfg.n_group, cfg.topk_group, cfg.group_score) == (1, 1, "max")
  assert cfg.norm_topk_prob is False and cfg.routed_scaling_factor == 1.0
  assert cfg.mtp_depth == 0 and cfg.yarn_mscale == 0.707 and cfg.yarn_factor == 4.0
  limited = dict(V2_LITE_LIKE, topk_method="group_limited_greedy", n_group=4, topk_group=2)
  cfg = hf.config_from_hf(limited)
  assert (cfg.n_group, cfg.topk_group, cfg.group_score) == (4, 2, "max")


def test_v2_checkpoint_without_correction_bias_loads_zero_bias(tmp_path):
  raw = _read_tensors(_fixture("noq"))
  bias = raw.pop("model.layers.1.mlp.gate.e_score_correction_bias")
  assert np.abs(bias).max() > 0
  path = _write_variant(_fixture("noq"), str(tmp_path / "v2"), raw,
                        lambda c: {**c, "model_type": "deepseek_v2", "scoring_func": "softmax",
                                   "topk_method": "greedy"})
  cfg, params = hf.load_checkpoint(path)
  assert cfg.scoring_func == "softmax" and cfg.n_group == 1
  np.testing.assert_array_equal(params["moe_layers"]["moe"]["router"]["bias"], 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_config_to_hf_round_trips(name):
  cfg = hf.config_from_hf(hf.read_config(_fixture(name)))
  assert hf.config_from_hf(hf.config_to_hf(cfg)).to_dict() == cfg.to_dict()
  v2 = hf.config_from_hf(V2_LITE_LIKE)
  conf = hf.config_to_hf(v2)
  assert conf["model_type"] == "deepseek_v2" and conf["q_lora_rank"] is None
  assert hf.config_from_hf(conf).to_dict() == v2.to_dict()


@pytest.mark.parametrize("edit,match", [
    (lambda c: {**c, "quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    (lambda c: {**c, "rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "linear"),
    (lambda c: {**c, "num_key_value_heads": 1}, "num_key_value_heads"),
    (lambda c: {**c, "topk_method": "bogus"}, "topk_method"),
    (lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, "hidden_size"),
])
def test_unsupported_configs_raise(edit, match):
  with pytest.raises(ValueError, match=match):
    hf.config_from_hf(edit(_v3_conf()))


def test_config_to_hf_rejects_routing_hf_cannot_express():
  cfg = hf.config_from_hf(_v3_conf(), group_score="max")
  with pytest.raises(ValueError, match="group_score"):
    hf.config_to_hf(cfg)

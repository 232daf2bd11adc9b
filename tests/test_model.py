"""Model invariants that break silently: causality, path equivalences, packing, MTP, cache."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.model import config as config_lib
from r1jax.model import decoder, presets
from r1jax.train import losses


def _cfg(**kw):
  return presets.get("tiny_v3", **kw)


@pytest.fixture(scope="module")
def setup():
  cfg = _cfg()
  params = decoder.init_params(cfg, jax.random.key(0))
  # Non-zero router biases so selection and weights differ.
  bias = 0.05 * jax.random.normal(jax.random.key(7), decoder.router_biases(params).shape)
  params = decoder.with_router_biases(params, bias)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  return cfg, params, tokens


@functools.lru_cache(maxsize=None)
def _fwd(attention_impl, moe_impl):
  cfg = _cfg(attention_impl=attention_impl, moe_impl=moe_impl)
  return cfg, jax.jit(lambda p, t, s: decoder.forward(p, t, cfg, segment_ids=s))


def _run(params, tokens, attention_impl="naive", moe_impl="dense", segment_ids=None):
  cfg, fn = _fwd(attention_impl, moe_impl)
  if segment_ids is None:
    segment_ids = jnp.ones(tokens.shape, jnp.int32)
  return fn(params, tokens, segment_ids)


def test_causality(setup):
  cfg, params, tokens = setup
  logits, aux = _run(params, tokens)
  changed = tokens.at[:, 9].set((tokens[:, 9] + 1) % cfg.vocab_size)
  logits2, aux2 = _run(params, changed)
  np.testing.assert_array_equal(np.asarray(logits[:, :9]), np.asarray(logits2[:, :9]))
  assert float(jnp.abs(logits[:, 9:] - logits2[:, 9:]).max()) > 1e-4
  # MTP module 1 at position i reads token i+1, so it may change from position 8 on, not before.
  np.testing.assert_array_equal(np.asarray(aux["mtp_logits"][:, :, :8]),
                                np.asarray(aux2["mtp_logits"][:, :, :8]))
  assert float(jnp.abs(aux["mtp_logits"][:, :, 8] - aux2["mtp_logits"][:, :, 8]).max()) > 1e-4


@pytest.mark.parametrize("attention_impl,moe_impl", [("absorbed", "dense"), ("naive", "ragged"),
                                                     ("absorbed", "ragged"), ("naive", "grouped")])
def test_paths_agree(setup, attention_impl, moe_impl):
  _, params, tokens = setup
  ref, ref_aux = _run(params, tokens)
  out, aux = _run(params, tokens, attention_impl, moe_impl)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(aux["tokens_per_expert"]),
                                np.asarray(ref_aux["tokens_per_expert"]))


@pytest.mark.parametrize("moe_impl", ["ragged", "grouped"])
def test_sparse_and_dense_gradients_agree(setup, moe_impl):
  _, params, tokens = setup
  def loss(p, moe_impl):
    cfg = _cfg(moe_impl=moe_impl, mtp_depth=0)
    logits, _ = decoder.forward(p, tokens, cfg)
    return jnp.sum(jnp.sin(logits))
  g_dense = jax.jit(jax.grad(functools.partial(loss, moe_impl="dense")))(params)
  g_ragged = jax.jit(jax.grad(functools.partial(loss, moe_impl=moe_impl)))(params)
  experts = g_dense["moe_layers"]["moe"]["experts"]["w_up"]
  assert float(jnp.abs(experts).max()) > 0
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_dense)[0], jax.tree.leaves(g_ragged)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


def test_packed_equals_separate(setup):
  cfg, params, _ = setup
  a = jax.random.randint(jax.random.key(3), (1, 7), 0, cfg.vocab_size)
  b = jax.random.randint(jax.random.key(4), (1, 6), 0, cfg.vocab_size)
  packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
  seg = jnp.array([[1] * 7 + [2] * 6 + [0] * 3], jnp.int32)
  out, _ = _run(params, packed, segment_ids=seg)
  out_a, _ = _run(params, jnp.concatenate([a, jnp.zeros((1, 9), jnp.int32)], 1),
                  segment_ids=jnp.array([[1] * 7 + [0] * 9], jnp.int32))
  out_b, _ = _run(params, jnp.concatenate([b, jnp.zeros((1, 10), jnp.int32)], 1),
                  segment_ids=jnp.array([[1] * 6 + [0] * 10], jnp.int32))
  np.testing.assert_allclose(np.asarray(out[0, :7]), np.asarray(out_a[0, :7]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(out[0, 7:13]), np.asarray(out_b[0, :6]), atol=1e-5)


def test_positions_restart_per_segment():
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
  np.testing.assert_array_equal(np.asarray(decoder.positions_from_segments(seg)),
                                [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_mtp_loss_finite_and_reaches_shared_embedding(setup):
  cfg, params, tokens = setup
  def mtp_only(p):
    s, n, metrics = losses.lm_loss(p, tokens, cfg)
    return metrics["mtp1_nll_sum"] / metrics["mtp1_tokens"]
  value, grads = jax.jit(jax.value_and_grad(mtp_only))(params)
  assert np.isfinite(float(value)) and float(value) > 0
  # The embedding gets gradient only through the MTP module here (the main loss is excluded).
  assert float(jnp.abs(grads["embed"]).max()) > 0
  assert float(jnp.abs(grads["lm_head"]).max()) > 0
  assert float(jnp.abs(grads["mtp"]["eh_proj"]).max()) > 0
  # Module 1 predicts token i+2 from position i: L-2 targets per row.
  _, _, metrics = jax.jit(lambda p: losses.lm_loss(p, tokens, cfg))(params)
  assert float(metrics["mtp1_tokens"]) == tokens.shape[0] * (tokens.shape[1] - 2)
  assert float(metrics["tokens"]) == tokens.shape[0] * (tokens.shape[1] - 1)


def test_loss_mask_limits_trained_tokens(setup):
  cfg, params, tokens = setup
  mask = jnp.zeros(tokens.shape, bool).at[:, 10:].set(True)
  s, n, metrics = jax.jit(lambda p: losses.lm_loss(p, tokens, cfg, loss_mask=mask))(params)
  assert float(n) == tokens.shape[0] * 6
  logits, _ = _run(params, tokens)
  logp = jax.nn.log_softmax(logits[:, 9:15], axis=-1)
  manual = -jnp.take_along_axis(logp, tokens[:, 10:16, None], -1).sum()
  main_sum = s - cfg.mtp_lambda * metrics["mtp1_nll_sum"]
  np.testing.assert_allclose(float(main_sum), float(manual), rtol=1e-5)


def test_bfloat16_compute_close_to_float32(setup):
  cfg, params, tokens = setup
  ref, _ = _run(params, tokens)
  bcfg = _cfg(dtype="bfloat16")
  out, _ = jax.jit(lambda p, t: decoder.forward(p, t, bcfg))(params, tokens)
  assert out.dtype == jnp.float32
  err = float(jnp.abs(out - ref).max()) / float(jnp.abs(ref).max())
  assert err < 0.05, err


def test_param_axes_match_params(setup):
  cfg, params, _ = setup
  axes = decoder.param_axes(cfg)
  flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_a = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
  assert len(flat_p) == len(flat_a)
  for (path, p), a in zip(flat_p, flat_a):
    assert p.ndim == len(a), jax.tree_util.keystr(path)
  assert axes["moe_layers"]["moe"]["experts"]["w_gate"] == ("layers", "exp", "embed", "expert_mlp")


def test_v3_shape_only_init_and_counts():
  cfg = presets.get("deepseek_v3")
  shapes = jax.eval_shape(lambda k: decoder.init_params(cfg, k), jax.random.key(0))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  counts = decoder.count_params(cfg)
  assert n == counts["total"] + counts["mtp"]
  assert abs(counts["total"] / 671e9 - 1) < 0.01
  assert shapes["moe_layers"]["moe"]["experts"]["w_gate"].shape == (58, 256, 7168, 2048)
  lite = decoder.count_params(presets.get("deepseek_v2_lite"))
  assert abs(lite["total"] / 15.7e9 - 1) < 0.02


def test_checked_forward_rejects_out_of_vocab(setup):
  cfg, params, tokens = setup
  with pytest.raises(ValueError, match="token ids"):
    decoder.checked_forward(params, np.array([[1, 2, cfg.vocab_size]]), cfg)
  with pytest.raises(ValueError, match="token ids"):
    decoder.checked_forward(params, np.array([[-1, 2, 3]]), cfg)
  with pytest.raises(ValueError, match="integers"):
    decoder.checked_forward(params, np.array([[1.0, 2.0]]), cfg)


@pytest.mark.parametrize("overrides,field", [
    (dict(n_routed_experts=10, n_group=4), "n_routed_experts"),
    (dict(topk_group=3, n_group=2), "topk_group"),
    (dict(num_experts_per_tok=5, n_group=2, topk_group=1), "num_experts_per_tok"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(kv_lora_rank=-4), "kv_lora_rank"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(moe_impl="sparse"), "moe_impl"),
    (dict(attention_impl="flash"), "attention_impl"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(first_k_dense_replace=5), "first_k_dense_replace"),
])
def test_config_validation(overrides, field):
  with pytest.raises(ValueError, match=field):
    config_lib.make_model_config(**overrides)


def test_unknown_field_rejected():
  with pytest.raises(ValueError, match="hiden_size"):
    config_lib.make_model_config(hiden_size=3)


def test_unrolled_layers_equal_scanned(setup):
  cfg, params, tokens = setup
  ref, ref_aux = _run(params, tokens)
  ucfg = _cfg(scan_layers=False)
  out, aux = jax.jit(lambda p, t: decoder.forward(p, t, ucfg))(params, tokens)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)
  np.testing.assert_array_equal(np.asarray(aux["tokens_per_expert"]),
                                np.asarray(ref_aux["tokens_per_expert"]))

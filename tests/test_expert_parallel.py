"""Expert-parallel training MoE (model/expert_parallel.py) against the single-device model.

On the 8 forced CPU devices: sharded logits and parameter gradients of the next-token loss
equal the unsharded ones for every exchange on every mesh (one dispatch) and every dispatch
on one mesh; the 'all_to_all' exchange's dropped count equals one counted in numpy from the
routing; parameters sit where sharding.RULES says; bad meshes and rules raise.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from r1jax import sharding
from r1jax.model import decoder, expert_parallel, moe, presets

MESHES = {
    "data8": {"data": 8},
    "dp2_fsdp2_ep2": {"data": 2, "fsdp": 2, "expert": 2},
    "fsdp2_ep4": {"fsdp": 2, "expert": 4},
    "dp2_ep2_tp2": {"data": 2, "expert": 2, "tensor": 2},
}
B, L = 8, 8


def _cfg(**kw):
  # one MoE layer behind grouped-query attention: the smallest model that has every
  # sharded parameter kind (embed / fsdp, experts / expert, expert hidden / tensor)
  base = dict(attention_type="gqa", head_dim=8, num_key_value_heads=1, q_lora_rank=16,
              hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8,
              n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=2,
              first_k_dense_replace=0, vocab_size=64, max_position_embeddings=64,
              moe_impl="grouped", moe_capacity_factor=4.0)
  return presets.get("tiny", **{**base, **kw})


@functools.cache
def _mesh(name):
  return sharding.make_mesh(MESHES[name])


def _loss(params, tokens, cfg):
  logits, aux = decoder.forward(params, tokens, cfg)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)
  return jnp.mean(nll), (logits, aux)


@functools.cache
def _data():
  params = decoder.init_params(_cfg(), jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (B, L), 0, 64)
  return params, tokens


@functools.cache
def _reference():
  params, tokens = _data()
  cfg = _cfg()
  (_, (logits, _)), grads = jax.jit(jax.value_and_grad(
      functools.partial(_loss, cfg=cfg), has_aux=True))(params, tokens)
  return np.asarray(logits), jax.tree.map(np.asarray, grads)


def _sharded(cfg, mesh_name):
  mesh = _mesh(mesh_name)
  params, tokens = _data()
  placed = sharding.place_params(params, cfg, mesh)
  batch = sharding.place_batch({"tokens": np.asarray(tokens)}, mesh)
  with sharding.use_mesh(mesh):
    (_, (logits, aux)), grads = jax.jit(jax.value_and_grad(
        functools.partial(_loss, cfg=cfg), has_aux=True))(placed, batch["tokens"])
  return placed, logits, aux, grads


def _assert_matches(logits, grads):
  ref_logits, ref_grads = _reference()
  np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=2e-5, rtol=1e-4)
  flat_ref = jax.tree_util.tree_flatten_with_path(ref_grads)[0]
  for (path, ref), got in zip(flat_ref, jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-6, rtol=2e-4,
                               err_msg=jax.tree_util.keystr(path))


def _jaxpr_text(cfg, mesh_name):
  mesh = _mesh(mesh_name)
  params, tokens = _data()
  with sharding.use_mesh(mesh):
    return str(jax.make_jaxpr(functools.partial(_loss, cfg=cfg))(params, tokens))


# Every exchange on every expert-parallel mesh, the dispatches spread over them so that each
# runs on some mesh (the full cross product would take minutes to compile on CPU).
CASES = [
    ("gather", "dp2_fsdp2_ep2", "grouped"), ("gather", "fsdp2_ep4", "dense"),
    ("gather", "dp2_ep2_tp2", "ragged"),
    ("all_to_all", "dp2_fsdp2_ep2", "ragged"), ("all_to_all", "fsdp2_ep4", "grouped"),
    ("all_to_all", "dp2_ep2_tp2", "dense"),
    ("ragged", "dp2_fsdp2_ep2", "pallas"), ("ragged", "fsdp2_ep4", "ragged"),
    ("ragged", "dp2_ep2_tp2", "grouped"),
]


@pytest.mark.parametrize("exchange,mesh_name,impl", CASES)
def test_sharded_matches_single_device(exchange, mesh_name, impl):
  """Logits and every parameter gradient against one device (the 'grouped' dispatch,
  itself tested against the dense oracle in test_moe.py)."""
  cfg = _cfg(moe_exchange=exchange, moe_impl=impl)
  placed, logits, aux, grads = _sharded(cfg, mesh_name)
  _assert_matches(logits, grads)
  assert aux["dropped_assignments"].shape == (1,)
  assert int(aux["dropped_assignments"].sum()) == 0
  mesh = _mesh(mesh_name)
  specs = jax.tree.leaves(decoder.param_specs(cfg), is_leaf=lambda s: hasattr(s, "axes"))
  for spec, arr in zip(specs, jax.tree.leaves(placed)):
    assert arr.sharding.spec == sharding.logical_to_spec(spec.axes, spec.shape, mesh)


def test_expert_parallel_only_where_the_mesh_splits_experts():
  """data=8 (no expert axis) and moe_exchange='none' stay jit-partitioned; with a split
  expert axis the layer is a shard_map holding the exchange's collectives."""
  assert "shard_map" not in _jaxpr_text(_cfg(moe_exchange="gather"), "data8")
  assert "shard_map" not in _jaxpr_text(_cfg(moe_exchange="none"), "dp2_fsdp2_ep2")
  text = _jaxpr_text(_cfg(moe_exchange="all_to_all"), "dp2_fsdp2_ep2")
  assert "shard_map" in text and "all_to_all" in text
  assert "ragged_all_to_all" in _jaxpr_text(_cfg(moe_exchange="ragged"), "fsdp2_ep4")
  _, logits, _, grads = _sharded(_cfg(moe_exchange="gather"), "data8")
  _assert_matches(logits, grads)


def test_context_mesh_is_part_of_the_jit_cache_key():
  cfg = _cfg(moe_exchange="gather")
  fn = jax.jit(lambda x: jnp.float32(expert_parallel.context_mesh(cfg) is not None) + x)
  assert float(fn(0.0)) == 0.0
  with sharding.use_mesh(_mesh("dp2_fsdp2_ep2")):
    assert float(fn(0.0)) == 1.0
  assert float(fn(0.0)) == 0.0
  assert float(sharding.in_mesh(fn, _mesh("fsdp2_ep4"))(0.0)) == 1.0
  assert sharding.in_mesh(fn, None) is fn


def test_rules_place_experts_as_declared():
  cfg = _cfg()
  got = sharding.param_shardings(cfg, _mesh("dp2_ep2_tp2"))
  experts = got["moe_layers"]["moe"]["experts"]
  assert experts["w_gate"].spec == P(None, "expert", None, "tensor")
  assert experts["w_down"].spec == P(None, "expert", "tensor", None)
  got = sharding.param_shardings(cfg, _mesh("fsdp2_ep4"))
  assert got["moe_layers"]["moe"]["experts"]["w_up"].spec == P(None, "expert", "fsdp", None)
  assert got["embed"].spec == P(None, "fsdp")


@pytest.mark.parametrize("factor", [0.5, 0.75])
def test_all_to_all_drops_what_numpy_counts(factor):
  """Past-capacity assignments are dropped and counted: the count equals one from the
  routing by hand (per device: rows to each destination shard beyond C), and the output
  equals the dense dispatch with exactly those assignments removed."""
  cfg = _cfg(moe_exchange="all_to_all", moe_capacity_factor=factor, n_shared_experts=0)
  mesh = _mesh("fsdp2_ep4")
  p = moe.compute_layout(decoder.init_params(cfg, jax.random.key(2))["moe_layers"]["moe"])
  p = jax.tree.map(lambda a: a[0], p)
  stored = jax.tree.map(lambda a: a[0], decoder.init_params(cfg, jax.random.key(2))["moe_layers"]["moe"])
  x = jax.random.normal(jax.random.key(3), (B, L, cfg.hidden_size))
  valid = jnp.ones((B, L), bool)
  with sharding.use_mesh(mesh):
    y, stats = jax.jit(lambda q, x: moe.moe_ffn(
        q, x, valid, cfg, mesh=jax.sharding.get_abstract_mesh()))(
            moe.compute_layout(stored, fuse_experts=False), x)
  idx, w, _ = moe.route(p["router"], x.reshape(B * L, -1), cfg)
  idx, w = np.asarray(idx), np.asarray(w)
  n, k, e_local = 4, cfg.num_experts_per_tok, cfg.n_routed_experts // 4
  t_local = B * L // 8                       # batch split over fsdp x expert
  c = math.ceil(factor * t_local * k / n)
  dropped, keep = 0, np.ones_like(idx, bool)
  for dev in range(8):
    rows = idx[dev * t_local:(dev + 1) * t_local]
    seen = np.zeros(n, int)
    for r, row in enumerate(rows):
      for j, ex in enumerate(row):
        s = ex // e_local
        if seen[s] >= c:
          dropped += 1
          keep[dev * t_local + r, j] = False
        seen[s] += 1
  assert dropped > 0
  assert int(stats["dropped_assignments"]) == dropped
  ref = moe.dense_dispatch(p["experts"], x.reshape(B * L, -1), jnp.asarray(idx),
                           jnp.asarray(np.where(keep, w, 0.0)), cfg)
  np.testing.assert_allclose(np.asarray(y).reshape(B * L, -1), np.asarray(ref), atol=2e-5)


def test_mesh_and_rule_errors():
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.make_mesh({"data": 3, "expert": 2})
  with pytest.raises(ValueError, match="do not split"):
    sharding.make_mesh({"data": -1, "expert": 3})
  with pytest.raises(ValueError, match="not mesh axes"):
    sharding.logical_to_spec(("exp",), (8,), _mesh("fsdp2_ep4"), {"exp": "experts"})
  with pytest.raises(ValueError, match="not mesh axes"):
    sharding.param_shardings(_cfg(), _mesh("fsdp2_ep4"), {"batch": ("data", "pipe")})
  with pytest.raises(ValueError, match="moe_exchange"):
    _cfg(moe_exchange="alltoall")
  with pytest.raises(ValueError, match="moe_capacity_factor"):
    _cfg(moe_capacity_factor=0.0)


def test_sft_step_under_the_training_mesh_is_expert_parallel():
  """sft.train runs its step under sharding.in_mesh(step, mesh): traced there, the step's
  MoE is the shard_map exchange and its metrics carry the dropped count (traced only)."""
  from r1jax.train import optim, sft
  cfg = _cfg(moe_exchange="all_to_all", moe_capacity_factor=0.5)
  opt_cfg = sft.sft_defaults().optimizer
  optimizer = optim.make_optimizer(opt_cfg, 4)
  params, tokens = _data()
  state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}
  batch = {"tokens": tokens, "loss_mask": jnp.ones((B, L)), "segment_ids": jnp.ones((B, L), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(L), (B, L))}
  step = sft.make_train_step(cfg, optimizer)
  with sharding.use_mesh(_mesh("dp2_fsdp2_ep2")):
    text = str(jax.make_jaxpr(step)(state, batch))
    _, metrics = jax.eval_shape(step, state, batch)
  assert "shard_map" in text and "all_to_all" in text
  assert metrics["dropped_assignments"].shape == ()
  assert "shard_map" not in str(jax.make_jaxpr(step)(state, batch))



def test_ragged_all_to_all_emulation_matches_the_documented_example():
  """The CPU emulation on lax.ragged_all_to_all's docstring example (axis of size 2)."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
  args = [np.array(v, np.int32) for v in (
      [[1, 2, 2], [3, 4, 0]], [[0, 0, 0, 0]] * 2, [[0, 1], [0, 1]], [[1, 2], [1, 1]],
      [[0, 0], [1, 2]], [[1, 1], [2, 1]])]
  fn = jax.shard_map(
      lambda *a: expert_parallel.ragged_all_to_all(*(v[0] for v in a), "x")[None],
      mesh=mesh, in_specs=(P("x"),) * 6, out_specs=P("x"))
  np.testing.assert_array_equal(np.asarray(jax.jit(fn)(*args)), [[1, 3, 0, 0], [2, 2, 4, 0]])

"""Router semantics on hand-computed examples, balance loss and aux-loss-free bias updates."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.model import config as config_lib
from r1jax.model import moe
from r1jax.model.layers import fuse_swiglu


def _router_cfg(**kw):
  base = dict(hidden_size=8, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
              routed_scaling_factor=2.5)
  base.update(kw)
  return config_lib.make_model_config(**base)


def _logit(p):
  p = np.asarray(p, np.float64)
  return np.log(p / (1 - p)).astype(np.float32)


SCORES = [0.9, 0.1, 0.5, 0.6, 0.2, 0.3, 0.8, 0.65]


def _route(bias, cfg):
  router = {"w": jnp.eye(8, dtype=jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
  x = jnp.asarray(_logit(SCORES))[None, :]   # identity router: logits = x, sigmoid -> SCORES
  return moe.route(router, x, cfg)


def test_group_limited_routing_with_bias_only_for_selection():
  cfg = _router_cfg()
  # Biased choice scores: [.9 .1 | .5 .6 | .9 .5 | .8 .65]; group sums 1.0, 1.1, 1.4, 1.45
  # keep groups 3 and 2; expert 0 (0.9) is dropped with its group; top-2 of {4,5,6,7} = 4, 6.
  idx, w, scores = _route([0, 0, 0, 0, 0.7, 0.2, 0, 0], cfg)
  assert sorted(np.asarray(idx[0]).tolist()) == [4, 6]
  # Weights use the unbiased scores 0.2 and 0.8, normalised (sum 1.0) and scaled by 2.5.
  got = dict(zip(np.asarray(idx[0]).tolist(), np.asarray(w[0]).tolist()))
  np.testing.assert_allclose([got[4], got[6]], [0.5, 2.0], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(scores[0]), SCORES, rtol=1e-5)


def test_routing_without_bias():
  cfg = _router_cfg()
  # Group sums 1.0, 1.1, 0.5, 1.45 -> keep groups 3, 1 -> experts {2,3,6,7} -> top-2 = 6, 7.
  idx, w, _ = _route(np.zeros(8), cfg)
  got = dict(zip(np.asarray(idx[0]).tolist(), np.asarray(w[0]).tolist()))
  assert sorted(got) == [6, 7]
  np.testing.assert_allclose([got[6], got[7]], [2.5 * 0.8 / 1.45, 2.5 * 0.65 / 1.45], rtol=1e-5)


def test_single_group_is_plain_topk_and_softmax_router():
  cfg = _router_cfg(n_group=1, topk_group=1, scoring_func="softmax", group_score="max",
                    norm_topk_prob=False, routed_scaling_factor=1.0)
  router = {"w": jnp.eye(8, dtype=jnp.float32), "bias": jnp.zeros(8)}
  x = jnp.arange(8, dtype=jnp.float32)[None, :]
  idx, w, _ = moe.route(router, x, cfg)
  assert np.asarray(idx[0]).tolist() == [7, 6]
  p = np.exp(np.arange(8)) / np.exp(np.arange(8)).sum()
  np.testing.assert_allclose(np.asarray(w[0]), [p[7], p[6]], rtol=1e-5)


def test_bias_update_moves_loads_toward_balance():
  cfg = _router_cfg(n_group=1, topk_group=1)
  key = jax.random.key(0)
  # Skewed router: experts 0 and 1 get much larger logits for most tokens.
  w = jax.random.normal(key, (8, 8)) * 0.5
  x = jax.random.normal(jax.random.key(1), (512, 8)) + jnp.array([[2.0, 1.5, 0, 0, 0, 0, 0, 0]])
  w = w.at[:, 0].add(1.0).at[:, 1].add(0.8)

  @jax.jit
  def loads(bias):
    idx, _, _ = moe.route({"w": w, "bias": bias}, x, cfg)
    return jnp.bincount(idx.reshape(-1), length=8).astype(jnp.float32)

  bias = jnp.zeros(8)
  first = loads(bias)
  imbalance0 = float(first.max() / first.mean())
  late = []
  for step in range(1000):
    load = loads(bias)
    if step >= 950:
      late.append(float(load.max() / load.mean()))
    bias = moe.update_router_bias(bias, load, rate=0.002)
  imbalance1 = sum(late) / len(late)   # the sign update oscillates: average the last steps
  assert imbalance0 > 3.0
  assert imbalance1 < 1.4, (imbalance0, imbalance1)
  # The update itself: overloaded experts go down, underloaded ones up, by exactly u.
  upd = moe.update_router_bias(jnp.zeros(3), jnp.array([5.0, 1.0, 3.0]), rate=0.1)
  np.testing.assert_allclose(np.asarray(upd), [-0.1, 0.1, 0.0])


def test_sequence_balance_loss_hand_computed():
  cfg = _router_cfg(n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=1)
  # One sequence of 2 tokens; token 0 picks expert 0, token 1 picks expert 1.
  scores = jnp.array([[0.4, 0.2, 0.2, 0.2], [0.1, 0.5, 0.2, 0.2]])
  idx = jnp.array([[0], [1]])
  valid = jnp.ones((1, 2), bool)
  # f = E/(K*L) * counts = 2 * [1, 1, 0, 0]; P = mean of normalised scores = [.25, .35, .2, .2]
  expected = 2 * 0.25 + 2 * 0.35
  got = moe.sequence_balance_loss(scores, idx, valid, cfg)
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def _experts(d=16, f=12, e=8):
  keys = jax.random.split(jax.random.key(0), 3)
  stored = {"w_gate": jax.random.normal(keys[0], (e, d, f)),
            "w_up": jax.random.normal(keys[1], (e, d, f)),
            "w_down": jax.random.normal(keys[2], (e, f, d))}
  return fuse_swiglu(stored), stored


def _oracle(stored, x_TxD, idx_TxK, w_TxK):
  """y_t = sum_k w_tk * SwiGLU_{e_tk}(x_t) in numpy float64, skipping dropped experts (== E)."""
  g, u, dn = (np.asarray(stored[k], np.float64) for k in ("w_gate", "w_up", "w_down"))
  x, idx, w = np.asarray(x_TxD, np.float64), np.asarray(idx_TxK), np.asarray(w_TxK, np.float64)
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    for k in range(idx.shape[1]):
      e = idx[t, k]
      if e < g.shape[0]:
        a = x[t] @ g[e]
        y[t] += w[t, k] * ((a / (1 + np.exp(-a))) * (x[t] @ u[e])) @ dn[e]
  return y


def test_every_dispatch_equals_the_oracle():
  """Each registered dispatch equals a float64 loop over assignments, with empty experts, a
  token choosing one expert twice, a single token, and dropped assignments (expert index E,
  another shard's expert), at any tile size or capacity."""
  cfg = _router_cfg(hidden_size=16, moe_intermediate_size=12)
  experts, stored = _experts()
  assert {"dense", "ragged", "grouped", "capacity"} <= set(moe.DISPATCH_IMPLS)
  for t in (1, 37):
    x = jax.random.normal(jax.random.key(10 + t), (t, 16))
    idx = jax.random.randint(jax.random.key(t), (t, 2), 0, 3)  # experts 3..7 get nothing
    idx = idx.at[0].set(jnp.array([2, 2]))
    if t > 1:
      idx = idx.at[1:, 1].set(jnp.where(jnp.arange(t - 1) % 3 == 0, 8, idx[1:, 1]))  # dropped
    w = jax.random.uniform(jax.random.key(t + 1), (t, 2))
    want = _oracle(stored, x, idx, w)
    runs = {name: functools.partial(moe.dispatch_fn(name), cfg=cfg)
            for name in sorted(moe.DISPATCH_IMPLS)}
    runs.update({f"grouped tile={tile}": functools.partial(moe.grouped_dispatch, cfg=cfg, tile=tile)
                 for tile in (3, 64)})
    runs.update({f"capacity={c}": functools.partial(moe.capacity_dispatch, cfg=cfg, capacity=c)
                 for c in (1, t)})
    for name, fn in runs.items():
      got = np.asarray(jax.jit(fn)(experts, x, idx, w))
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3, err_msg=f"{name} t={t}")
  # half the mean load per expert, rounded up to a multiple of 8, within [8, 128]
  assert [moe.group_tile(a, 8) for a in (100, 400, 6000)] == [8, 32, 128]
  # capacity: twice the mean load in multiples of 8; 4 slots at a mean load of one token
  assert moe.expert_capacity(16, cfg) == 8 and moe.expert_capacity(64, cfg) == 32
  assert moe.expert_capacity(4, cfg) == 4
  sixteen = cfg.copy_and_resolve_references()
  sixteen.n_routed_experts = 16  # 8 tokens x 2 = one per expert on average: 4 slots
  assert moe.expert_capacity(8, sixteen) == 4 and moe.expert_capacity(16, sixteen) == 8


def test_sparse_dispatch_gradients_equal_the_dense_oracle():
  """The gradients of 'grouped' (any tile size) and 'ragged' with respect to the expert
  weights, the tokens and the gate weights equal 'dense''s, with a token choosing one expert
  twice, empty experts and dropped assignments."""
  cfg = _router_cfg(hidden_size=16, moe_intermediate_size=12)
  experts, _ = _experts()
  t = 29
  x = jax.random.normal(jax.random.key(3), (t, 16))
  idx = jax.random.randint(jax.random.key(4), (t, 2), 0, 5).at[0].set(jnp.array([1, 1]))
  idx = idx.at[1:, 1].set(jnp.where(jnp.arange(t - 1) % 4 == 0, 8, idx[1:, 1]))
  w = jax.random.uniform(jax.random.key(5), (t, 2))
  cot = jax.random.normal(jax.random.key(6), (t, 16))

  def grads(fn):
    loss = lambda e, x, w: jnp.vdot(fn(e, x, idx, w, cfg), cot)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(experts, x, w)
  want = grads(moe.dense_dispatch)
  runs = {"ragged": moe.ragged_dispatch, "grouped": moe.grouped_dispatch,
          "grouped tile=3": functools.partial(moe.grouped_dispatch, tile=3)}
  for name, fn in runs.items():
    got = grads(fn)
    for g, ref in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-4, atol=1e-4,
                                 err_msg=name)


def test_unknown_dispatch_names_the_registered_ones():
  import pytest
  with pytest.raises(ValueError, match="registered: .*capacity.*dense.*grouped.*ragged"):
    moe.dispatch_fn("pallas_typo")
  with pytest.raises(ValueError, match="moe_impl"):
    _router_cfg(moe_impl="bogus")


def test_expert_parallel_moe_ffn_equals_one_device():
  """moe_ffn under shard_map with the experts split over 4 devices (tokens all-gathered,
  reduce-scattered back) equals the unsharded layer (every dispatch's handling of other
  shards' assignments is checked above)."""
  cfg = _router_cfg(hidden_size=16, moe_intermediate_size=12, n_shared_experts=1)
  experts, _ = _experts()
  keys = jax.random.split(jax.random.key(3), 4)
  p = {"router": {"w": jax.random.normal(keys[0], (16, 8)),
                  "bias": 0.1 * jax.random.normal(keys[1], (8,))},
       "experts": experts,
       "shared": fuse_swiglu({"w_gate": jax.random.normal(keys[2], (16, 12)),
                              "w_up": jax.random.normal(keys[3], (16, 12)),
                              "w_down": jax.random.normal(keys[0], (12, 16))})}
  x = jax.random.normal(jax.random.key(5), (4, 6, 16))
  valid = jnp.ones((4, 6), bool)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("expert",))
  P = jax.sharding.PartitionSpec
  specs = jax.tree.map(lambda _: P(), p)
  specs["experts"] = jax.tree.map(lambda _: P("expert"), p["experts"])
  # the rollout engine's dispatch, the CPU default, the Pallas kernels (interpreted)
  for name in ("capacity", "grouped", "pallas"):
    want, want_stats = jax.jit(lambda p, x, v, name=name: moe.moe_ffn(p, x, v, cfg, impl=name))(
        p, x, valid)
    fn = jax.shard_map(lambda p, x, v, name=name: moe.moe_ffn(p, x, v, cfg, impl=name,
                                                              expert_axis="expert"),
                       mesh=mesh, in_specs=(specs, P("expert"), P("expert")),
                       out_specs=(P("expert"), P()), check_vma=False)
    got, got_stats = jax.jit(fn)(p, x, valid)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-3,
                               err_msg=name)
    np.testing.assert_array_equal(np.asarray(got_stats["tokens_per_expert"]),
                                  np.asarray(want_stats["tokens_per_expert"]))

"""Tests for r1jax/train/grpo.py: hand-computed losses, advantages, accumulation, chunked log-probs."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.train import grpo

LOG = math.log

# Two sequences, two tokens; eps_low=0.1, eps_high=0.3 so the two sides are told apart.
#   row 0, A=+1: ratios 1.5 (clipped high at 1.3) and 0.5 (not clipped)
#   row 1, A=-1: ratios 0.5 (padding) and 1.5 (not clipped: min(-1.5, -1.3) = -1.5)
OLD = np.zeros((2, 2), np.float32)
LOGP = np.array([[LOG(1.5), LOG(0.5)], [LOG(0.5), LOG(1.5)]], np.float32)
ADV = np.array([1.0, -1.0], np.float32)
MASK = np.array([[1, 1], [0, 1]], np.float32)
EPS = dict(epsilon_low=0.1, epsilon_high=0.3)


def _loss_and_grad(kind, logp, old, adv, mask, **kw):
  def loss(lp):
    s, d, m = grpo.policy_loss(kind, lp, old, adv, mask, **kw)
    return s / d, (s, d, m)
  (val, (s, d, m)), g = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(logp))
  return float(val), float(s), float(d), m, np.asarray(g)


# Per-token losses: row 0: [-1.3, -0.5]; row 1: [masked, 1.5]. Gradients d loss_t / d logp_t:
# clipped tokens 0; row 0 token 1: -0.5 (= -ratio * A); row 1 token 1: 1.5.
@pytest.mark.parametrize("kind,max_len,loss_sum,denom,grad", [
    # token mean per sequence, then mean over sequences: ((-1.3 - 0.5) / 2 + 1.5 / 1) / 2
    ("grpo", None, 0.6, 2.0, [[0.0, -0.5 / 4], [0.0, 1.5 / 2]]),
    # token mean over the batch: (-1.3 - 0.5 + 1.5) / 3
    ("dapo", None, -0.3, 3.0, [[0.0, -0.5 / 3], [0.0, 1.5 / 3]]),
    # token sum over a constant budget: (-1.3 - 0.5 + 1.5) / (2 * 4)
    ("dr_grpo", 4, -0.3, 8.0, [[0.0, -0.5 / 8], [0.0, 1.5 / 8]]),
])
def test_token_level_losses_on_hand_computed_numbers(kind, max_len, loss_sum, denom, grad):
  val, s, d, m, g = _loss_and_grad(kind, LOGP, OLD, ADV, MASK, max_len=max_len, **EPS)
  assert s == pytest.approx(loss_sum, abs=1e-6)
  assert d == denom
  assert val == pytest.approx(loss_sum / denom, abs=1e-6)
  np.testing.assert_allclose(g, grad, atol=1e-6)
  # valid tokens: (0,0) clipped high, (0,1), (1,1) unclipped
  assert float(m["clip_frac_high"]) == pytest.approx(1 / 3)
  assert float(m["clip_frac_low"]) == 0.0
  assert float(m["ratio_mean"]) == pytest.approx((1.5 + 0.5 + 1.5) / 3, rel=1e-6)
  assert float(m["ratio_min"]) == pytest.approx(0.5, rel=1e-6)
  assert float(m["ratio_max"]) == pytest.approx(1.5, rel=1e-6)


@pytest.mark.parametrize("kind", sorted(grpo.POLICY_LOSSES))
def test_fully_padded_rows_change_nothing(kind):
  pad = lambda x: np.concatenate([x, np.full_like(x[:1], 0.7)])  # noqa: E731
  kw = dict(max_len=4, **EPS)
  base = grpo.policy_loss(kind, LOGP, OLD, ADV, MASK, **kw)
  padded = grpo.policy_loss(kind, pad(LOGP), pad(OLD), pad(ADV), np.concatenate([MASK, [[0, 0]]]),
                            **kw)
  assert float(padded[0]) == pytest.approx(float(base[0]), abs=1e-6)
  assert float(padded[1]) == float(base[1])


def test_negative_advantage_clipped_at_one_minus_eps_low():
  # A=-1, ratio 0.5 < 1 - 0.1: loss -min(-0.5, -0.9) = 0.9 with zero gradient.
  # A=-1, ratio 0.95 inside the range: loss 0.95, gradient 0.95.
  logp = np.array([[LOG(0.5), LOG(0.95)]], np.float32)
  val, s, d, m, g = _loss_and_grad("dapo", logp, np.zeros_like(logp), np.array([-1.0], np.float32),
                                   np.ones_like(logp), **EPS)
  assert s == pytest.approx(0.9 + 0.95, abs=1e-6)
  np.testing.assert_allclose(g, [[0.0, 0.95 / 2]], atol=1e-6)
  assert float(m["clip_frac_low"]) == 0.5 and float(m["clip_frac_high"]) == 0.0
  # The same ratio 0.5 with a positive advantage is not clipped (the min picks ratio * A).
  _, s, _, m, g = _loss_and_grad("dapo", logp, np.zeros_like(logp), np.array([1.0], np.float32),
                                 np.ones_like(logp), **EPS)
  assert s == pytest.approx(-0.5 - 0.95, abs=1e-6)
  np.testing.assert_allclose(g, [[-0.5 / 2, -0.95 / 2]], atol=1e-6)
  assert float(m["clip_frac_low"]) == 0.0


def test_on_policy_gradient_is_minus_advantage():
  # ratio == 1: d loss / d logp_t = -A / |o| for 'grpo'.
  logp = np.log(np.full((2, 3), 0.3, np.float32))
  adv = np.array([2.0, -0.5], np.float32)
  _, _, _, m, g = _loss_and_grad("grpo", logp, logp, adv, np.ones_like(logp))
  np.testing.assert_allclose(g, [[-2.0 / 6] * 3, [0.5 / 6] * 3], rtol=1e-6)
  assert float(m["approx_kl_old"]) == 0.0


def test_gspo_sequence_ratio_on_hand_computed_numbers():
  # row 0: s = exp((log 1.5 + log 0.5) / 2) = sqrt(0.75) ~ 0.866 < 1 - 0.1, but A > 0 so
  #        min(s A, clip(s) A) = s A: loss -sqrt(0.75), d/dlogp_t = -s / 2 each.
  # row 1: only token 1 counts, s = 1.5, A=-1: loss 1.5 (unclipped), d/dlogp = 1.5.
  val, s, d, m, g = _loss_and_grad("gspo", LOGP, OLD, ADV, MASK, **EPS)
  s0 = math.sqrt(0.75)
  assert d == 2.0
  assert s == pytest.approx(1.5 - s0, abs=1e-6)
  np.testing.assert_allclose(g, [[-s0 / 4, -s0 / 4], [0.0, 1.5 / 2]], atol=1e-6)
  assert float(m["clip_frac_low"]) == 0.0 and float(m["clip_frac_high"]) == 0.0
  assert float(m["ratio_min"]) == pytest.approx(s0, rel=1e-6)


def test_gspo_clips_each_side_with_its_own_range():
  # row 0: s = 1.5 > 1 + 4e-4 with A=+1 -> clipped high; row 1: s = 0.5 < 1 - 3e-4 with A=-1.
  logp = np.array([[LOG(1.5), LOG(1.5)], [LOG(0.5), LOG(0.5)]], np.float32)
  val, s, d, m, g = _loss_and_grad("gspo", logp, np.zeros_like(logp), ADV, np.ones_like(logp),
                                   epsilon_low=3e-4, epsilon_high=4e-4)
  assert s == pytest.approx(-(1 + 4e-4) + (1 - 3e-4), abs=1e-6)
  np.testing.assert_array_equal(g, np.zeros_like(g))
  assert float(m["clip_frac_high"]) == 0.5 and float(m["clip_frac_low"]) == 0.5


@pytest.mark.parametrize("kl,value,grad", [
    ("k1", -LOG(2.0), 1.0),                  # -log r;        d/dlogp = +1
    ("k2", 0.5 * LOG(2.0) ** 2, -LOG(2.0)),  # (log r)^2 / 2; d/dlogp = -log r
    ("k3", 2.0 - 1.0 - LOG(2.0), 1.0 - 2.0),  # r - 1 - log r; d/dlogp = 1 - r
])
def test_kl_penalty_value_and_gradient(kl, value, grad):
  # r = p_ref / p_theta = 2 on every token, ratio to old = 1 and A = 0, so only beta * KL remains.
  logp = np.log(np.full((2, 3), 0.2, np.float32))
  ref = logp + np.float32(LOG(2.0))
  beta = 0.5
  val, s, d, m, g = _loss_and_grad("grpo", logp, logp, np.zeros(2, np.float32), np.ones_like(logp),
                                   ref_logp=ref, beta=beta, kl=kl)
  assert val == pytest.approx(beta * value, rel=1e-5)
  assert float(m["kl_ref"]) == pytest.approx(value, rel=1e-5)
  np.testing.assert_allclose(g, np.full((2, 3), beta * grad / 6), rtol=1e-5)


def test_kl_estimators_are_unbiased_or_not_as_schulman_says():
  p = np.array([0.5, 0.3, 0.15, 0.05])
  q = np.array([0.25, 0.25, 0.25, 0.25])
  true_kl = float(np.sum(p * np.log(p / q)))  # KL(p || q)
  x = np.random.default_rng(0).choice(4, size=400_000, p=p)
  logp, logq = np.log(p[x]), np.log(q[x])
  k1 = np.asarray(grpo.kl_estimate("k1", logp, logq))
  k2 = np.asarray(grpo.kl_estimate("k2", logp, logq))
  k3 = np.asarray(grpo.kl_estimate("k3", logp, logq))
  assert k1.mean() == pytest.approx(true_kl, rel=0.02)
  assert k3.mean() == pytest.approx(true_kl, rel=0.02)
  k2_expected = float(np.sum(p * 0.5 * np.log(q / p) ** 2))  # E_p[k2], not the KL
  assert k2.mean() == pytest.approx(k2_expected, rel=0.02)
  assert abs(k2_expected - true_kl) > 0.1 * true_kl  # k2 is biased for this pair
  assert k3.min() >= 0.0 and k2.min() >= 0.0 and k1.min() < 0.0
  assert k3.std() < k1.std()


def test_group_advantages_hand_computed():
  r = jnp.array([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
  sq3 = math.sqrt(3.0)  # (1 - 0.25) / sqrt(0.25 * 0.75) = sqrt(3)
  np.testing.assert_allclose(grpo.group_advantages(r, 4, eps=0.0),
                             [sq3, -1 / sq3, -1 / sq3, -1 / sq3, 0, 0, 0, 0], rtol=1e-6)
  r = jnp.array([1.0, 0.0, 3.0, 3.0])
  batch_std = math.sqrt(6.75 / 4)  # std of [1, 0, 3, 3]
  np.testing.assert_allclose(grpo.group_advantages(r, 2, scale="batch", eps=0.0),
                             [0.5 / batch_std, -0.5 / batch_std, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(grpo.group_advantages(r, 2, scale="none"), [0.5, -0.5, 0, 0])
  # eps is added to the std: group [1, 0] has std 0.5.
  np.testing.assert_allclose(grpo.group_advantages(jnp.array([1.0, 0.0]), 2, eps=0.5),
                             [0.5, -0.5], rtol=1e-6)


@pytest.mark.parametrize("scale", grpo.ADVANTAGE_SCALES)
def test_all_equal_group_gives_exact_zeros(scale):
  r = jnp.array([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.3, 0.9, 0.2], jnp.float32)
  adv = np.asarray(grpo.group_advantages(r, 3, scale=scale))
  np.testing.assert_array_equal(adv[:6], np.zeros(6, np.float32))
  assert np.all(adv[6:] != 0.0)
  assert adv[6:].sum() == pytest.approx(0.0, abs=1e-6)


def _random_batch(seed, b=8, l=6):
  rng = np.random.default_rng(seed)
  logp = np.log(rng.uniform(0.05, 0.95, (b, l))).astype(np.float32)
  old = (logp + rng.normal(0, 0.3, (b, l))).astype(np.float32)
  ref = (logp + rng.normal(0, 0.3, (b, l))).astype(np.float32)
  lengths = rng.integers(1, l + 1, b)
  lengths[3] = 0  # a fully padded row
  mask = (np.arange(l)[None, :] < lengths[:, None]).astype(np.float32)
  adv = rng.normal(0, 1, b).astype(np.float32)
  return logp, old, ref, mask, adv


@pytest.mark.parametrize("kind", sorted(grpo.POLICY_LOSSES))
def test_four_microbatches_equal_one_full_batch(kind):
  logp, old, ref, mask, adv = _random_batch(1)
  kw = dict(ref_logp=ref, beta=0.1, epsilon_low=0.2, epsilon_high=0.28, max_len=6)
  if kind == "gspo":
    kw.update(epsilon_low=0.05, epsilon_high=0.1)

  def parts(lp, sl):
    s, d, _ = grpo.policy_loss(kind, lp, old[sl], adv[sl], mask[sl],
                               **dict(kw, ref_logp=ref[sl]))
    return s, d

  def full_loss(lp):
    s, d = parts(lp, slice(None))
    return s / d
  full_val, full_grad = jax.value_and_grad(full_loss)(jnp.asarray(logp))

  sums, denoms, grads = [], [], []
  for i in range(4):
    sl = slice(2 * i, 2 * i + 2)
    lp = jnp.asarray(logp[sl])
    s, d = parts(lp, sl)
    g = jax.grad(lambda x: parts(x, sl)[0])(lp)
    sums.append(float(s))
    denoms.append(float(d))
    grads.append(np.asarray(g))
  total = sum(denoms)
  assert sum(sums) / total == pytest.approx(float(full_val), rel=1e-5, abs=1e-7)
  np.testing.assert_allclose(np.concatenate(grads) / total, full_grad, rtol=1e-5, atol=1e-7)
  assert np.any(np.asarray(full_grad) != 0.0)
  np.testing.assert_array_equal(np.asarray(full_grad)[3], np.zeros(6))  # padded row


def test_policy_loss_under_jit_matches_eager():
  logp, old, ref, mask, adv = _random_batch(2)
  fn = jax.jit(lambda *a: grpo.policy_loss("dapo", *a[:4], ref_logp=a[4], beta=0.04))
  s_jit, d_jit, m_jit = fn(logp, old, adv, mask, ref)
  s, d, m = grpo.policy_loss("dapo", logp, old, adv, mask, ref_logp=ref, beta=0.04)
  assert float(s_jit) == pytest.approx(float(s), rel=1e-6)
  assert float(d_jit) == float(d) == mask.sum()
  assert set(m_jit) == set(m) >= {"clip_frac_low", "clip_frac_high", "approx_kl_old", "kl_ref",
                                  "ratio_mean", "ratio_min", "ratio_max"}


def test_register_policy_loss_adds_a_named_kind():
  name = "test_only_reinforce"

  @grpo.register_policy_loss(name)
  def reinforce(logp, old_logp, adv, mask, kl, **_):
    return -jnp.sum(logp * adv[:, None] * mask), jnp.sum(mask), {}

  try:
    logp = np.log(np.full((1, 2), 0.5, np.float32))
    s, d, m = grpo.policy_loss(name, logp, logp, np.array([2.0], np.float32), np.ones((1, 2)))
    assert float(s) == pytest.approx(-2.0 * 2 * LOG(0.5)) and float(d) == 2.0
    assert "approx_kl_old" in m
    with pytest.raises(ValueError, match="already registered"):
      grpo.register_policy_loss(name)(reinforce)
  finally:
    del grpo.POLICY_LOSSES[name]


def test_bad_inputs_raise_value_errors_naming_the_problem():
  logp = np.zeros((2, 3), np.float32)
  adv = np.zeros(2, np.float32)
  with pytest.raises(ValueError, match="unknown policy loss 'ppo2'"):
    grpo.policy_loss("ppo2", logp, logp, adv, logp)
  with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
    grpo.policy_loss("grpo", logp, logp, adv, logp, kl="k4")
  with pytest.raises(ValueError, match="mask has shape"):
    grpo.policy_loss("grpo", logp, logp, adv, np.ones((2, 4)))
  with pytest.raises(ValueError, match="old_logp has shape"):
    grpo.policy_loss("grpo", logp, logp[:, :2], adv, logp)
  with pytest.raises(ValueError, match="ref_logp has shape"):
    grpo.policy_loss("grpo", logp, logp, adv, logp, ref_logp=logp[:1], beta=0.1)
  with pytest.raises(ValueError, match="advantages must have shape"):
    grpo.policy_loss("grpo", logp, logp, np.zeros((2, 1)), logp)
  with pytest.raises(ValueError, match="logp must have shape"):
    grpo.policy_loss("grpo", logp[0], logp[0], adv, logp[0])
  with pytest.raises(ValueError, match="needs ref_logp"):
    grpo.policy_loss("grpo", logp, logp, adv, logp, beta=0.1)
  with pytest.raises(ValueError, match="needs max_len"):
    grpo.policy_loss("dr_grpo", logp, logp, adv, logp)
  with pytest.raises(ValueError, match="epsilon_low must be < 1"):
    grpo.policy_loss("grpo", logp, logp, adv, logp, epsilon_low=1.0)
  with pytest.raises(ValueError, match="epsilon_high must be"):
    grpo.policy_loss("grpo", logp, logp, adv, logp, epsilon_high=-0.1)
  with pytest.raises(ValueError, match="group_size 3 does not divide the batch size 8"):
    grpo.group_advantages(jnp.zeros(8), 3)
  with pytest.raises(ValueError, match="unknown advantage scale"):
    grpo.group_advantages(jnp.zeros(8), 4, scale="global")
  with pytest.raises(ValueError, match="rewards must have shape"):
    grpo.group_advantages(jnp.zeros((2, 4)), 4)
  h, w, t = jnp.zeros((2, 3, 4)), jnp.zeros((4, 5)), jnp.zeros((2, 3), jnp.int32)
  with pytest.raises(ValueError, match="lm_head must have shape"):
    grpo.token_logprobs_and_entropy(h, jnp.zeros((5, 4)), t)
  with pytest.raises(ValueError, match="targets must have shape"):
    grpo.token_logprobs_and_entropy(h, w, t[:, :2])
  with pytest.raises(ValueError, match="integer token ids"):
    grpo.token_logprobs_and_entropy(h, w, t.astype(jnp.float32))
  with pytest.raises(ValueError, match="temperature must be > 0"):
    grpo.token_logprobs_and_entropy(h, w, t, temperature=0.0)
  with pytest.raises(ValueError, match="chunk_size"):
    grpo.token_logprobs_and_entropy(h, w, t, chunk_size=0)


def _head_inputs(b=3, l=7, d=16, v=50, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  h = jax.random.normal(k1, (b, l, d)).astype(dtype)
  w = (jax.random.normal(k2, (d, v)) / math.sqrt(d)).astype(dtype)
  t = jax.random.randint(k3, (b, l), 0, v)
  return h, w, t


def test_reference_logprobs_and_entropy_match_numpy():
  h, w, t = _head_inputs()
  logits = np.asarray(h, np.float64) @ np.asarray(w, np.float64) / 0.7
  logits -= logits.max(-1, keepdims=True)
  logp_all = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want_logp = np.take_along_axis(logp_all, np.asarray(t)[..., None], -1)[..., 0]
  want_ent = -(np.exp(logp_all) * logp_all).sum(-1)
  logp, ent = grpo.reference_token_logprobs_and_entropy(h, w, t, temperature=0.7)
  np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 5, 21, 64])  # T = 21: padded, exact, larger than T
def test_chunked_equals_unchunked_values_and_grads(chunk_size):
  h, w, t = _head_inputs()
  coeff = jax.random.normal(jax.random.key(5), (3, 7))

  def objective(fn, **kw):
    def f(h, w):
      logp, ent = fn(h, w, t, temperature=0.7, **kw)
      return jnp.sum(coeff * logp) + 0.3 * jnp.sum(ent), (logp, ent)
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(h, w)

  (v_c, (lp_c, ent_c)), (gh_c, gw_c) = objective(grpo.token_logprobs_and_entropy,
                                                 chunk_size=chunk_size)
  (v_r, (lp_r, ent_r)), (gh_r, gw_r) = objective(grpo.reference_token_logprobs_and_entropy)
  np.testing.assert_allclose(lp_c, lp_r, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ent_c, ent_r, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(gh_c, gh_r, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gw_c, gw_r, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(gw_r).max()) > 0


def test_chunked_bfloat16_inputs_give_float32_outputs():
  h, w, t = _head_inputs(dtype=jnp.bfloat16)
  logp, ent = grpo.token_logprobs_and_entropy(h, w, t, chunk_size=4)
  ref_logp, ref_ent = grpo.reference_token_logprobs_and_entropy(h, w, t)
  assert logp.dtype == jnp.float32 and ent.dtype == jnp.float32
  np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, ref_ent, rtol=1e-5, atol=1e-5)


def test_out_of_range_target_gives_nan_not_a_wrong_number():
  h, w, t = _head_inputs()
  t = t.at[0, 0].set(50)
  logp, _ = grpo.token_logprobs_and_entropy(h, w, t, chunk_size=4)
  assert np.isnan(logp[0, 0]) and np.all(np.isfinite(logp[1:]))


def test_chunked_backward_does_not_hold_full_logits():
  b, l, d, v = 4, 256, 32, 4096
  h, w, t = jnp.zeros((b, l, d)), jnp.zeros((d, v)), jnp.zeros((b, l), jnp.int32)
  full_logits_bytes = b * l * v * 4

  def temp_bytes(fn, **kw):
    def f(h, w):
      logp, ent = fn(h, w, t, **kw)
      return jnp.sum(logp) + jnp.sum(ent)
    compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(h, w).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp_bytes(grpo.reference_token_logprobs_and_entropy) > full_logits_bytes
  assert temp_bytes(grpo.token_logprobs_and_entropy, chunk_size=128) < full_logits_bytes // 2

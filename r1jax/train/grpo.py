"""GRPO loss math as pure functions: advantages, policy losses, KL estimators, token log-probs.

Nothing here knows about models, samplers or optimisers, so every formula can be
tested on hand-computed numbers. The RL loop (rl.py) composes these pieces.

Conventions
  B completions in a batch, L completion tokens, G completions per prompt (group size),
  D model dim, V vocab, T = B * L flattened tokens.
  `logp_BxL` is log pi_theta(o_t | q, o_<t) of each sampled token, `old_logp_BxL` the same
  under the policy that sampled (pi_theta_old), `ref_logp_BxL` under the frozen reference.
  `mask_BxL` is 1 on completion tokens that count and 0 on padding.

Every policy loss returns `(loss_sum, denominator, metrics)` with
`loss = loss_sum / denominator`. Both parts are additive over microbatches and over
data-parallel shards, so summing them before dividing gives exactly the full-batch loss
(STYLE.md item 9). The losses are *minimised*: the objective J of the papers is `-loss`.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array

ADVANTAGE_SCALES = ("group", "batch", "none")


# ---------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------


def group_advantages(rewards_B, group_size: int, *, scale: str = "group",
                     eps: float = 1e-6) -> Array:
  """Group-relative advantages, one per completion.

  The batch holds B / G prompts, each with G consecutive completions
  (rewards_B[g * G:(g + 1) * G] belong to prompt g). With r the rewards of a group:

    scale='group': A_i = (r_i - mean(r)) / (std(r) + eps)      DeepSeekMath eq. (4), the
                   outcome-supervision advantage used by DeepSeek-R1.
    scale='batch': A_i = (r_i - mean(r)) / (std(all B rewards) + eps)  group mean, batch
                   std (the "group mean, batch std" normalisation of Liu et al. 2025,
                   "Tricks or Traps? A Deep Dive into RL for LLM Reasoning"), which keeps
                   groups with a tiny spread from being blown up.
    scale='none':  A_i = r_i - mean(r)                         Dr. GRPO (Liu et al. 2025,
                   "Understanding R1-Zero-Like Training"), removing the std bias.

  std is the population standard deviation (ddof=0). TRL and verl use the Bessel-corrected
  one, which is larger by sqrt(G / (G - 1)); a G=1 group would divide by zero there.
  A group whose rewards are all equal gets exactly zero advantages for every scale
  (it carries no learning signal), even where float rounding would leave a residue.

  Args:
    rewards_B: float rewards, shape [B].
    group_size: G, must divide B.
    scale: 'group', 'batch' or 'none'.
    eps: added to the standard deviation.

  Returns:
    advantages_B, float32 (or wider if the rewards are wider).
  """
  rewards_B = jnp.asarray(rewards_B)
  if rewards_B.ndim != 1:
    raise ValueError(f"rewards must have shape [B]; got shape {rewards_B.shape}")
  if scale not in ADVANTAGE_SCALES:
    raise ValueError(f"unknown advantage scale {scale!r}; expected one of {ADVANTAGE_SCALES}")
  if not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f"group_size must be a positive int; got {group_size!r}")
  batch = rewards_B.shape[0]
  if batch % group_size:
    raise ValueError(f"group_size {group_size} does not divide the batch size {batch}")
  dtype = jnp.promote_types(rewards_B.dtype, jnp.float32)
  r_PxG = rewards_B.astype(dtype).reshape(batch // group_size, group_size)
  centred_PxG = r_PxG - jnp.mean(r_PxG, axis=1, keepdims=True)
  constant_Px1 = jnp.max(r_PxG, axis=1, keepdims=True) == jnp.min(r_PxG, axis=1, keepdims=True)
  if scale == "group":
    adv_PxG = centred_PxG / (jnp.std(r_PxG, axis=1, keepdims=True) + eps)
  elif scale == "batch":
    adv_PxG = centred_PxG / (jnp.std(r_PxG) + eps)
  else:
    adv_PxG = centred_PxG
  adv_PxG = jnp.where(constant_Px1, jnp.zeros_like(adv_PxG), adv_PxG)
  return adv_PxG.reshape(batch)


# ---------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------
# Schulman, "Approximating KL Divergence" (2020): with x ~ pi_theta and
# r = pi_ref(x) / pi_theta(x), each k is an estimator of KL(pi_theta || pi_ref):
#   k1 = -log r            unbiased, high variance, can be negative
#   k2 = (log r)^2 / 2     biased, low variance, >= 0
#   k3 = (r - 1) - log r   unbiased, low variance, >= 0 (DeepSeekMath eq. (4))
# Each takes log r = ref_logp - logp per token. No clamping is applied: a huge log r
# gives inf, which the training loop's NaN check reports instead of hiding.

KL_ESTIMATORS: dict[str, Callable[[Array], Array]] = {
    "k1": lambda log_r: -log_r,
    "k2": lambda log_r: 0.5 * jnp.square(log_r),
    "k3": lambda log_r: jnp.expm1(log_r) - log_r,
}


def kl_estimate(kind: str, logp, ref_logp) -> Array:
  """Per-token KL(pi_theta || pi_ref) estimate `kind` in {'k1', 'k2', 'k3'} (see above)."""
  if kind not in KL_ESTIMATORS:
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {sorted(KL_ESTIMATORS)}")
  return KL_ESTIMATORS[kind](ref_logp - logp)


# ---------------------------------------------------------------------------
# Policy losses
# ---------------------------------------------------------------------------

PolicyLossFn = Callable[..., tuple]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
  """Decorator adding a policy loss to POLICY_LOSSES under `name`.

  A registered function is called as
    fn(logp_BxL, old_logp_BxL, adv_B, mask_BxL, kl_BxL, *, epsilon_low, epsilon_high,
       beta, max_len) -> (loss_sum, denominator, metrics)
  with validated float inputs, mask in {0, 1} as floats, old_logp / adv / kl already
  stopped from carrying gradient except kl's path through logp, and kl_BxL zero when
  no reference is given.
  """
  def decorator(fn: PolicyLossFn) -> PolicyLossFn:
    if name in POLICY_LOSSES:
      raise ValueError(f"policy loss {name!r} is already registered")
    POLICY_LOSSES[name] = fn
    return fn
  return decorator


def _clipped_surrogate(ratio, adv, epsilon_low, epsilon_high):
  """PPO clipped surrogate as a loss: -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A).

  Also returns where the clip is active (the gradient through the ratio is zero there):
  low side when A < 0 and ratio < 1 - eps_low, high side when A > 0 and ratio > 1 + eps_high.
  """
  clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
  loss = -jnp.minimum(ratio * adv, clipped * adv)
  clip_low = (adv < 0) & (ratio < 1.0 - epsilon_low)
  clip_high = (adv > 0) & (ratio > 1.0 + epsilon_high)
  return loss, clip_low, clip_high


def _masked_mean(x, mask):
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _ratio_stats(ratio, mask) -> dict:
  has_any = jnp.sum(mask) > 0
  big = jnp.asarray(jnp.inf, ratio.dtype)
  valid = mask > 0
  return {
      "ratio_mean": _masked_mean(ratio, mask),
      "ratio_min": jnp.where(has_any, jnp.min(jnp.where(valid, ratio, big)), 1.0),
      "ratio_max": jnp.where(has_any, jnp.max(jnp.where(valid, ratio, -big)), 1.0),
  }


def _token_metrics(ratio_BxL, clip_low_BxL, clip_high_BxL, mask_BxL) -> dict:
  metrics = {
      "clip_frac_low": _masked_mean(clip_low_BxL.astype(mask_BxL.dtype), mask_BxL),
      "clip_frac_high": _masked_mean(clip_high_BxL.astype(mask_BxL.dtype), mask_BxL),
  }
  metrics.update(_ratio_stats(ratio_BxL, mask_BxL))
  return metrics


def _token_losses(logp_BxL, old_logp_BxL, adv_B, mask_BxL, kl_BxL, epsilon_low,
                  epsilon_high, beta):
  """Per-token clipped surrogate plus beta * KL, zeroed on padding; and token metrics."""
  ratio_BxL = jnp.exp(logp_BxL - old_logp_BxL)
  pg_BxL, clip_low, clip_high = _clipped_surrogate(
      ratio_BxL, adv_B[:, None], epsilon_low, epsilon_high)
  loss_BxL = (pg_BxL + beta * kl_BxL) * mask_BxL
  metrics = _token_metrics(ratio_BxL, clip_low, clip_high, mask_BxL)
  metrics["pg_loss"] = _masked_mean(pg_BxL, mask_BxL)
  return loss_BxL, metrics


@register_policy_loss("grpo")
def grpo_loss(logp_BxL, old_logp_BxL, adv_B, mask_BxL, kl_BxL, *, epsilon_low,
              epsilon_high, beta, max_len):
  """DeepSeekMath eq. (3)/(4) (GRPO), as used by DeepSeek-R1.

  J = 1/G sum_i 1/|o_i| sum_t [min(r_it A_i, clip(r_it, 1-eps_low, 1+eps_high) A_i)
      - beta * KL_it], r_it = pi_theta / pi_theta_old. Token mean within each sequence,
  then mean over sequences.
  loss_sum = sum over sequences of their token-mean loss; denominator = number of
  sequences with at least one unmasked token (fully masked rows, e.g. data-parallel
  padding, add nothing to either part).
  """
  del max_len
  loss_BxL, metrics = _token_losses(logp_BxL, old_logp_BxL, adv_B, mask_BxL, kl_BxL,
                                    epsilon_low, epsilon_high, beta)
  len_B = jnp.sum(mask_BxL, axis=1)
  seq_loss_B = jnp.sum(loss_BxL, axis=1) / jnp.maximum(len_B, 1.0)
  return jnp.sum(seq_loss_B), jnp.sum((len_B > 0).astype(len_B.dtype)), metrics


@register_policy_loss("dapo")
def dapo_loss(logp_BxL, old_logp_BxL, adv_B, mask_BxL, kl_BxL, *, epsilon_low,
              epsilon_high, beta, max_len):
  """DAPO (Yu et al. 2025): token-level mean over the whole batch, clip-higher.

  J = 1/sum_i |o_i| sum_i sum_t min(r_it A_i, clip(r_it, 1-eps_low, 1+eps_high) A_i);
  the paper uses eps_low=0.2, eps_high=0.28 and beta=0 (a beta > 0 adds beta * KL per token).
  loss_sum = sum over all unmasked tokens; denominator = number of unmasked tokens.
  Dynamic sampling (dropping all-equal groups) is a data decision left to the loop.
  """
  del max_len
  loss_BxL, metrics = _token_losses(logp_BxL, old_logp_BxL, adv_B, mask_BxL, kl_BxL,
                                    epsilon_low, epsilon_high, beta)
  return jnp.sum(loss_BxL), jnp.sum(mask_BxL), metrics


@register_policy_loss("dr_grpo")
def dr_grpo_loss(logp_BxL, old_logp_BxL, adv_B, mask_BxL, kl_BxL, *, epsilon_low,
                 epsilon_high, beta, max_len):
  """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"), eq. in section 3.2.

  Token sum per sequence divided by a constant max_len (the generation budget) instead of
  the sequence length, which removes GRPO's length bias; pair it with advantages computed
  with scale='none'. loss_sum = sum over all unmasked tokens; denominator = max_len times
  the number of sequences with at least one unmasked token.
  """
  if max_len is None:
    raise ValueError("policy loss 'dr_grpo' needs max_len (the constant generation budget)")
  loss_BxL, metrics = _token_losses(logp_BxL, old_logp_BxL, adv_B, mask_BxL, kl_BxL,
                                    epsilon_low, epsilon_high, beta)
  rows = jnp.sum((jnp.sum(mask_BxL, axis=1) > 0).astype(mask_BxL.dtype))
  return jnp.sum(loss_BxL), rows * max_len, metrics


@register_policy_loss("gspo")
def gspo_loss(logp_BxL, old_logp_BxL, adv_B, mask_BxL, kl_BxL, *, epsilon_low,
              epsilon_high, beta, max_len):
  """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"), eq. (5)-(7).

  One importance ratio per sequence, s_i = exp(1/|o_i| sum_t log(pi_theta / pi_theta_old)),
  clipped in [1 - eps_low, 1 + eps_high]; the paper's ranges are much smaller than the
  token-level ones (eps_low=3e-4, eps_high=4e-4), pass them explicitly.
  J = 1/G sum_i min(s_i A_i, clip(s_i) A_i); the paper has no KL term, here a beta > 0
  adds beta times the per-sequence token mean of the KL estimate.
  loss_sum = sum over sequences; denominator = number of non-empty sequences. The clip
  fractions are over sequences.
  """
  del max_len
  len_B = jnp.sum(mask_BxL, axis=1)
  safe_len_B = jnp.maximum(len_B, 1.0)
  log_s_B = jnp.sum((logp_BxL - old_logp_BxL) * mask_BxL, axis=1) / safe_len_B
  s_B = jnp.exp(log_s_B)
  pg_B, clip_low, clip_high = _clipped_surrogate(s_B, adv_B, epsilon_low, epsilon_high)
  kl_B = jnp.sum(kl_BxL * mask_BxL, axis=1) / safe_len_B
  row_B = (len_B > 0).astype(len_B.dtype)
  seq_loss_B = (pg_B + beta * kl_B) * row_B
  metrics = _token_metrics(s_B, clip_low, clip_high, row_B)
  metrics["pg_loss"] = _masked_mean(pg_B, row_B)
  return jnp.sum(seq_loss_B), jnp.sum(row_B), metrics


def _check_epsilon(name, value):
  if isinstance(value, (int, float)) and not (0.0 <= value and math.isfinite(value)):
    raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")


def policy_loss(kind: str, logp, old_logp, advantages, mask, *, ref_logp=None,
                epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0,
                kl: str = "k3", max_len: Optional[int] = None):
  """Policy loss `kind` from POLICY_LOSSES ('grpo', 'dapo', 'dr_grpo', 'gspo', ...).

  Args:
    kind: registered loss name.
    logp: [B, L] log-probs of the sampled tokens under the current policy (differentiated).
    old_logp: [B, L] log-probs under the sampling policy (no gradient).
    advantages: [B] one advantage per completion (no gradient).
    mask: [B, L] 1 (or True) on completion tokens, 0 on padding.
    ref_logp: [B, L] log-probs under the reference policy (no gradient); needed if beta > 0.
    epsilon_low, epsilon_high: clip range [1 - epsilon_low, 1 + epsilon_high] of the ratio.
    beta: weight of the KL penalty to the reference.
    kl: KL estimator name, 'k1' | 'k2' | 'k3' (see KL_ESTIMATORS).
    max_len: constant per-sequence normaliser, required by 'dr_grpo'.

  Returns:
    (loss_sum, denominator, metrics): scalars with loss = loss_sum / denominator (the
    denominator is 0 only for an all-padding batch); see each loss for what the two parts
    are. metrics (microbatch-local, not additive) holds clip_frac_low, clip_frac_high,
    ratio_mean / ratio_min / ratio_max, pg_loss, approx_kl_old (k3 estimate of
    KL(pi_theta || pi_theta_old), the policy drift) and kl_ref (the chosen estimator's
    mean against the reference; 0 without one).
  """
  if kind not in POLICY_LOSSES:
    raise ValueError(f"unknown policy loss {kind!r}; registered: {sorted(POLICY_LOSSES)}")
  if kl not in KL_ESTIMATORS:
    raise ValueError(f"unknown KL estimator {kl!r}; expected one of {sorted(KL_ESTIMATORS)}")
  logp, old_logp, advantages, mask = (jnp.asarray(x) for x in (logp, old_logp, advantages, mask))
  if logp.ndim != 2:
    raise ValueError(f"logp must have shape [B, L]; got shape {logp.shape}")
  for name, x in (("old_logp", old_logp), ("mask", mask)) + (
      (("ref_logp", jnp.asarray(ref_logp)),) if ref_logp is not None else ()):
    if x.shape != logp.shape:
      raise ValueError(f"{name} has shape {x.shape}, but logp has shape {logp.shape}")
  if advantages.shape != logp.shape[:1]:
    raise ValueError(f"advantages must have shape [B]={logp.shape[:1]}; got {advantages.shape}")
  _check_epsilon("epsilon_low", epsilon_low)
  _check_epsilon("epsilon_high", epsilon_high)
  if isinstance(epsilon_low, (int, float)) and epsilon_low >= 1.0:
    raise ValueError(f"epsilon_low must be < 1 (the lower clip bound 1 - epsilon_low > 0); "
                     f"got {epsilon_low}")
  if isinstance(beta, (int, float)) and beta != 0.0 and ref_logp is None:
    raise ValueError(f"beta={beta} needs ref_logp (the reference policy's log-probs)")
  if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
    raise ValueError(f"max_len must be a positive int; got {max_len!r}")

  dtype = jnp.promote_types(logp.dtype, jnp.float32)
  logp = logp.astype(dtype)
  old_logp = jax.lax.stop_gradient(old_logp.astype(dtype))
  advantages = jax.lax.stop_gradient(advantages.astype(dtype))
  mask = jax.lax.stop_gradient(mask.astype(dtype))
  if ref_logp is not None:
    ref = jax.lax.stop_gradient(jnp.asarray(ref_logp).astype(dtype))
    kl_BxL = KL_ESTIMATORS[kl](ref - logp)
  else:
    kl_BxL = jnp.zeros_like(logp)
  loss_sum, denominator, metrics = POLICY_LOSSES[kind](
      logp, old_logp, advantages, mask, kl_BxL, epsilon_low=epsilon_low,
      epsilon_high=epsilon_high, beta=beta, max_len=max_len)
  drift_BxL = jax.lax.stop_gradient(KL_ESTIMATORS["k3"](old_logp - logp))
  metrics = dict(metrics)
  metrics["approx_kl_old"] = _masked_mean(drift_BxL, mask)
  metrics["kl_ref"] = jax.lax.stop_gradient(_masked_mean(kl_BxL, mask))
  metrics = {k: jax.lax.stop_gradient(v) for k, v in metrics.items()}
  return loss_sum, jax.lax.stop_gradient(denominator), metrics


# ---------------------------------------------------------------------------
# Token log-probs and entropy without [B, L, V] logits
# ---------------------------------------------------------------------------


def _chunk_logprobs_entropy(hidden_CxD, lm_head_DxV, targets_C, temperature):
  logits_CxV = jnp.dot(hidden_CxD, lm_head_DxV, preferred_element_type=jnp.float32)
  logits_CxV = logits_CxV.astype(jnp.float32) / temperature
  logz_C = jax.nn.logsumexp(logits_CxV, axis=-1)
  logp_CxV = logits_CxV - logz_C[:, None]
  tgt_logp_C = jnp.take_along_axis(logp_CxV, targets_C[:, None], axis=-1, mode="fill",
                                   fill_value=jnp.nan)[:, 0]
  entropy_C = -jnp.sum(jnp.exp(logp_CxV) * logp_CxV, axis=-1)
  return tgt_logp_C, entropy_C


def _check_head_inputs(hidden_BxLxD, lm_head_DxV, targets_BxL, temperature):
  if hidden_BxLxD.ndim != 3:
    raise ValueError(f"hidden must have shape [B, L, D]; got {hidden_BxLxD.shape}")
  if lm_head_DxV.ndim != 2 or lm_head_DxV.shape[0] != hidden_BxLxD.shape[2]:
    raise ValueError(f"lm_head must have shape [D={hidden_BxLxD.shape[2]}, V]; "
                     f"got {lm_head_DxV.shape}")
  if targets_BxL.shape != hidden_BxLxD.shape[:2]:
    raise ValueError(f"targets must have shape [B, L]={hidden_BxLxD.shape[:2]}; "
                     f"got {targets_BxL.shape}")
  if not jnp.issubdtype(targets_BxL.dtype, jnp.integer):
    raise ValueError(f"targets must be integer token ids; got dtype {targets_BxL.dtype}")
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature must be > 0; got {temperature}")


def reference_token_logprobs_and_entropy(hidden_BxLxD, lm_head_DxV, targets_BxL, *,
                                         temperature: float = 1.0):
  """Unchunked oracle for token_logprobs_and_entropy (materialises [B, L, V] logits)."""
  hidden_BxLxD, lm_head_DxV, targets_BxL = map(jnp.asarray,
                                               (hidden_BxLxD, lm_head_DxV, targets_BxL))
  _check_head_inputs(hidden_BxLxD, lm_head_DxV, targets_BxL, temperature)
  b, l, d = hidden_BxLxD.shape
  logp_T, ent_T = _chunk_logprobs_entropy(hidden_BxLxD.reshape(b * l, d), lm_head_DxV,
                                          targets_BxL.reshape(b * l), temperature)
  return logp_T.reshape(b, l), ent_T.reshape(b, l)


def token_logprobs_and_entropy(hidden_BxLxD, lm_head_DxV, targets_BxL, *,
                               chunk_size: int = 1024, temperature: float = 1.0):
  """log softmax(h W / temperature)[target] and the softmax entropy, chunk by chunk.

  The B * L tokens are flattened and processed chunk_size at a time with lax.map over a
  jax.checkpoint-ed chunk function, so neither the forward nor the backward pass holds more
  than [chunk_size, V] logits (the backward recomputes each chunk's logits). Logits are
  accumulated in float32 whatever the input dtype. Targets outside [0, V) give NaN.
  Entropy is H_t = -sum_v p_v log p_v of the temperature-scaled distribution; its gradient
  flows too (for an entropy bonus).

  Args:
    hidden_BxLxD: final hidden states (after the last norm).
    lm_head_DxV: output projection.
    targets_BxL: int token ids whose log-probs are wanted (the next tokens).
    chunk_size: tokens per chunk; the last chunk is zero-padded.
    temperature: the sampling temperature, so log-probs match the sampler's distribution.

  Returns:
    (logp_BxL, entropy_BxL), float32.
  """
  hidden_BxLxD, lm_head_DxV, targets_BxL = map(jnp.asarray,
                                               (hidden_BxLxD, lm_head_DxV, targets_BxL))
  _check_head_inputs(hidden_BxLxD, lm_head_DxV, targets_BxL, temperature)
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
  b, l, d = hidden_BxLxD.shape
  t = b * l
  chunk = min(chunk_size, t)
  n_chunks = -(-t // chunk)
  pad = n_chunks * chunk - t
  hidden_TxD = jnp.pad(hidden_BxLxD.reshape(t, d), ((0, pad), (0, 0)))
  targets_T = jnp.pad(targets_BxL.reshape(t), (0, pad))

  @jax.checkpoint
  def one_chunk(args):
    h_CxD, tgt_C = args
    return _chunk_logprobs_entropy(h_CxD, lm_head_DxV, tgt_C, temperature)

  logp_NxC, ent_NxC = jax.lax.map(
      one_chunk, (hidden_TxD.reshape(n_chunks, chunk, d), targets_T.reshape(n_chunks, chunk)))
  return logp_NxC.reshape(-1)[:t].reshape(b, l), ent_NxC.reshape(-1)[:t].reshape(b, l)

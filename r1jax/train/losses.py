"""Language-model losses: next-token cross entropy, the MTP loss and the balance loss.

Every loss returns (loss_sum, denominator, metrics) so that gradient accumulation and data
parallelism normalise exactly: sum both over microbatches or devices, then divide.

MTP (DeepSeek-V3 eq. 25): L_MTP = lambda / D * sum_k L_MTP^k. Departure from the paper: each
L_MTP^k is normalised by the main loss's token count rather than its own (slightly smaller)
count, which keeps the total a single (sum, denominator) pair.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.model import decoder


def cross_entropy_sum(logits_BxLxV, targets_BxL, weights_BxL):
  """(sum of weighted token NLL, sum of weights); logits in any float dtype."""
  logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  nll_BxL = -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
  w = weights_BxL.astype(jnp.float32)
  return jnp.sum(nll_BxL * w), jnp.sum(w)


def target_weights(loss_mask_BxL, segment_ids_BxL, shift: int):
  """Weights for predicting token i+shift from position i (same segment, not padding)."""
  seg_src, seg_tgt = segment_ids_BxL[:, :-shift], segment_ids_BxL[:, shift:]
  return loss_mask_BxL[:, shift:] & (seg_src == seg_tgt) & (seg_tgt != 0)


def lm_loss(params, tokens_BxL, cfg, *, loss_mask=None, segment_ids=None, positions=None,
            return_hidden: bool = False):
  """Next-token loss (+ lambda-weighted MTP loss + alpha-weighted balance loss).

  loss_mask [B, L] marks the tokens whose prediction is trained (e.g. response tokens only
  in SFT); a token at index i is predicted from position i - 1 (and i - 1 - k by MTP module k).
  return_hidden: also return the final-normed hidden state [B, L, D] as metrics['hidden']
  (for a loss term that projects it again, e.g. distillation's KL).
  """
  b, l = tokens_BxL.shape
  if segment_ids is None:
    segment_ids = jnp.ones((b, l), jnp.int32)
  if loss_mask is None:
    loss_mask = jnp.ones((b, l), bool)
  loss_mask = loss_mask.astype(bool)
  logits, aux = decoder.forward(params, tokens_BxL, cfg, positions=positions,
                                segment_ids=segment_ids, return_hidden=return_hidden)
  w = target_weights(loss_mask, segment_ids, 1)
  main_sum, denom = cross_entropy_sum(logits[:, :-1], tokens_BxL[:, 1:], w)
  metrics = {"nll_sum": main_sum, "tokens": denom}
  loss_sum = main_sum
  if cfg.mtp_depth > 0:
    mtp_total = jnp.zeros((), jnp.float32)
    for k in range(1, cfg.mtp_depth + 1):
      shift = k + 1
      wk = target_weights(loss_mask, segment_ids, shift)
      s, n = cross_entropy_sum(aux["mtp_logits"][k - 1][:, :-shift], tokens_BxL[:, shift:], wk)
      metrics[f"mtp{k}_nll_sum"], metrics[f"mtp{k}_tokens"] = s, n
      mtp_total = mtp_total + s
    loss_sum = loss_sum + cfg.mtp_lambda / cfg.mtp_depth * mtp_total
  if cfg.seq_aux_alpha > 0:
    loss_sum = loss_sum + cfg.seq_aux_alpha * aux["balance_loss"] * denom
  metrics["balance_loss"] = aux["balance_loss"]
  if return_hidden:
    metrics["hidden"] = aux["hidden"]
  if "tokens_per_expert" in aux:
    metrics["tokens_per_expert"] = aux["tokens_per_expert"]
    metrics["dropped_assignments"] = aux["dropped_assignments"]
  return loss_sum, denom, metrics

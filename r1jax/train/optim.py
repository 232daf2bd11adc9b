"""The optimizer shared by SFT and GRPO: AdamW, warmup + cosine decay, global-norm clipping.

Weight decay skips norm scales and the router correction biases. The biases are not
trained at all: `apply_updates` puts them back after every optimizer step, and they move
only through `moe.update_router_bias` (DeepSeek-V3's aux-loss-free balancing).
"""
from __future__ import annotations

import jax
import ml_collections
import optax

from r1jax.model import decoder
from r1jax.model import moe


def optimizer_defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.lr = 1e-3               # peak learning rate
  c.warmup_steps = 20
  c.min_lr_ratio = 0.1      # cosine decays to lr * min_lr_ratio
  c.b1 = 0.9
  c.b2 = 0.95
  c.weight_decay = 0.01
  c.grad_clip = 1.0         # global-norm clipping (0 = off)
  c.router_bias_update_rate = 1e-3  # u, aux-loss-free bias update speed (0 = frozen biases)
  return c


def _decay_mask(params):
  def decays(path, _):
    name = getattr(path[-1], "key", "")
    return not (name.endswith("norm") or name == "bias")
  return jax.tree_util.tree_map_with_path(decays, params)


def validate(ocfg, name: str = "optimizer") -> None:
  """ValueError naming the field (as `name`.field) of an optimizer config no run could use."""
  for field in ("lr", "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip",
                "router_bias_update_rate"):
    if ocfg[field] < 0:
      raise ValueError(f"{name} config field {field!r} must be >= 0, got {ocfg[field]}")
  for field in ("b1", "b2"):
    if not 0 <= ocfg[field] < 1:
      raise ValueError(f"{name} config field {field!r} must lie in [0, 1), got {ocfg[field]}")


def make_optimizer(ocfg, total_steps: int) -> optax.GradientTransformation:
  validate(ocfg)
  if total_steps < 1:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  warmup = min(int(ocfg.warmup_steps), max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else ocfg.lr, peak_value=ocfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=ocfg.lr * ocfg.min_lr_ratio)
  parts = []
  if ocfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(ocfg.grad_clip))
  parts.append(optax.adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, weight_decay=ocfg.weight_decay,
                           mask=_decay_mask))
  return optax.chain(*parts)


def apply_updates(params, updates, tokens_per_expert=None, bias_rate: float = 0.0):
  """Applies the optimizer step, then the aux-loss-free bias update from observed loads."""
  bias = decoder.router_biases(params)
  new_params = optax.apply_updates(params, updates)
  if bias is None:
    return new_params
  if tokens_per_expert is not None and bias_rate > 0:
    bias = moe.update_router_bias(bias, tokens_per_expert, bias_rate)
  return decoder.with_router_biases(new_params, bias)

"""Guards shared by the training loops: the global norm, and stops on NaN/Inf.

A NaN loss or parameter stops a run with a message before anything poisoned is
checkpointed (STYLE.md item 12).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.floating)]))


def check_params_finite(step: int, params) -> None:
  """Refuses to checkpoint parameters holding NaN/Inf (the loss only sees them one step later)."""
  if not bool(_all_finite(params)):
    raise FloatingPointError(f"step {step}: the parameters contain NaN or Inf; stopping without "
                             "saving them (lower the learning rate, or check the data)")


def check_finite(step: int, metrics: dict, what: str = "loss") -> None:
  """Stops a run on a NaN/Inf loss before anything poisoned is checkpointed."""
  value = metrics.get(what)
  if value is not None and not np.isfinite(value):
    raise FloatingPointError(
        f"step {step}: {what} is {value}; stopping without saving a checkpoint of this state "
        "(lower the learning rate, or check the data)")

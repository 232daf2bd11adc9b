"""Task rewards callable by name, so verifier worker processes can rebuild the task.

A `VerifierPool` needs a picklable reward function; a task object may hold unpicklable
state, so workers receive (task name, frozen kwargs) and build the task once per process.
"""
from __future__ import annotations

import functools
from typing import Any

from r1jax.tasks import base


def freeze(value: Any):
  """A hashable, picklable copy of nested dicts/lists (dicts become sorted item tuples)."""
  if isinstance(value, dict) or hasattr(value, "items"):
    return ("__dict__",) + tuple(sorted((k, freeze(v)) for k, v in value.items()))
  if isinstance(value, (list, tuple)):
    return tuple(freeze(v) for v in value)
  return value


def thaw(value: Any):
  if isinstance(value, tuple) and value[:1] == ("__dict__",):
    return {k: thaw(v) for k, v in value[1:]}
  if isinstance(value, tuple):
    return tuple(thaw(v) for v in value)
  return value


@functools.lru_cache(maxsize=8)
def _task(name: str, frozen_kwargs) -> base.Task:
  return base.get_task(name, **thaw(frozen_kwargs))


def task_reward(name: str, frozen_kwargs, prompt: str, completion: str, **fields) -> float:
  return _task(name, frozen_kwargs).reward(prompt, completion, **fields)

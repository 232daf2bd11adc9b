"""Reward functions for the pool tests; importable by the pool's worker processes."""
from __future__ import annotations

import ctypes
import os
import time


def echo_reward(prompt, completion, *, value=1.0, **_):
  del prompt, completion
  return value


def native_hang_reward(prompt, completion, *, hang=False, **_):
  """Blocks inside a C call (libc sleep), where no Python signal handler can run."""
  del prompt, completion
  if hang:
    ctypes.CDLL(None).sleep(3600)
  return 1.0


def crash_reward(prompt, completion, *, crash=False, **_):
  del prompt, completion
  if crash:
    os._exit(7)
  return 1.0


def sleep_reward(prompt, completion, *, sleep_s=0.0, **_):
  del prompt, completion
  time.sleep(sleep_s)
  return 1.0

"""Rotary position embeddings in DeepSeek's interleaved layout, with YaRN scaling.

The reference (DeepSeek-V3 `model.py`) rotates adjacent pairs (x[2i], x[2i+1]) by the
angle position * inv_freq[i], treating each pair as a complex number. HF stores the same
weights and permutes q/k into a cat(even, odd) layout before `rotate_half`; that leaves
q.k unchanged, so the scores here equal HF's.

YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension"): frequencies are
blended between extrapolation (original) and interpolation (divided by `factor`) with a
linear ramp between the correction dims of beta_fast and beta_slow rotations. Two
attention temperatures exist, and both follow HF's DeepseekV3 exactly:
  * cos/sin are multiplied by `attention_factor` = mscale(s, mscale) / mscale(s, mscale_all_dim)
    when both are given (1.0 for V3), else mscale(s, 1);
  * the softmax scale is multiplied by mscale(s, mscale_all_dim)^2 (the reference's
    `softmax_scale * mscale * mscale`).
Departure from the reference: it applies YaRN only when max_seq_len > original_seq_len;
here (as in HF) YaRN applies whenever rope_scaling_type == 'yarn'.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature: 0.1 * mscale * ln(s) + 1 for s > 1."""
  if scale <= 1.0:
    return 1.0
  return 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
  """The rotary dim whose wavelength fits `num_rotations` times into `max_pos`."""
  return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def inv_freq(cfg) -> np.ndarray:
  """Inverse frequencies [R/2] in float32, YaRN-blended when configured."""
  dim = cfg.qk_rope_head_dim
  base = float(cfg.rope_theta)
  pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
  extrapolation = (1.0 / pos_freqs).astype(np.float32)
  if cfg.rope_scaling_type != "yarn":
    return extrapolation
  factor = float(cfg.yarn_factor)
  interpolation = (1.0 / (factor * pos_freqs)).astype(np.float32)
  orig = cfg.yarn_original_max_position_embeddings
  low = math.floor(_correction_dim(cfg.yarn_beta_fast, dim, base, orig))
  high = math.ceil(_correction_dim(cfg.yarn_beta_slow, dim, base, orig))
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # avoid a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation_weight = 1.0 - ramp
  return (interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight).astype(np.float32)


def attention_factor(cfg) -> float:
  """The factor cos/sin are multiplied by (YaRN's temperature on the rotary part)."""
  if cfg.rope_scaling_type != "yarn":
    return 1.0
  if cfg.yarn_mscale and cfg.yarn_mscale_all_dim:
    return yarn_get_mscale(cfg.yarn_factor, cfg.yarn_mscale) / yarn_get_mscale(
        cfg.yarn_factor, cfg.yarn_mscale_all_dim)
  return yarn_get_mscale(cfg.yarn_factor)


def softmax_scale(cfg) -> float:
  """(N + R)^-0.5, times mscale(s, mscale_all_dim)^2 under YaRN."""
  scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
  if cfg.rope_scaling_type == "yarn" and cfg.yarn_mscale_all_dim:
    m = yarn_get_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim)
    scale *= m * m
  return scale


def apply_rope(x_BxLxHxR: jnp.ndarray, positions_BxL: jnp.ndarray, cfg) -> jnp.ndarray:
  """Rotates adjacent pairs of the last dim. Accepts [B, L, R] or [B, L, H, R]."""
  freqs_R2 = jnp.asarray(inv_freq(cfg))
  angles_BxLxR2 = positions_BxL.astype(jnp.float32)[..., None] * freqs_R2[None, None, :]
  factor = attention_factor(cfg)
  cos = jnp.cos(angles_BxLxR2) * factor
  sin = jnp.sin(angles_BxLxR2) * factor
  if x_BxLxHxR.ndim == 4:
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x = x_BxLxHxR.astype(jnp.float32)
  pairs = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
  x_even, x_odd = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], axis=-1)
  return rotated.reshape(x.shape).astype(x_BxLxHxR.dtype)

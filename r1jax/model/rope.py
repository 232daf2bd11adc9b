"""Rotary position embeddings (Su et al. 2021, RoFormer) with YaRN and Llama-3 scaling.

Two layouts, picked by the attention: MLA rotates in DeepSeek's interleaved layout (below);
GQA (Qwen2, Llama) rotates HF's `rotate_half` layout, pairing x[i] with x[i + d/2], exactly
as those checkpoints were trained (their q/k weights are not permuted).

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

Llama-3 scaling (Meta's Llama 3.1 release, `apply_scaling` in meta-llama/llama-models
`reference_impl/model.py`; HF's `_compute_llama3_parameters`): with wavelength
lambda_i = 2 pi / inv_freq_i, L = original_max_position_embeddings, lo = L / low_freq_factor
and hi = L / high_freq_factor,
  lambda_i < hi:  inv_freq_i kept (high frequencies);
  lambda_i > lo:  inv_freq_i / factor (low frequencies, interpolated);
  otherwise:      (1 - s) inv_freq_i / factor + s inv_freq_i,
                  s = (L / lambda_i - low_freq_factor) / (high_freq_factor - low_freq_factor).
It leaves the attention temperature at 1.
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


def rotary_dim(cfg) -> int:
  """The rotated width: MLA's decoupled RoPE dim R, or GQA's whole head."""
  return cfg.head_dim if cfg.attention_type == "gqa" else cfg.qk_rope_head_dim


def _llama3(freqs: np.ndarray, cfg) -> np.ndarray:
  """Llama-3 frequency scaling (module docstring)."""
  factor, lo_f, hi_f = (float(cfg.llama3_factor), float(cfg.llama3_low_freq_factor),
                        float(cfg.llama3_high_freq_factor))
  orig = float(cfg.llama3_original_max_position_embeddings)
  wavelen = 2 * math.pi / freqs
  scaled = np.where(wavelen > orig / lo_f, freqs / factor, freqs)
  smooth = (orig / wavelen - lo_f) / (hi_f - lo_f)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < orig / hi_f) & ~(wavelen > orig / lo_f)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def inv_freq(cfg) -> np.ndarray:
  """Inverse frequencies [rotary_dim / 2] in float32, YaRN- or Llama-3-scaled when configured."""
  dim = rotary_dim(cfg)
  base = float(cfg.rope_theta)
  pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
  extrapolation = (1.0 / pos_freqs).astype(np.float32)
  if cfg.rope_scaling_type == "llama3":
    return _llama3(extrapolation, cfg)
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
  """(N + R)^-0.5 (GQA: head_dim^-0.5), times mscale(s, mscale_all_dim)^2 under YaRN."""
  if cfg.attention_type == "gqa":
    return cfg.head_dim ** -0.5
  scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
  if cfg.rope_scaling_type == "yarn" and cfg.yarn_mscale_all_dim:
    m = yarn_get_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim)
    scale *= m * m
  return scale


def apply_rope(x_BxLxHxR: jnp.ndarray, positions_BxL: jnp.ndarray, cfg) -> jnp.ndarray:
  """Rotates pairs of the last dim: adjacent ones (MLA), or the two halves (GQA's rotate_half).

  Accepts [B, L, R] or [B, L, H, R].
  """
  freqs_R2 = jnp.asarray(inv_freq(cfg))
  angles_BxLxR2 = positions_BxL.astype(jnp.float32)[..., None] * freqs_R2[None, None, :]
  factor = attention_factor(cfg)
  cos = jnp.cos(angles_BxLxR2) * factor
  sin = jnp.sin(angles_BxLxR2) * factor
  if x_BxLxHxR.ndim == 4:
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x = x_BxLxHxR.astype(jnp.float32)
  if cfg.attention_type == "gqa":
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxR.dtype)
  pairs = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
  x_even, x_odd = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], axis=-1)
  return rotated.reshape(x.shape).astype(x_BxLxHxR.dtype)

"""Backend choice and tile sizes for the grouped matmul kernels.

The backend follows the devices a computation is compiled for, not
`jax.default_backend()`: a TPU topology compiled from a CPU host must get the Mosaic
kernel even though the process itself only has CPU devices.
"""
import dataclasses

import jax
import numpy as np

BACKENDS = ("tpu", "gpu")


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Tile sizes: tm rows of lhs, tk of the contracted dim, tn output columns.

  In tgmm the contracted dim is the row dim, so tm is its reduction step and
  (tk, tn) is the output block of each group's [k, n] gradient.
  """
  tm: int
  tk: int
  tn: int


# Per backend, for 16-bit and for 32-bit inputs.
# TPU: lhs, rhs and out blocks are double-buffered in VMEM beside the f32 accumulator.
# 512 x 1024 x 1024 comes to ~10 MiB in bf16 and 512^3 to ~7 MiB in f32, both under
# the 16 MiB default scoped VMEM of v5e and v5p; f32 with 1024 runs out of VMEM there
# (checked by compiling for v5e, v5p and v6e). Multiples of 256 suit every MXU width.
# GPU: 128 x 64 x 128 is the usual Triton tile for bf16 tensor cores; f32 (tf32) tiles
# are halved to keep three pipeline stages within shared memory.
DEFAULT_TILING = {
    "tpu": {2: Tiling(512, 1024, 1024), 4: Tiling(512, 512, 512)},
    "gpu": {2: Tiling(128, 64, 128), 4: Tiling(64, 64, 64)},
}


def default_tiling(backend: str, dtype) -> Tiling:
  """DEFAULT_TILING for the backend and the input dtype's width (16 or 32 bits)."""
  if backend not in DEFAULT_TILING:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  return DEFAULT_TILING[backend][2 if np.dtype(dtype).itemsize <= 2 else 4]


# Smallest legal block edges: TPU sublanes x lanes (16 rows for packed 16-bit types),
# Triton's minimum dot size.
_TPU_LANES = 128
_GPU_MIN = 16


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def fit_tiling(tiling: Tiling, m: int, k: int, n: int, backend: str,
               dtype=np.float32) -> Tiling:
  """Shrinks `tiling` for small problems while keeping every block legal.

  TPU: a block edge is the whole (padded) dim or a multiple of (sublanes, 128);
  GPU: Triton wants powers of two, at least 16.
  """
  if backend == "tpu":
    sub = 16 if np.dtype(dtype).itemsize == 2 else 8
    tm = min(tiling.tm, _round_up(m, sub))
    tk = k if k <= tiling.tk else tiling.tk
    tn = n if n <= tiling.tn else tiling.tn
    for name, v, q in (("tm", tiling.tm, sub), ("tk", tiling.tk, _TPU_LANES),
                       ("tn", tiling.tn, _TPU_LANES)):
      if v % q:
        raise ValueError(f"TPU tiling.{name}={v} must be a multiple of {q}")
    return Tiling(tm, tk, tn)
  if backend == "gpu":
    for name, v in (("tm", tiling.tm), ("tk", tiling.tk), ("tn", tiling.tn)):
      if v < _GPU_MIN or v & (v - 1):
        raise ValueError(f"GPU tiling.{name}={v} must be a power of two >= {_GPU_MIN}")
    fit = lambda t, d: min(t, max(_GPU_MIN, _next_pow2(d)))
    return Tiling(fit(tiling.tm, m), fit(tiling.tk, k), fit(tiling.tn, n))
  raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _devices(devices) -> list:
  if isinstance(devices, jax.sharding.Mesh):
    return list(devices.devices.flat)
  if isinstance(devices, jax.sharding.Sharding):
    return list(devices.device_set)
  if hasattr(devices, "platform"):
    return [devices]
  return list(np.asarray(devices, dtype=object).flat)


def backend_for(devices, *, cpu: str = "tpu") -> str:
  """'tpu' or 'gpu' for a device list, Mesh, Sharding or single device.

  CPU devices return `cpu` (default 'tpu'): there the kernel can only run with
  interpret=True (see `interpret_for`), and the TPU kernel is the one the tests
  check most. Mixed platforms are an error.
  """
  platforms = {d.platform for d in _devices(devices)}
  if len(platforms) != 1:
    raise ValueError(f"expected devices of one platform, got {sorted(platforms)}")
  platform = platforms.pop()
  if platform == "tpu":
    return "tpu"
  if platform in ("gpu", "cuda", "rocm"):
    return "gpu"
  if platform == "cpu":
    if cpu not in BACKENDS:
      raise ValueError(f"cpu= must be one of {BACKENDS}, got {cpu!r}")
    return cpu
  raise ValueError(f"no grouped-matmul kernel for platform {platform!r}")


def interpret_for(devices) -> bool:
  """True when the devices are CPUs, where Pallas kernels run only interpreted."""
  return all(d.platform == "cpu" for d in _devices(devices))

"""Small shared building blocks: RMSNorm, SwiGLU, parameter specs and their init.

A parameter spec (`ParamSpec`) holds a shape, logical axis names and an init rule. The
model declares its parameters once as a tree of specs; `init_params`, the logical-axis
tree and the shape-only parameter counts are all read off that one tree, so they can
never disagree.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  init: str = "normal"   # 'normal' (std = cfg.init_std), 'ones' or 'zeros'

  def __post_init__(self):
    if len(self.shape) != len(self.axes):
      raise ValueError(f"shape {self.shape} and axes {self.axes} differ in rank")


def is_spec(x: Any) -> bool:
  return isinstance(x, ParamSpec)


def stack_specs(tree, n: int, axis_name: str = "layers"):
  """Prepends a stacked axis of size n to every spec (for lax.scan over layers)."""
  return jax.tree.map(lambda s: ParamSpec((n,) + s.shape, (axis_name,) + s.axes, s.init),
                      tree, is_leaf=is_spec)


def init_from_specs(specs, key: jax.Array, std: float, dtype) -> Any:
  """Materialises a spec tree; each leaf gets its own key from a fixed leaf order."""
  leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
  keys = jax.random.split(key, len(leaves))
  out = []
  for spec, k in zip(leaves, keys):
    if spec.init == "ones":
      out.append(jnp.ones(spec.shape, dtype))
    elif spec.init == "zeros":
      out.append(jnp.zeros(spec.shape, dtype))
    elif spec.init == "normal":
      out.append((std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype))
    else:
      raise ValueError(f"unknown init rule {spec.init!r}")
  return jax.tree.unflatten(treedef, out)


def dense(x, w, n_in: int = 1, preferred_element_type=None):
  """Contracts the last n_in dims of x with the first n_in dims of w, as one 2-D matmul.

  Flattening the leading (batch, sequence) dims first matters on XLA:CPU: a weight gradient
  contracting over two batch-like dims is several times slower than the same 2-D matmul.
  """
  lead, inner = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:]
  if tuple(w.shape[:n_in]) != tuple(inner):
    raise ValueError(f"dense: x dims {inner} do not match w dims {w.shape[:n_in]}")
  out = w.shape[n_in:]
  y = jnp.matmul(x.reshape(-1, math.prod(inner)), w.reshape(math.prod(inner), math.prod(out)),
                 preferred_element_type=preferred_element_type)
  return y.reshape(lead + out)


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
  """RMSNorm (Zhang & Sennrich 2019), statistics in float32 as in the reference."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  w = weight.astype(x.dtype).reshape((1,) * (x.ndim - 1) + weight.shape)
  return w * normed.astype(x.dtype)


def fuse_swiglu(p: dict) -> dict:
  """The SwiGLU weights in the layout `swiglu` runs on: gate and up concatenated.

  {'w_gate', 'w_up', 'w_down'} (stored, one array per HF tensor) -> {'w_gu' [..., D, 2F],
  'w_down'}: one matmul reads the input once for both. Works on stacked experts too
  ([E, D, F] -> [E, D, 2F]); differentiable, so training computes it inside the step.
  """
  return {"w_gu": jnp.concatenate([p["w_gate"], p["w_up"]], axis=-1), "w_down": p["w_down"]}


def swiglu(x, p: dict, matmul=dense, down_matmul=None):
  """SwiGLU FFN (Shazeer 2020): down(silu(x W_gate) * (x W_up)) over `fuse_swiglu` weights.

  matmul(x, w) multiplies by the gate/up weights and down_matmul (default: matmul) by
  w_down; the MoE dispatches pass batched or grouped matmuls here, so every FFN of the
  model, dense or expert, runs this one function.
  """
  gu = matmul(x, p["w_gu"])
  f = gu.shape[-1] // 2
  return (down_matmul or matmul)(jax.nn.silu(gu[..., :f]) * gu[..., f:], p["w_down"])


def swiglu_specs(d: int, f: int, mlp_axis: str = "mlp") -> dict:
  return {
      "w_gate": ParamSpec((d, f), ("embed", mlp_axis)),
      "w_up": ParamSpec((d, f), ("embed", mlp_axis)),
      "w_down": ParamSpec((f, d), (mlp_axis, "embed")),
  }

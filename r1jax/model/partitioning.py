"""The logical-axis rules: which mesh axis, if any, each logical axis name is split over.

Kept in the model package, free of the model's modules, so the model's expert-parallel
layer (expert_parallel.py) reads the same table as the placement in r1jax/sharding.py
(which re-exports it) without an import circle. Mesh axes: 'data', 'fsdp', 'expert',
'tensor' (see r1jax/sharding.py).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),
    "layers": None,
    "mtp_layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "q_lora": None,
    "kv_lora": None,
    "kv_lora_rope": None,
    "heads": "tensor",
    "kv_heads": "tensor",   # GQA key/value heads (replicated when Hkv does not divide)
    "head_dim": None,       # GQA head size
    "qk_head": None,
    "kv_head": None,
    "v_head": None,
    "mlp": "tensor",
    "mtp_concat": None,
    "exp": "expert",
    "exp_route": None,
    "expert_mlp": "tensor",
}


def _mesh_size(mesh, axes) -> int:
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(logical_axes: Sequence[str], shape: Sequence[int], mesh,
                    rules: Mapping | None = None) -> P:
  """PartitionSpec for one array from its logical axes (see module docstring)."""
  rules = {**RULES, **(rules or {})}
  check_rules(rules)
  used: set[str] = set()
  out = []
  for name, dim in zip(logical_axes, shape):
    if name not in rules:
      raise ValueError(f"logical axis {name!r} has no sharding rule; add it to sharding.RULES")
    target = rules[name]
    if target is None:
      out.append(None)
      continue
    axes = (target,) if isinstance(target, str) else tuple(target)
    axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
    if not axes or dim % _mesh_size(mesh, axes):
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return P(*out)


def check_rules(rules: Mapping) -> None:
  """ValueError for a rule whose target is not a mesh axis name (a typo would otherwise
  replicate that dim silently)."""
  for name, target in rules.items():
    axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ValueError(f"sharding rule {name!r} -> {target!r} names {bad}, not mesh axes; "
                       f"expected names from {MESH_AXES}")

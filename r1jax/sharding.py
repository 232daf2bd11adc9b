"""Device mesh and the ONE table mapping logical axis names to mesh axes.

Model code never names devices: every parameter carries logical axis names
(`decoder.param_axes`), and `RULES` (model/partitioning.py, re-exported here) decides which mesh axis, if any, each one is split
over. Changing the parallelism of an ablation is a config edit (mesh shape, or a rules
override), never a model edit.

Mesh axes: 'data' (pure data parallel), 'fsdp' (data parallel with parameters sharded
ZeRO-3 style), 'expert' (routed experts split across devices), 'tensor' (heads / FFN
hidden split). A dim whose size does not divide its mesh axis is replicated instead, and a
mesh axis is used at most once per array; a rule naming an axis outside MESH_AXES is an error.

Placement alone leaves the communication of a sharded MoE to jit's partitioner. Under
`use_mesh(mesh)` (JAX's context mesh, part of jit's cache key) the model sees the mesh, and
with model.moe_exchange != 'none' and the routed experts split over 'expert' their layer
runs expert-parallel under shard_map with explicit token exchanges (model/expert_parallel.py).
The training loops run their jitted steps in that context.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from r1jax.model import decoder
from r1jax.model.partitioning import MESH_AXES, RULES, _mesh_size, logical_to_spec
from r1jax.model.layers import is_spec

def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over MESH_AXES; one axis may be -1 (takes the remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError("at most one mesh axis may be -1")
  if -1 in sizes:
    rest = math.prod(s for s in sizes if s != -1)
    if len(devices) % rest:
      raise ValueError(f"{len(devices)} devices do not split into mesh {dict(shape)}")
    sizes[sizes.index(-1)] = len(devices) // rest
  if any(s <= 0 for s in sizes) or math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def use_mesh(mesh: Mesh | None):
  """Context in which jitted steps trace with `mesh` as JAX's context mesh (jax.set_mesh),
  so the model can lay out its expert-parallel MoE; a no-op for mesh=None."""
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def in_mesh(fn, mesh: Mesh | None):
  """fn called under `use_mesh(mesh)` (fn itself for mesh=None): the training loops' steps."""
  if mesh is None:
    return fn
  def call(*args, **kwargs):
    with use_mesh(mesh):
      return fn(*args, **kwargs)
  return call


def param_shardings(cfg, mesh: Mesh, rules: Mapping | None = None):
  """NamedSharding tree parallel to `decoder.init_params(cfg, key)`."""
  return jax.tree.map(
      lambda s: NamedSharding(mesh, logical_to_spec(s.axes, s.shape, mesh, rules)),
      decoder.param_specs(cfg), is_leaf=is_spec)


def batch_sharding(mesh: Mesh, ndim: int, batch_size: int | None = None,
                   rules: Mapping | None = None) -> NamedSharding:
  """Leading dim split over the batch mesh axes, the rest replicated."""
  shape = (batch_size if batch_size is not None else _mesh_size(mesh, _batch_axes(mesh, rules)),)
  spec = logical_to_spec(("batch",), shape, mesh, rules)
  return NamedSharding(mesh, P(*(tuple(spec) + (None,) * (ndim - 1))))


def _batch_axes(mesh, rules):
  target = {**RULES, **(rules or {})}["batch"]
  axes = (target,) if isinstance(target, str) else tuple(target or ())
  return tuple(a for a in axes if a in mesh.shape)


def init_sharded_params(cfg, key, mesh: Mesh, rules: Mapping | None = None):
  """Shape-first sharded init: no host ever holds the full parameter set."""
  shardings = param_shardings(cfg, mesh, rules)
  return jax.jit(lambda k: decoder.init_params(cfg, k), out_shardings=shardings)(key)


def place_params(params, cfg, mesh: Mesh | None, rules: Mapping | None = None):
  """params laid out by `param_shardings` (the training loops' placement); as is without a mesh."""
  if mesh is None:
    return params
  return transfer(params, param_shardings(cfg, mesh, rules))


def transfer(tree, shardings):
  """`tree` laid out as `shardings` (a parallel tree of NamedShardings), device to device,
  whichever devices the arrays and the targets span (e.g. the training mesh's weights to a
  rollout mesh on other devices).

  Why not jax.device_put alone: it copies device to device only when an array already has
  the target's layout over as many devices, or lives on one device; any other reshard
  (fsdp-split weights to replicated ones, on the same devices or on others) goes through
  host memory. So an array on other devices is first laid out as the target on its own
  devices by a jitted identity (the partitioner's collectives), then copied shard for shard;
  with a different device count it is replicated on its devices instead and one replica is
  sliced on its device and copied. An array on the target's devices is resharded by the
  jitted identity alone. Host arrays and arrays on one device go through jax.device_put.
  """
  leaves, treedef = jax.tree.flatten(tree)
  targets = treedef.flatten_up_to(shardings)
  out = list(leaves)
  groups: dict = {}  # source devices -> indices of the leaves to reshard there first
  for i, (x, s) in enumerate(zip(leaves, targets)):
    src = x.sharding if isinstance(x, jax.Array) else None
    if src is None or len(src.device_set) == 1 or src.is_equivalent_to(s, x.ndim):
      out[i] = jax.device_put(x, s)
    else:
      groups.setdefault(tuple(sorted(src.device_set, key=lambda d: d.id)), []).append(i)
  for devices, idx in groups.items():
    staged = [_staged(devices, targets[i]) for i in idx]
    arrays = _identity_to(tuple(staged))([leaves[i] for i in idx])
    for i, a, st in zip(idx, arrays, staged):
      s = targets[i]
      if st is s:
        out[i] = a
      elif st.num_devices == s.num_devices:
        out[i] = jax.device_put(a, s)  # the same layout: a copy per shard
      else:
        out[i] = jax.device_put(a.addressable_shards[0].data, s)  # one replica, sliced
  return jax.tree.unflatten(treedef, out)


def _staged(devices, target: NamedSharding) -> NamedSharding:
  """Where `transfer` lays an array out on its own `devices` before the copy."""
  if set(devices) == target.device_set:
    return target
  if len(devices) == target.num_devices:
    mesh = Mesh(np.asarray(devices).reshape(target.mesh.devices.shape), target.mesh.axis_names)
    return NamedSharding(mesh, target.spec)
  return NamedSharding(Mesh(np.asarray(devices), ("all",)), P())


@functools.lru_cache(maxsize=64)
def _identity_to(shardings: tuple):
  return jax.jit(lambda xs: xs, out_shardings=list(shardings))


def place_batch(batch: Mapping, mesh: Mesh | None, rules: Mapping | None = None) -> dict:
  """Host arrays -> device arrays, each leading (batch) dim split over the batch axes.

  With several processes each passes its own rows (its share of the global batch, in
  process order) and gets the global arrays they make up (make_array_from_process_local_data).
  """
  if mesh is None:
    return {k: jax.numpy.asarray(v) for k, v in batch.items()}
  if jax.process_count() > 1:
    out = {}
    for k, v in batch.items():
      v = np.asarray(v)
      shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
      spec = batch_sharding(mesh, v.ndim, shape[0], rules)
      if spec.spec[0] is None:
        raise ValueError(f"a global batch of {shape[0]} rows does not split over the batch "
                         f"mesh axes of {dict(mesh.shape)}: with {jax.process_count()} "
                         "processes each must hold its own rows")
      out[k] = jax.make_array_from_process_local_data(spec, v, shape)
    return out
  return {k: jax.device_put(np.asarray(v), batch_sharding(mesh, np.ndim(v), np.shape(v)[0], rules))
          for k, v in batch.items()}


def local_rows(x) -> np.ndarray:
  """This process's rows of a batch-sharded array (all of them in a one-process run), in
  order: what it pulls to the host (`place_batch` made the global array from such rows)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def process_local_copy(tree, mesh: Mesh):
  """A whole copy of every array on this process's first device (an all-gather over the mesh's
  processes): the weights of a rollout on this process's own devices."""
  replicated = NamedSharding(mesh, P())
  tree = jax.jit(lambda t: t, out_shardings=jax.tree.map(lambda _: replicated, tree))(tree)
  return jax.tree.map(lambda x: x.addressable_data(0), tree)

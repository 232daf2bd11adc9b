"""Save and resume a training run: one train-state pytree plus the data iterator state.

A thin wrapper over orbax's CheckpointManager so the RL and SFT loops need three calls:
`save(step, state, data_state=...)`, `latest_step()` and `restore(abstract_state)`.
The train state is any pytree of arrays (params, optimizer state, reference params,
router biases, PRNG keys, counters); the data state is what an iterator's get_state()
returns (a JSON-able dict, or bytes as from grain's DataLoader iterator).

Guarantees (and where they come from)
  * Atomic: orbax writes `<step>.orbax-checkpoint-tmp` and renames it to `<step>` only after
    every file is written (and drops a commit_success marker). A save killed half-way
    leaves only the tmp directory, which latest_step()/restore() never pick.
  * Asynchronous: save() copies device arrays to host, returns, and writes in a background
    thread; the device buffers may be donated to the next step right away. wait() blocks
    until the last save is on disk; close() waits and releases the manager.
  * Typed PRNG keys (jax.random.key) are stored as their key_data and re-wrapped with the
    same implementation on restore, so they round-trip bitwise.
  * Sharded restore: when the abstract state's leaves carry shardings (ShapeDtypeStruct
    with .sharding, or live arrays), arrays are restored directly into those shardings,
    whatever the mesh at save time.

Layout: <workdir>/checkpoints/<step>/{state,data}/...
"""
from __future__ import annotations

import base64
import os
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

_STATE = "state"
_DATA = "data"


class Restored(NamedTuple):
  """What restore() returns: the step restored, the train state and the data state."""
  step: int
  state: Any
  data_state: Any


def _is_typed_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def abstract_state(tree):
  """ShapeDtypeStructs (keeping shardings) of a pytree of arrays, for restore()."""
  def leaf(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(leaf, tree)


def _keys_to_data(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)


def _key_data_sharding(sharding):
  """Sharding of key_data for a key array with `sharding`: one more, unsharded, trailing axis."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh,
                                      jax.sharding.PartitionSpec(*sharding.spec, None))
  return sharding  # single-device and fully replicated shardings carry over unchanged


def _abstract_keys_to_data(abstract):
  """Replaces typed-key leaves by key_data ShapeDtypeStructs; returns (tree, impls)."""
  impls = {}

  def leaf(path, x):
    if not _is_typed_key(x):
      sharding = getattr(x, "sharding", None)
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    found = []

    def data_of(k):
      found.append(jax.random.key_impl(k))
      return jax.random.key_data(k)
    data = jax.eval_shape(data_of, jax.ShapeDtypeStruct(x.shape, x.dtype))
    impls[path] = found[0]
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(data.shape, data.dtype,
                                sharding=_key_data_sharding(sharding) if sharding else None)

  return jax.tree_util.tree_map_with_path(leaf, abstract), impls


def _data_to_keys(tree, impls):
  if not impls:
    return tree
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jax.random.wrap_key_data(x, impl=impls[path]) if path in impls else x, tree)


def _encode_data_state(data_state):
  if data_state is None:
    return {"kind": "none"}
  if isinstance(data_state, (bytes, bytearray)):
    return {"kind": "bytes", "value": base64.b64encode(bytes(data_state)).decode("ascii")}
  return {"kind": "json", "value": data_state}


def _decode_data_state(blob):
  kind = blob.get("kind")
  if kind == "none":
    return None
  if kind == "bytes":
    return base64.b64decode(blob["value"])
  if kind == "json":
    return blob["value"]
  raise ValueError(f"unrecognised data-state record in checkpoint: kind={kind!r}")


class CheckpointManager:
  """Asynchronous, atomic checkpoints of (train state, data iterator state) by step.

  Typical loop:
    ckpt = CheckpointManager(workdir, max_to_keep=3, save_interval_steps=100)
    if ckpt.latest_step() is not None:
      step, state, data_state = ckpt.restore(abstract_state(state))
      iterator.set_state(data_state)
    for step in range(start, num_steps):
      state = train_step(state, batch)
      ckpt.save(step + 1, state, data_state=iterator.get_state())
    ckpt.close()
  """

  def __init__(self, workdir: str, max_to_keep: Optional[int] = 3,
               save_interval_steps: int = 1, *, async_save: bool = True,
               subdir: str = "checkpoints"):
    if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
      raise ValueError(f"max_to_keep must be a positive int or None; got {max_to_keep!r}")
    if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be a positive int; got {save_interval_steps!r}")
    self.save_interval_steps = save_interval_steps
    self.directory = os.path.join(os.path.abspath(os.fspath(workdir)), subdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=1,
        enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(_STATE, _DATA))

  def save(self, step: int, state, *, data_state=None, force: bool = False) -> bool:
    """Starts saving `state` and `data_state` as `step`; returns False if skipped.

    A step is skipped when it is not a multiple of save_interval_steps (unless force; this
    includes the first save, unlike orbax's own interval rule) or is already saved.
    A step older than the latest saved one raises ValueError: orbax would drop it
    silently, e.g. after restoring an older step into a workdir with newer checkpoints.
    The call returns once device arrays are copied to host; use wait() to block until
    the files are final.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
      raise ValueError(f"step must be a non-negative int; got {step!r}")
    if not force and step % self.save_interval_steps:
      return False
    latest = self.latest_step()
    if latest is not None and step <= latest:
      if step in self._manager.all_steps():
        return False
      raise ValueError(f"cannot save step {step}: {self.directory} already holds the newer "
                       f"step {latest}; use a fresh workdir or remove the newer checkpoints")
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(_keys_to_data(state)),
        _DATA: ocp.args.JsonSave(_encode_data_state(data_state)),
    })
    return bool(self._manager.save(step, args=args, force=force))

  def latest_step(self) -> Optional[int]:
    """The newest finalised step, or None when there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """All finalised steps kept on disk, ascending."""
    return sorted(self._manager.all_steps())

  def restore(self, abstract, *, step: Optional[int] = None) -> Restored:
    """Restores `step` (default: the latest) into the structure of `abstract`.

    Args:
      abstract: a pytree like the saved state whose leaves have shape and dtype (and
        optionally sharding): ShapeDtypeStructs from abstract_state() or jax.eval_shape,
        or live arrays. Typed PRNG-key leaves come back as typed keys.
      step: which step; None means latest_step().

    Returns:
      Restored(step, state, data_state); data_state is what was saved (dict, bytes or None).
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no finalised checkpoint to restore in {self.directory}")
    elif step not in self._manager.all_steps():
      raise ValueError(f"step {step} is not a finalised checkpoint in {self.directory}; "
                       f"available: {self.all_steps()}")
    target, impls = _abstract_keys_to_data(abstract)
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(target),
        _DATA: ocp.args.JsonRestore(),
    })
    out = self._manager.restore(step, args=args)
    return Restored(step, _data_to_keys(out[_STATE], impls), _decode_data_state(out[_DATA]))

  def wait(self) -> None:
    """Blocks until every started save is finalised on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's threads."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

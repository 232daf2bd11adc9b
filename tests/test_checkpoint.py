"""Tests for r1jax/train/checkpoint.py: bitwise round trips, retention, sharded restore, killed saves."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from r1jax.train import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_state(seed=0):
  k = jax.random.key(seed)
  k1, k2, k3 = jax.random.split(k, 3)
  params = {
      "embed": jax.random.normal(k1, (16, 8), jnp.float32),
      "layers": [{"w": jax.random.normal(k2, (8, 8)).astype(jnp.bfloat16),
                  "router_bias": jnp.linspace(-1, 1, 4, dtype=jnp.float32)}],
  }
  opt = optax.adamw(1e-3)
  opt_state = opt.init(params)
  grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.1, params)
  _, opt_state = opt.update(grads, opt_state, params)  # non-trivial moments and count
  return {
      "params": params,
      "ref_params": jax.tree.map(lambda x: x * 2, params),
      "opt_state": opt_state,
      "step": jnp.asarray(7, jnp.int32),
      "tokens_seen": jnp.arange(5, dtype=jnp.int32),
      "rng": jax.random.fold_in(k3, 11),
  }


def _assert_bitwise_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert jnp.issubdtype(y.dtype, jax.dtypes.prng_key)
      assert jax.random.key_impl(x) == jax.random.key_impl(y)
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                  np.asarray(y).reshape(-1).view(np.uint8))


def test_round_trip_is_bitwise_equal(tmp_path):
  state = _train_state()
  data_state = {"next_index": 123, "epoch": 2, "shuffle_seed": [4, 5]}
  with checkpoint.CheckpointManager(tmp_path, max_to_keep=2) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(10, state, data_state=data_state)
    ckpt.wait()
    assert ckpt.latest_step() == 10
    step, restored, restored_data = ckpt.restore(checkpoint.abstract_state(state))
  assert step == 10
  assert restored_data == data_state
  _assert_bitwise_equal(state, restored)
  assert type(restored["opt_state"][0]) is type(state["opt_state"][0])  # optax NamedTuples kept
  assert restored["params"]["layers"][0]["w"].dtype == jnp.bfloat16
  # the restored key draws the same numbers
  np.testing.assert_array_equal(jax.random.uniform(restored["rng"], (3,)),
                                jax.random.uniform(state["rng"], (3,)))


def test_bytes_iterator_state_and_new_manager_resume(tmp_path):
  state = {"x": jnp.arange(4.0)}
  blob = b'{"pos": 5}\x00\xff'
  with checkpoint.CheckpointManager(tmp_path) as ckpt:
    ckpt.save(3, state, data_state=blob)
    ckpt.save(4, jax.tree.map(lambda x: x + 1, state))  # no data state
  with checkpoint.CheckpointManager(tmp_path) as ckpt:  # a fresh process would do this
    assert ckpt.all_steps() == [3, 4]
    latest = ckpt.restore(checkpoint.abstract_state(state))
    older = ckpt.restore(checkpoint.abstract_state(state), step=3)
  assert latest.step == 4 and latest.data_state is None
  np.testing.assert_array_equal(latest.state["x"], [1.0, 2.0, 3.0, 4.0])
  assert older.data_state == blob
  np.testing.assert_array_equal(older.state["x"], [0.0, 1.0, 2.0, 3.0])


def test_max_to_keep_and_save_interval(tmp_path):
  state = {"x": jnp.zeros(2)}
  with checkpoint.CheckpointManager(tmp_path, max_to_keep=2, save_interval_steps=2) as ckpt:
    saved = [ckpt.save(s, {"x": jnp.full(2, float(s))}) for s in range(1, 8)]
    assert saved == [False, True, False, True, False, True, False]
    assert ckpt.save(7, {"x": jnp.full(2, 7.0)}, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7]
    assert sorted(os.listdir(ckpt.directory)) == ["6", "7"]
    np.testing.assert_array_equal(ckpt.restore(checkpoint.abstract_state(state)).state["x"],
                                  [7.0, 7.0])


def test_sharded_restore_returns_requested_shardings(tmp_path):
  assert jax.device_count() == 8
  state = {"w": jnp.arange(64.0).reshape(8, 8), "b": jnp.arange(8, dtype=jnp.int32),
           "rng": jax.random.key(3)}
  with checkpoint.CheckpointManager(tmp_path) as ckpt:
    ckpt.save(1, state)
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  shardings = {"w": NamedSharding(mesh, P("data", "model")), "b": NamedSharding(mesh, P("model")),
               "rng": NamedSharding(mesh, P())}
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, shardings)
  with checkpoint.CheckpointManager(tmp_path) as ckpt:
    restored = ckpt.restore(abstract).state
  for name in ("w", "b"):
    assert restored[name].sharding == shardings[name]
    np.testing.assert_array_equal(restored[name], state[name])
  assert restored["w"].addressable_shards[0].data.shape == (2, 4)
  assert jnp.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored["rng"]),
                                jax.random.key_data(state["rng"]))


_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {repo!r})
    import jax.numpy as jnp
    from r1jax.train import checkpoint
    ckpt = checkpoint.CheckpointManager({workdir!r})
    ckpt.save(1, {{"x": jnp.full((4,), 1.0), "big": jnp.zeros((4000, 5000))}},
              data_state={{"pos": 1}})
    ckpt.wait()
    ckpt.save(2, {{"x": jnp.full((4,), 2.0), "big": jnp.ones((4000, 5000))}},
              data_state={{"pos": 2}})
    tmp = os.path.join(ckpt.directory, "2.orbax-checkpoint-tmp")
    for _ in range(2000):
      if os.path.exists(tmp):
        break
      time.sleep(0.001)
    print("tmp seen:", os.path.exists(tmp), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_save_killed_midway_is_ignored(tmp_path):
  workdir = str(tmp_path)
  script = _KILLED_SAVE.format(repo=REPO, workdir=workdir)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert "tmp seen: True" in proc.stdout, proc.stdout + proc.stderr[-2000:]
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert not os.path.exists(os.path.join(ckpt_dir, "2"))  # killed before the atomic rename

  abstract = {"x": jax.ShapeDtypeStruct((4,), jnp.float32),
              "big": jax.ShapeDtypeStruct((4000, 5000), jnp.float32)}
  with checkpoint.CheckpointManager(workdir) as ckpt:
    assert ckpt.latest_step() == 1
    restored = ckpt.restore(abstract)
    assert restored.step == 1 and restored.data_state == {"pos": 1}
    np.testing.assert_array_equal(restored.state["x"], np.full(4, 1.0))
    # the run goes on and can save step 2 again over the leftover
    assert ckpt.save(2, {"x": jnp.full((4,), 3.0), "big": jnp.zeros((4000, 5000))})
    ckpt.wait()
    assert ckpt.latest_step() == 2
    np.testing.assert_array_equal(ckpt.restore(abstract).state["x"], np.full(4, 3.0))


def test_bad_arguments_raise(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep"):
    checkpoint.CheckpointManager(tmp_path, max_to_keep=0)
  with pytest.raises(ValueError, match="save_interval_steps"):
    checkpoint.CheckpointManager(tmp_path, save_interval_steps=0)
  with checkpoint.CheckpointManager(tmp_path) as ckpt:
    with pytest.raises(FileNotFoundError, match="no finalised checkpoint"):
      ckpt.restore({"x": jax.ShapeDtypeStruct((2,), jnp.float32)})
    with pytest.raises(ValueError, match="step must be a non-negative int"):
      ckpt.save(-1, {"x": jnp.zeros(2)})
    ckpt.save(2, {"x": jnp.zeros(2)})
    ckpt.wait()
    assert not ckpt.save(2, {"x": jnp.ones(2)}, force=True)  # already saved: kept as it is
    with pytest.raises(ValueError, match="cannot save step 1: .* newer step 2"):
      ckpt.save(1, {"x": jnp.zeros(2)})
    with pytest.raises(ValueError, match="step 5 is not a finalised checkpoint"):
      ckpt.restore({"x": jax.ShapeDtypeStruct((2,), jnp.float32)}, step=5)


def test_grain_iterator_states_resume_exactly(tmp_path):
  import grain
  import grain.python as gp
  ds = grain.MapDataset.range(40).shuffle(seed=3).batch(4).to_iter_dataset()
  loader = gp.DataLoader(
      data_source=gp.RangeDataSource(0, 40, 1),
      sampler=gp.IndexSampler(40, shuffle=True, seed=1, num_epochs=1,
                              shard_options=gp.NoSharding()),
      worker_count=0)
  for source in (ds, loader):
    it = iter(source)
    for _ in range(3):
      next(it)
    with checkpoint.CheckpointManager(tmp_path / type(source).__name__) as ckpt:
      ckpt.save(3, {"x": jnp.zeros(1)}, data_state=it.get_state())
      expected = [np.asarray(next(it)) for _ in range(3)]
      restored = ckpt.restore({"x": jax.ShapeDtypeStruct((1,), jnp.float32)})
    resumed = iter(source)
    resumed.set_state(restored.data_state)
    for want in expected:
      np.testing.assert_array_equal(np.asarray(next(resumed)), want)


def test_sharded_save_restores_into_a_different_mesh_layout(tmp_path):
  devices = np.array(jax.devices())
  mesh_a = Mesh(devices.reshape(4, 2), ("data", "model"))
  mesh_b = Mesh(devices.reshape(2, 4), ("data", "model"))
  w = jax.device_put(jnp.arange(128.0).reshape(8, 16), NamedSharding(mesh_a, P("data", "model")))
  with checkpoint.CheckpointManager(tmp_path) as ckpt:
    ckpt.save(1, {"w": w})
  target = NamedSharding(mesh_b, P("model", None))
  with checkpoint.CheckpointManager(tmp_path) as ckpt:
    restored = ckpt.restore({"w": jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=target)})
  assert restored.state["w"].sharding == target
  assert restored.state["w"].addressable_shards[0].data.shape == (2, 16)
  np.testing.assert_array_equal(restored.state["w"], np.arange(128.0).reshape(8, 16))

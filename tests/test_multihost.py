"""Multi-host training on one machine: 2 jax.distributed processes on CPU (2 devices each,
gloo collectives) train on a data mesh over all 4 devices, each loading its share of the
global batch, and must match a single-process run on 4 devices fed the same global batches:
losses and final parameters equal within float32 tolerance. Also the start-up's checks of
the flags and environment (r1jax/run/multihost.py)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from r1jax.run import multihost

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multihost_worker.py")
CACHE = os.path.join(os.path.dirname(HERE), ".jax_cache")
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env():
  env = {k: v for k, v in os.environ.items() if not k.startswith("R1JAX_")}
  env.pop("XLA_FLAGS", None)
  return dict(env, R1JAX_TEST_CACHE=CACHE, ALLOW_MULTIPLE_LIBTPU_LOAD="1")


def _check(procs):
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f"worker timed out after {TIMEOUT_S}s")
    outs.append((p.returncode, out, err))
  for rc, out, err in outs:
    assert rc == 0, f"worker failed (rc {rc}):\n{out[-2000:]}\n{err[-4000:]}"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  ref_dir, multi_dir = tmp_path_factory.mktemp("ref"), tmp_path_factory.mktemp("multi")
  addr = f"127.0.0.1:{_free_port()}"
  run = lambda *a: subprocess.Popen([sys.executable, WORKER, *map(str, a)], env=_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  procs = [run(multi_dir, addr, 2, i) for i in range(2)]
  _check(procs)  # one at a time: the machine's cores are few
  _check([run(ref_dir, "reference", 2)])
  return (dict(np.load(os.path.join(ref_dir, "result.npz"))),
          dict(np.load(os.path.join(multi_dir, "result.npz"))))


def test_two_processes_match_one(results):
  ref, multi = results
  assert ref.keys() == multi.keys()
  assert len(ref["sft_loss"]) == 3
  loss_diff = float(np.max(np.abs(ref["sft_loss"] - multi["sft_loss"])))
  param_diff = max(float(np.max(np.abs(ref[k] - multi[k]))) for k in ref
                   if k.startswith("sft_p"))
  print(f"SFT: max |loss diff| {loss_diff:.3g}, max |param diff| {param_diff:.3g}")
  assert loss_diff < 1e-5
  assert param_diff < 1e-5
  # the runs really trained: the loss moved
  assert np.all(np.isfinite(ref["sft_loss"])) and ref["sft_loss"][0] != ref["sft_loss"][-1]


def test_resolve_flags_and_environment():
  assert multihost.resolve(environ={}) is None
  assert multihost.resolve(environ={"TPU_ACCELERATOR_TYPE": "v5p-16"}) == "auto"
  assert multihost.resolve("h:1", 2, 1, environ={}) == multihost.Cluster("h:1", 2, 1)
  env = {"R1JAX_COORDINATOR_ADDRESS": "h:2", "R1JAX_NUM_PROCESSES": "4",
         "R1JAX_PROCESS_ID": "3"}
  assert multihost.resolve(environ=env) == multihost.Cluster("h:2", 4, 3)
  assert multihost.resolve(process_id=0, environ=env) == multihost.Cluster("h:2", 4, 0)
  with pytest.raises(ValueError, match="process_id must satisfy"):
    multihost.resolve("h:1", 2, 2, environ={})
  with pytest.raises(ValueError, match="missing: coordinator_address"):
    multihost.resolve(num_processes=2, process_id=0, environ={})
  with pytest.raises(ValueError, match="host:port"):
    multihost.resolve("h", 2, 0, environ={})
  with pytest.raises(ValueError, match="not an integer"):
    multihost.resolve(environ={**env, "R1JAX_NUM_PROCESSES": "two"})


def test_grpo_two_processes_match_one(results):
  ref, multi = results
  assert len(ref["grpo_loss"]) == 2
  param_diff = max(float(np.max(np.abs(ref[k] - multi[k]))) for k in ref
                   if k.startswith("grpo_p"))
  print(f"GRPO: max |param diff| {param_diff:.3g}")
  assert param_diff < 1e-5
  for k in ref:
    if k.startswith("grpo_") and not k.startswith("grpo_p"):
      diff = float(np.max(np.abs(ref[k] - multi[k])))
      print(f"{k}: max |diff| {diff:.3g}")
      np.testing.assert_allclose(multi[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
  # some group had unequal rewards, so the policy loss had something to fit
  assert np.any(ref["grpo_groups_all_equal"] < 1), ref["grpo_groups_all_equal"]

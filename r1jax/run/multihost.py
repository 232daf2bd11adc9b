"""Start-up of a multi-process (multi-host) run: `jax.distributed.initialize`, once, before
any JAX computation.

Where the processes are comes from, in order: the r1jax.main flags --coordinator_address,
--num_processes, --process_id; else the environment variables R1JAX_COORDINATOR_ADDRESS,
R1JAX_NUM_PROCESSES, R1JAX_PROCESS_ID; else, on a Cloud TPU VM (TPU_WORKER_HOSTNAMES or
TPU_ACCELERATOR_TYPE set by the TPU runtime), `jax.distributed.initialize()` with no
arguments, which reads the pod's topology itself. Anywhere else nothing is called and the
run is one process.

With several processes, every process runs the same program: datasets give each its share of
the global batch (data/datasets.py), sharding.place_batch joins the shares into global
arrays, orbax checkpoints are written by all of them together, and files (metrics, summaries,
plots, config.json) and progress bars come from process 0 alone (`is_primary`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

ENV_PREFIX = "R1JAX_"
_TPU_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE")
_started = False


@dataclasses.dataclass(frozen=True)
class Cluster:
  """Where this process sits: coordinator 'host:port', process count, this process's id."""
  coordinator_address: str
  num_processes: int
  process_id: int


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, environ: Mapping[str, str] | None = None):
  """The Cluster the flags (else R1JAX_* variables) describe, 'auto' for a Cloud TPU VM with
  neither, or None (one process). ValueError for an incomplete or inconsistent set."""
  env = os.environ if environ is None else environ
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  for name, value in given.items():
    if value is None or value == "":
      raw = env.get(ENV_PREFIX + name.upper(), "")
      if raw != "":
        if name != "coordinator_address":
          try:
            raw = int(raw)
          except ValueError:
            raise ValueError(f"{ENV_PREFIX}{name.upper()}={env[ENV_PREFIX + name.upper()]!r} "
                             "is not an integer") from None
        given[name] = raw
      else:
        given[name] = None
  if all(v is None for v in given.values()):
    return "auto" if any(env.get(k) for k in _TPU_ENV) else None
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise ValueError(f"multi-process start-up needs --coordinator_address, --num_processes and "
                     f"--process_id (or {ENV_PREFIX}COORDINATOR_ADDRESS, ..._NUM_PROCESSES, "
                     f"..._PROCESS_ID); missing: {', '.join(missing)}")
  address, n, pid = given["coordinator_address"], given["num_processes"], given["process_id"]
  if ":" not in address:
    raise ValueError(f"coordinator_address {address!r} must be host:port")
  if n < 1:
    raise ValueError(f"num_processes must be >= 1, got {n}")
  if not 0 <= pid < n:
    raise ValueError(f"process_id must satisfy 0 <= process_id < num_processes ({n}), "
                     f"got {pid}")
  return Cluster(address, n, pid)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts jax.distributed as `resolve` says; returns whether it was started. Call once,
  before any JAX computation; a second call does nothing."""
  global _started
  cluster = resolve(coordinator_address, num_processes, process_id)
  if cluster is None or _started:
    return _started
  import jax  # pylint: disable=import-outside-toplevel
  if cluster == "auto":
    jax.distributed.initialize()
  else:
    try:  # CPU processes exchange arrays through gloo (the default on recent JAX)
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):  # a JAX without the option
      pass
    jax.distributed.initialize(cluster.coordinator_address, cluster.num_processes,
                               cluster.process_id)
  _started = True
  return True


def is_primary() -> bool:
  """True in process 0 (and in a single-process run): the one that writes files."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index() == 0

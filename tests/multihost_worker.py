"""One process of the multi-host test (tests/test_multihost.py), run as a script:

  python tests/multihost_worker.py OUT_DIR COORDINATOR NUM_PROCESSES PROCESS_ID
  python tests/multihost_worker.py OUT_DIR reference 2

The first form is one of NUM_PROCESSES jax.distributed processes (2 CPU devices each) that
train a few SFT steps of configs/test_tiny.py on a data mesh over all their devices, each
loading its share of the global batch. The second is the single-process reference on 4
devices: the same global batches (the 2 process-local datasets' rows joined in process
order). Process 0 / the reference writes OUT_DIR/result.npz: the per-step losses and the
final parameters.
"""
from __future__ import annotations

import os
import sys

OUT, ROLE = sys.argv[1], sys.argv[2]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 if ROLE == 'reference' else 2}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["R1JAX_TEST_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from r1jax.run import multihost  # noqa: E402

if ROLE != "reference":
  multihost.initialize(ROLE, int(sys.argv[3]), int(sys.argv[4]))

import grain.python as grain  # noqa: E402
import numpy as np  # noqa: E402

import tiny_runs  # noqa: E402
from r1jax.data import datasets as data_lib  # noqa: E402
from r1jax.model import decoder  # noqa: E402
from r1jax.run import experiment  # noqa: E402
from r1jax.train import metrics as metrics_lib  # noqa: E402
from r1jax.train import sft  # noqa: E402

SFT_STEPS = 3


def main():
  cfg = tiny_runs.load_config()
  cfg.sft.steps, cfg.sft.checkpoint_every = SFT_STEPS, 2
  cfg.mesh.data = -1
  task, tokenizer, model_cfg = experiment.build(cfg)
  mesh = experiment.mesh_of(cfg)
  assert mesh.devices.size == 4, mesh
  traces = experiment.trace_task(cfg).examples("train", cfg.sft.num_traces, seed=cfg.seed)
  dataset = None
  if ROLE == "reference":
    n = int(sys.argv[3])
    shares = [data_lib.sft_dataset(task, traces, tokenizer, seq_len=cfg.sft.seq_len,
                                   global_batch_size=cfg.sft.batch_size, seed=cfg.seed,
                                   process_index=i, process_count=n) for i in range(n)]
    dataset = grain.MapDataset.range(10**6).map(
        lambda i: {k: np.concatenate([s[i][k] for s in shares]) for k in shares[0][i]})
  params = decoder.init_params(model_cfg, jax.random.key(cfg.seed))
  kwargs = {"dataset": dataset} if dataset is not None else {"examples": traces}
  params, _ = sft.train(model_cfg, cfg.sft, os.path.join(OUT, "work"), task=task,
                        tokenizer=tokenizer, params=params, seed=cfg.seed, progress=False,
                        mesh=mesh, **kwargs)
  flat = {jax.tree_util.keystr(p): np.asarray(x.addressable_data(0))
          for p, x in jax.tree_util.tree_leaves_with_path(params)}
  if metrics_lib.is_primary():
    records = metrics_lib.read_metrics(os.path.join(OUT, "work", "sft"))
    losses = np.array([r["loss"] for r in records])
    np.savez(os.path.join(OUT, "result.npz"), sft_loss=losses, **{"p" + k: v for k, v in flat.items()})
  print(f"process {jax.process_index()} of {jax.process_count()} done", flush=True)


if __name__ == "__main__":
  main()

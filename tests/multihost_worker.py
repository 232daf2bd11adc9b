"""One process of the multi-host test (tests/test_multihost.py), run as a script:

  python tests/multihost_worker.py OUT_DIR COORDINATOR NUM_PROCESSES PROCESS_ID
  python tests/multihost_worker.py OUT_DIR reference 2

The first form is one of NUM_PROCESSES jax.distributed processes (2 CPU devices each) that
train a few SFT steps and then a few GRPO steps of configs/test_tiny.py on a data mesh over all their devices, each
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
from r1jax.train import rl, sft  # noqa: E402

SFT_STEPS, GRPO_STEPS = 3, 2


def _joined(datasets):
  """One dataset whose i-th item joins the i-th items of `datasets` in order."""
  def join(i):
    items = [d[i] for d in datasets]
    if isinstance(items[0], dict):
      return {k: np.concatenate([x[k] for x in items]) for k in items[0]}
    return data_lib.PromptBatch(*(np.concatenate([getattr(x, f) for x in items])
                                  if isinstance(getattr(items[0], f), np.ndarray)
                                  else sum((tuple(getattr(x, f)) for x in items), ())
                                  for f in ("tokens_BxL", "lengths_B", "indices_B", "prompts",
                                            "examples")))
  return grain.MapDataset.range(10**6).map(join)


def _host(params, prefix):
  """{prefix + 'p' + leaf path: numpy array} of (data-mesh replicated) parameters."""
  return {prefix + "p" + jax.tree_util.keystr(p): np.asarray(x.addressable_data(0))
          for p, x in jax.tree_util.tree_leaves_with_path(params)}


def main():
  cfg = tiny_runs.load_config()
  cfg.sft.steps, cfg.sft.checkpoint_every = SFT_STEPS, 2
  cfg.mesh.data = -1
  cfg.grpo.steps, cfg.grpo.minibatches, cfg.grpo.beta = GRPO_STEPS, 2, 0.04
  # the length penalty varies within groups of a random policy: advantages are not all 0
  cfg.grpo.rewards.overlong, cfg.grpo.overlong_cache_len = 1.0, cfg.grpo.max_new_tokens
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
    dataset = _joined(shares)
    # GRPO's prompts: the processes' shares joined, as for SFT
    prompt_dataset = data_lib.prompt_dataset
    data_lib.prompt_dataset = lambda *a, **k: _joined(
        [prompt_dataset(*a, **k, process_index=i, process_count=n) for i in range(n)])
  params = decoder.init_params(model_cfg, jax.random.key(cfg.seed))
  kwargs = {"dataset": dataset} if dataset is not None else {"examples": traces}
  params, _ = sft.train(model_cfg, cfg.sft, os.path.join(OUT, "work"), task=task,
                        tokenizer=tokenizer, params=params, seed=cfg.seed, progress=False,
                        mesh=mesh, **kwargs)
  flat = _host(params, "sft_")
  params, _ = rl.train(model_cfg, cfg.grpo, os.path.join(OUT, "work"), task=task,
                       tokenizer=tokenizer, params=params, task_name=cfg.task.name,
                       task_kwargs=cfg.task.kwargs.to_dict(), seed=cfg.seed, progress=False,
                       mesh=mesh)
  flat.update(_host(params, "grpo_"))
  if metrics_lib.is_primary():
    records = metrics_lib.read_metrics(os.path.join(OUT, "work", "sft"))
    losses = np.array([r["loss"] for r in records])
    grpo = metrics_lib.read_metrics(os.path.join(OUT, "work", "grpo"))
    grpo_values = {f"grpo_{k}": np.array([r[k] for r in grpo])
                   for k in ("loss", "kl_ref", "reward_mean", "reward_std", "rows_trained",
                             "groups_all_equal", "grad_norm")}
    np.savez(os.path.join(OUT, "result.npz"), sft_loss=losses, **grpo_values, **flat)
  print(f"process {jax.process_index()} of {jax.process_count()} done", flush=True)


if __name__ == "__main__":
  main()

"""`eval` mode: evaluates the latest GRPO (else SFT) checkpoint in workdir, else the
config's init_from_hf checkpoint. Writes workdir/config.json first, then
workdir/eval/summary.json (the figures of r1jax.train.evaluate plus task, seed, wall time),
eval.png (its rates as bars) and the figures in TensorBoard (workdir/eval/tb, tags eval/...,
at step 0: one evaluation per run)."""
from __future__ import annotations

import json
import os
import time

from r1jax.run import experiment
from r1jax.train import evaluate, metrics

RATES = ("pass@1", "maj@{k}", "format_rate", "truncation_rate")


def run(cfg, workdir: str) -> dict:
  experiment.validate(cfg)
  t_start = time.time()
  task, tokenizer, model_cfg = experiment.build(cfg)
  metrics.write_config(workdir, cfg)
  params = experiment.params_to_evaluate(cfg, workdir, model_cfg)
  result = evaluate.evaluate(params, model_cfg, task, tokenizer, cfg.eval, seed=cfg.seed,
                             mesh=experiment.rollout_mesh_of(cfg))
  print(json.dumps(result, indent=2))
  run_dir = os.path.join(workdir, "eval")
  metrics.log_eval(run_dir, 0, result)
  summary = metrics.finish_run(run_dir, {
      **result, "task": cfg.task.name, "seed": cfg.seed, "wall_time_s": time.time() - t_start},
      config=cfg.to_dict())
  rates = {key.format(k=cfg.eval.k): result[key.format(k=cfg.eval.k)] for key in RATES}
  metrics.plot_bars(os.path.join(run_dir, "eval.png"), rates, ylim=(0, 1.05),
                    title=f"held-out {cfg.task.name}, {result['num_problems']} problems")
  return summary

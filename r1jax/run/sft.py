"""`sft` mode: cold-start SFT on cfg.sft.num_traces traces of the config's task; ends with
workdir/sft/curves.png (loss and response NLL per step)."""
from __future__ import annotations

import os

from r1jax.run import experiment
from r1jax.train import metrics, sft


def run(cfg, workdir: str):
  experiment.validate(cfg)
  task, tokenizer, model_cfg = experiment.build(cfg)
  mesh = experiment.mesh_of(cfg)
  traces = experiment.trace_task(cfg).examples("train", cfg.sft.num_traces, seed=cfg.seed)
  params = experiment.initial_params(cfg, model_cfg, mesh)
  out = sft.train(model_cfg, cfg.sft, workdir, task=task, tokenizer=tokenizer, params=params,
                  examples=traces, seed=cfg.seed, mesh=mesh)
  metrics.plot_curves(os.path.join(workdir, "sft"), ["loss", "nll"], "curves.png")
  return out

"""`grpo` mode: GRPO from the workdir's latest checkpoint, or from random init (R1-Zero);
ends with workdir/grpo/curves.png (reward, accuracy and format rate per step)."""
from __future__ import annotations

import os

from r1jax.run import experiment
from r1jax.train import metrics, rl


def run(cfg, workdir: str):
  experiment.validate(cfg)
  task, tokenizer, model_cfg = experiment.build(cfg)
  mesh = experiment.mesh_of(cfg)
  try:
    params = experiment.latest_params(cfg, workdir, model_cfg)
  except ValueError:
    print("no SFT checkpoint in workdir: starting from random init (R1-Zero)")
    params = experiment.initial_params(cfg, model_cfg, mesh)
  out = rl.train(model_cfg, cfg.grpo, workdir, task=task, tokenizer=tokenizer, params=params,
                 task_name=cfg.task.name, task_kwargs=cfg.task.kwargs.to_dict(), seed=cfg.seed,
                 mesh=mesh, rollout_mesh=experiment.rollout_mesh_of(cfg))
  metrics.plot_curves(os.path.join(workdir, "grpo"), ["reward_mean", "accuracy", "format_rate"],
                      "curves.png")
  return out

"""`grpo` mode: GRPO from the workdir's latest checkpoint, or from random init (R1-Zero).
Writes workdir/config.json first and ends with workdir/grpo/summary.json and curves.png
(reward, accuracy and format rate per step)."""
from __future__ import annotations

import os
import time

from r1jax.model import decoder
from r1jax.run import experiment
from r1jax.train import metrics, rl

CURVES = ("reward_mean", "accuracy", "format_rate")


def run(cfg, workdir: str):
  experiment.validate(cfg)
  t_start = time.time()
  task, tokenizer, model_cfg = experiment.build(cfg)
  metrics.write_config(workdir, cfg)
  mesh = experiment.mesh_of(cfg)
  try:
    params = experiment.latest_params(cfg, workdir, model_cfg)
    init = "checkpoint"
  except ValueError:
    init = "init_from_hf" if cfg.init_from_hf else "random"
    print(f"no checkpoint in workdir: GRPO starts from {cfg.init_from_hf or 'random init'}")
    params = experiment.initial_params(cfg, model_cfg, mesh)
  params, info = rl.train(model_cfg, cfg.grpo, workdir, task=task, tokenizer=tokenizer,
                          params=params, task_name=cfg.task.name,
                          task_kwargs=cfg.task.kwargs.to_dict(), seed=cfg.seed, mesh=mesh,
                          rollout_mesh=experiment.rollout_mesh_of(cfg))
  counts = decoder.count_params(model_cfg)
  metrics.finish_run(os.path.join(workdir, "grpo"), {
      "task": cfg.task.name, "seed": cfg.seed, "init": init,
      "params_total": counts["total"], "params_activated": counts["activated"], **info,
      "grpo_time_s": info["sample_s"] + info["verify_s"] + info["train_s"],
      "wall_time_s": time.time() - t_start}, config=cfg.to_dict(), curves=CURVES)
  return params, info

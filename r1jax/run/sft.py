"""`sft` mode: cold-start SFT on cfg.sft.num_traces traces of the config's task (or of the
JSONL file sft.traces_path, e.g. rejection_sample's output: experiment.sft_traces). Writes
workdir/config.json first and ends with workdir/sft/summary.json and curves.png (loss and
response NLL per step)."""
from __future__ import annotations

import os
import time

from r1jax.model import decoder
from r1jax.run import experiment
from r1jax.train import metrics, sft

CURVES = ("loss", "nll")


def run(cfg, workdir: str):
  experiment.validate(cfg)
  t_start = time.time()
  task, tokenizer, model_cfg = experiment.build(cfg)
  metrics.write_config(workdir, cfg)
  mesh = experiment.mesh_of(cfg)
  traces = experiment.sft_traces(cfg)
  params = experiment.initial_params(cfg, model_cfg, mesh)
  params, info = sft.train(model_cfg, cfg.sft, workdir, task=task, tokenizer=tokenizer,
                           params=params, examples=traces, seed=cfg.seed, mesh=mesh)
  counts = decoder.count_params(model_cfg)
  metrics.finish_run(os.path.join(workdir, "sft"), {
      "task": cfg.task.name, "seed": cfg.seed, "num_traces": len(traces),
      "traces_path": cfg.sft.traces_path,
      "params_total": counts["total"], "params_activated": counts["activated"],
      **info, "wall_time_s": time.time() - t_start}, config=cfg.to_dict(), curves=CURVES)
  return params, info

"""`pretrain` mode: next-token training from random init on plain task text (the problems
never in the template or the tags, no worked traces: `Task.pretrain_text`), loss on every
token. The result is the base
model of R1-Zero: `grpo` mode on this workdir then starts from it. Writes workdir/config.json
first and ends with workdir/pretrain/summary.json (with final_loss, final_nll) and
workdir/pretrain/curves.png (loss and NLL per step).
"""
from __future__ import annotations

import os
import time

from r1jax.data import datasets as data_lib
from r1jax.model import decoder
from r1jax.run import experiment
from r1jax.train import metrics, sft

STAGE = "pretrain"
CURVES = ("loss", "nll")


def train(cfg, workdir: str, task, tokenizer, model_cfg, mesh=None):
  """Pre-trains into workdir/pretrain (resuming a killed run) from the config's initial
  parameters (random, or init_from_hf); returns (params, info)."""
  pcfg = cfg.pretrain
  examples = task.examples("train", pcfg.num_examples, seed=cfg.seed)
  dataset = data_lib.pretrain_dataset(task, examples, tokenizer, seq_len=pcfg.seq_len,
                                      global_batch_size=pcfg.batch_size, seed=cfg.seed)
  params = experiment.initial_params(cfg, model_cfg, mesh)
  return sft.train(model_cfg, pcfg, workdir, task=task, tokenizer=tokenizer, params=params,
                   dataset=dataset, seed=cfg.seed, name=STAGE, mesh=mesh)


def summarize(cfg, workdir: str, info: dict, model_cfg, wall_time_s: float | None = None) -> dict:
  """workdir/pretrain/summary.json and curves.png from the run's metrics; returns the summary."""
  run_dir = os.path.join(workdir, STAGE)
  records = metrics.read_metrics(run_dir)
  counts = decoder.count_params(model_cfg)
  summary = {"task": cfg.task.name, "seed": cfg.seed, "num_examples": cfg.pretrain.num_examples,
             **info, "first_nll": records[0].get("nll") if records else None,
             "tokens_trained": sum(r.get("tokens", 0) for r in records),
             "params_total": counts["total"], "params_activated": counts["activated"]}
  if wall_time_s is not None:
    summary["wall_time_s"] = wall_time_s
  return metrics.finish_run(run_dir, summary, config=cfg.to_dict(), curves=CURVES)


def run(cfg, workdir: str) -> dict:
  experiment.validate(cfg)
  t_start = time.time()
  task, tokenizer, model_cfg = experiment.build(cfg)
  metrics.write_config(workdir, cfg)
  _, info = train(cfg, workdir, task, tokenizer, model_cfg, experiment.mesh_of(cfg))
  return summarize(cfg, workdir, info, model_cfg, time.time() - t_start)

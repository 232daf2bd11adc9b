"""`pretrain` mode: next-token training from random init on plain task text (no template, no
tags, no worked traces: `Task.pretrain_text`), loss on every token. The result is the base
model of R1-Zero: `grpo` mode on this workdir then starts from it. Ends with
workdir/pretrain/summary.json and workdir/pretrain/curves.png (loss and NLL per step).
"""
from __future__ import annotations

import os

from r1jax.data import datasets as data_lib
from r1jax.run import experiment
from r1jax.train import metrics, sft

STAGE = "pretrain"


def train(cfg, workdir: str, task, tokenizer, model_cfg, mesh=None):
  """Pre-trains into workdir/pretrain (resuming a killed run); returns (params, info)."""
  pcfg = cfg.pretrain
  examples = task.examples("train", pcfg.num_examples, seed=cfg.seed)
  dataset = data_lib.pretrain_dataset(task, examples, tokenizer, seq_len=pcfg.seq_len,
                                      global_batch_size=pcfg.batch_size, seed=cfg.seed)
  params = experiment.init_params(model_cfg, cfg.seed, mesh)
  return sft.train(model_cfg, pcfg, workdir, task=task, tokenizer=tokenizer, params=params,
                   dataset=dataset, seed=cfg.seed, name=STAGE, mesh=mesh)


def summarize(cfg, workdir: str, info: dict) -> dict:
  """workdir/pretrain/summary.json and curves.png from the run's metrics; returns the summary."""
  run_dir = os.path.join(workdir, STAGE)
  records = metrics.read_metrics(run_dir)
  last = records[-1] if records else {}
  summary = {"task": cfg.task.name, "seed": cfg.seed, "num_examples": cfg.pretrain.num_examples,
             "steps": info["steps"], "train_time_s": info["train_time_s"],
             "final_loss": last.get("loss"), "final_nll": last.get("nll"),
             "first_nll": records[0].get("nll") if records else None,
             "tokens_trained": sum(r.get("tokens", 0) for r in records)}
  metrics.write_summary(run_dir, summary)
  metrics.plot_curves(run_dir, ["loss", "nll"], "curves.png")
  return summary


def run(cfg, workdir: str) -> dict:
  if "pretrain" not in cfg:
    raise experiment.ConfigError("mode 'pretrain' needs a 'pretrain' config section "
                                 "(c.pretrain = sft.pretrain_defaults())")
  experiment.validate(cfg)
  task, tokenizer, model_cfg = experiment.build(cfg)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(cfg.to_json_best_effort(indent=2))
  _, info = train(cfg, workdir, task, tokenizer, model_cfg, experiment.mesh_of(cfg))
  return summarize(cfg, workdir, info)

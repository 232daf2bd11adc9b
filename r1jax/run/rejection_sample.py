"""`rejection_sample` mode (DeepSeek-R1 section 2.3.3): rejection.k completions of each of the
first rejection.num_prompts train prompts from the workdir's latest checkpoint (else
init_from_hf), kept when the task's verifier accepts them (r1jax.train.distill). Writes
workdir/config.json first, the kept traces as JSONL (rejection.output, default
workdir/rejection/traces.jsonl, which `sft.traces_path` reads) and ends with
workdir/rejection/summary.json (the yield)."""
from __future__ import annotations

import json
import os
import time

from r1jax.run import experiment
from r1jax.train import distill, metrics, sft


def run(cfg, workdir: str) -> dict:
  experiment.validate(cfg)
  t_start = time.time()
  task, tokenizer, model_cfg = experiment.build(cfg)
  metrics.write_config(workdir, cfg)
  try:
    params = experiment.params_to_evaluate(cfg, workdir, model_cfg)
  except ValueError as e:
    raise experiment.ConfigError(f"mode 'rejection_sample' samples from a checkpoint: {e}, "
                                 "and config field 'init_from_hf' is not set") from None
  rcfg = cfg.rejection
  examples = task.examples("train", rcfg.num_prompts, seed=cfg.seed)
  records, stats = distill.rejection_sample(params, model_cfg, task, tokenizer, rcfg, examples,
                                            seed=cfg.seed,
                                            mesh=experiment.rollout_mesh_of(cfg))
  run_dir = os.path.join(workdir, "rejection")
  path = sft.write_traces(rcfg.output or os.path.join(run_dir, "traces.jsonl"), records)
  print(f"[rejection_sample] accepted {stats['accepted']} / {stats['generated']} completions "
        f"({stats['accept_rate']:.3f}); {stats['prompts_with_accepted']} / {stats['prompts']} "
        f"prompts with at least one; kept {stats['kept']} traces -> {path}")
  summary = {**stats, "task": cfg.task.name, "seed": cfg.seed, "traces_path": path,
             "keep": rcfg.keep, "dedup": rcfg.dedup, "wall_time_s": time.time() - t_start}
  metrics.write_summary(run_dir, summary)
  print(json.dumps(summary, indent=2))
  return summary

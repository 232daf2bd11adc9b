"""`eval` mode: evaluates the latest GRPO (else SFT) checkpoint in workdir; writes eval.json."""
from __future__ import annotations

import json
import os

from r1jax.run import experiment
from r1jax.train import evaluate


def run(cfg, workdir: str) -> dict:
  experiment.validate(cfg)
  task, tokenizer, model_cfg = experiment.build(cfg)
  params = experiment.params_to_evaluate(cfg, workdir, model_cfg)
  result = evaluate.evaluate(params, model_cfg, task, tokenizer, cfg.eval, seed=cfg.seed,
                             mesh=experiment.rollout_mesh_of(cfg))
  print(json.dumps(result, indent=2))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result

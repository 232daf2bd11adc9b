"""Stage bookkeeping shared by the multi-stage modes (pipeline, r1_zero).

workdir/stages.json records every finished stage's result (training info, evaluation
figures, accumulated wall time), so a killed run restarts where it stopped: a training
stage resumes from its checkpoints, an evaluation already recorded is not run again.
"""
from __future__ import annotations

import json
import os

from r1jax.train import evaluate as eval_lib

STAGES_FILE = "stages.json"


def load(workdir: str) -> dict:
  """The recorded stages of workdir ({} for a fresh run)."""
  path = os.path.join(workdir, STAGES_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {}


def save(workdir: str, stages: dict) -> None:
  """Writes stages.json atomically (a kill leaves the old or the new file)."""
  path = os.path.join(workdir, STAGES_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(stages, f, indent=2)
  os.replace(path + ".tmp", path)


def evaluate(stages, key, workdir, params, model_cfg, task, tokenizer, ecfg, seed, mesh) -> dict:
  """Held-out evaluation recorded as stages[key]; a recorded one is returned as it is."""
  if key not in stages:
    stages[key] = eval_lib.evaluate(params, model_cfg, task, tokenizer, ecfg, seed=seed,
                                    mesh=mesh)
    save(workdir, stages)
  r = stages[key]
  print(f"[{key}] held-out pass@1 {r['pass@1']:.3f}  format {r['format_rate']:.3f}")
  return r

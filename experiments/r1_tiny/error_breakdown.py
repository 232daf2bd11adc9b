"""Sorts the held-out answers of each stage of an r1_tiny run by kind of mistake.

  python experiments/r1_tiny/error_breakdown.py --workdir=workdir/r1_tiny_seeds/seed0

For every stage with a checkpoint (cold start `sft`, the `sft_control` arm, `grpo`), the
answers to the held-out sums, sampled as `eval` mode samples them (greedy by default), fall
into: correct (split by whether the sum has a final carry), `teacher_slip` (the true sum
without its leading carry digit: the flaw the cold-start traces teach), `malformed` (no
<answer>) and `other_wrong`. The counts go to stdout and to
<workdir>/error_breakdown.json; they show which errors GRPO removes and SFT cannot.
"""
from __future__ import annotations

import collections
import json
import os

from absl import app, flags
from ml_collections import config_flags

from r1jax.train import evaluate

from r1jax.run import experiment
from r1jax.tasks import base

# The flags are defined when the file runs as a script, so importing it (tests/
# test_error_breakdown.py reads `classify`) beside r1jax.main, which defines --config too,
# does not define a flag twice.
_CONFIG = _WORKDIR = None

# stage directory -> the optimizer config its checkpoints were saved with, extra entries
_STAGES = (("sft", "sft", ()), ("sft_control", "sft", ()), ("grpo", "grpo", ("ref_params",)))


def classify(completion: str, answer: str, task) -> str:
  carry = "carry" if len(answer) > 3 else "no_carry"
  if task.is_correct(completion, answer=answer):
    return f"correct_{carry}"
  parsed = base.parse_response(completion)
  if parsed is None:
    return "malformed"
  if parsed[1].strip() == answer[1:] and carry == "carry":
    return "teacher_slip"
  return "other_wrong"


def breakdown(params, cfg, task, tokenizer, model_cfg) -> dict:
  """Bin counts over the k samples of each held-out problem (`evaluate`'s sampling)."""
  examples = evaluate.heldout_examples(task, cfg.eval)
  counts = collections.Counter(
      classify(text, examples[i].answer, task)
      for i, _, text, _, _ in evaluate.sample_completions(params, model_cfg, task, tokenizer,
                                                          cfg.eval, examples, seed=cfg.seed))
  return dict(sorted(counts.items()))


def main(argv):
  del argv
  cfg = _CONFIG.value
  if cfg.task.name != "arithmetic" or tuple(cfg.task.kwargs.ops) != ("+",):
    raise ValueError("error_breakdown.py reads addition answers: it needs task 'arithmetic' "
                     "with ops=('+',)")
  if tuple(cfg.task.kwargs.test_digits) != (3, 3):
    raise ValueError("error_breakdown.py tells carries by answer length: it needs "
                     "task.kwargs.test_digits=(3, 3)")
  task, tokenizer, model_cfg = experiment.build(cfg)
  result = {}
  for stage, opt_name, extra in _STAGES:
    params = experiment.restore_params(os.path.join(_WORKDIR.value, stage),
                                       cfg[opt_name].optimizer, model_cfg, extra)
    if params is None:
      continue
    result[stage] = breakdown(params, cfg, task, tokenizer, model_cfg)
    print(f"{stage:12s} {result[stage]}", flush=True)
  if not result:
    raise ValueError(f"no sft, sft_control or grpo checkpoint under {_WORKDIR.value}")
  with open(os.path.join(_WORKDIR.value, "error_breakdown.json"), "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/r1_tiny.py", "Run config.")
  _WORKDIR = flags.DEFINE_string("workdir", None, "A pipeline workdir.", required=True)
  app.run(main)

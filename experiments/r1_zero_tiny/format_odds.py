"""How likely a well-formed R1 response is under the pre-trained base model of an r1_zero run.

  python experiments/r1_zero_tiny/format_odds.py --workdir=/tmp/r1_zero_tiny

GRPO can only reinforce the tag format once some sampled completion has it: with binary
rewards, a group whose G samples all score 0 has zero advantage and zero gradient. For the
held-out prompts this prints, at the GRPO sampling temperature,
  p_first_think   P(first completion token is <think>), an upper bound on the chance that a
                  sample is well-formed once P(first token is whitespace) is added (the format
                  allows only whitespace before <think>);
  p_minimal       P(<think></think><answer>SUM</answer><eos>), the shortest correct,
                  well-formed completion (teacher-forced);
and the expected number of well-formed samples over the run's GRPO samples at the first
bound. It also prints `plain_accuracy`: how often the base model's greedy continuation of
the bare `a+b=` (its pre-training text, no template) is the sum, i.e. what pre-training
taught (with `pretrain_working`, `a+b: ` and the sum after its last `so `). Results go to
stdout and <workdir>/format_odds.json.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from r1jax.model import decoder
from r1jax.run import experiment
from r1jax.train import evaluate

_CONFIG = config_flags.DEFINE_config_file("config", "configs/r1_zero_tiny.py", "Run config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "An r1_zero workdir.", required=True)


class _PlainPrompts:
  """The task's examples prompted as pre-training text: `a+b=`, or `a+b: ` when the
  pre-training text is the column working (`pretrain_working`)."""

  def __init__(self, task):
    self.working = getattr(task, "pretrain_working", False)

  def prompt(self, example) -> str:
    return f"{example.question}: " if self.working else f"{example.question}="

  def answer(self, text: str) -> str:
    """The sum a greedy continuation states: after the last `so ` for the working."""
    return text.rsplit("so ", 1)[-1].strip() if self.working else text.strip()


def odds(params, cfg, task, tokenizer, model_cfg) -> dict:
  temperature = cfg.grpo.temperature
  examples = evaluate.heldout_examples(task, cfg.eval)
  think = tokenizer.encode("<think>")
  spaces = [tokenizer.encode(ch)[0] for ch in " \n\t" if ch in (task.alphabet() or "")]
  forward = jax.jit(lambda p, t: decoder.forward(p, t, model_cfg)[0])
  first_think, first_space, minimal = [], [], []
  for ex in examples:
    prompt = tokenizer.encode(task.prompt(ex), add_bos=True)
    response = tokenizer.encode(f"<think></think><answer>{ex.answer}</answer>", add_eos=True)
    tokens = np.array([prompt + response], np.int32)
    logits = np.asarray(forward(params, tokens), np.float64)[0] / temperature
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    n = len(prompt)
    first_think.append(logp[n - 1, think[0]])
    first_space.append(np.logaddexp.reduce(logp[n - 1, spaces]) if spaces else -np.inf)
    minimal.append(sum(logp[n - 1 + j, tok] for j, tok in enumerate(response)))
  plain = _PlainPrompts(task)
  greedy = dict(cfg.eval.to_dict(), k=1, temperature=0.0)
  solved = [plain.answer(text) == examples[i].answer
            for i, _, text, _, _ in evaluate.sample_completions(
                params, model_cfg, plain, tokenizer, ml_collections.ConfigDict(greedy),
                examples)]
  samples = cfg.grpo.steps * cfg.grpo.prompts_per_step * cfg.grpo.G
  p_think = float(np.mean(np.exp(first_think)))
  return {"temperature": temperature, "num_prompts": len(examples),
          "plain_accuracy": float(np.mean(solved)),
          "p_first_think_mean": p_think,
          "log10_p_first_think_median": float(np.median(first_think) / np.log(10)),
          "p_first_whitespace_mean": float(np.mean(np.exp(first_space))),
          "log10_p_minimal_median": float(np.median(minimal) / np.log(10)),
          "grpo_samples": samples,
          "expected_well_formed_samples_at_most": samples * float(
              np.mean(np.exp(first_think)) + np.mean(np.exp(first_space)))}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  cfg = _CONFIG.value
  task, tokenizer, model_cfg = experiment.build(cfg)
  params = experiment.restore_params(os.path.join(_WORKDIR.value, "pretrain"),
                                     cfg.pretrain.optimizer, model_cfg)
  if params is None:
    raise app.UsageError(f"no pretrain checkpoint under {_WORKDIR.value}")
  result = odds(params, cfg, task, tokenizer, model_cfg)
  print(json.dumps(result, indent=2))
  with open(os.path.join(_WORKDIR.value, "format_odds.json"), "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)

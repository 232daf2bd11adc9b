"""Held-out evaluation: pass@1 over k samples and maj@k (majority vote over k answers).

pass@1 is the mean correctness of all k samples per problem (with temperature 0 and k = 1
it is greedy accuracy); maj@k counts a problem solved when the most common extracted answer
among its k samples is correct (ties go to the answer seen first). `eval` mode runs this on
a checkpoint; the pipeline calls it before and after GRPO.
"""
from __future__ import annotations

import collections
import json
import os

import jax
import ml_collections
import numpy as np

from r1jax import sampler
from r1jax.tasks import base


def eval_defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.split = "test"
  c.num_problems = 256
  c.k = 1                 # samples per problem
  c.temperature = 0.0     # 0 = greedy
  c.max_new_tokens = 64
  c.batch_size = 256      # rows per generate call
  c.seed = 1234
  return c


def completions_text(out: sampler.SampleOutput, tokenizer) -> list[str]:
  """Decodes each row's completion (EOS and what follows excluded)."""
  tokens = np.asarray(out.tokens)
  starts = np.asarray(out.prompt_lengths)
  lengths = np.asarray(out.lengths)
  return [tokenizer.decode(tokens[i, starts[i]:starts[i] + lengths[i]]) for i in range(len(tokens))]


def sample_completions(params, model_cfg, task, tokenizer, ecfg, examples, *, mesh=None):
  """ecfg.k completions of each example, ecfg.batch_size rows per generate call.

  Yields (example index, sample index, completion text, length, truncated) in order.
  """
  prompts = [tokenizer.encode(task.prompt(ex), add_bos=True) for ex in examples]
  rows = [(i, s, p) for i, p in enumerate(prompts) for s in range(ecfg.k)]
  key = jax.random.key(ecfg.seed)
  for start in range(0, len(rows), ecfg.batch_size):
    chunk = rows[start:start + ecfg.batch_size]
    # Pad the last chunk to the full batch so one program serves every call.
    padded = chunk + [chunk[-1]] * (ecfg.batch_size - len(chunk))
    out = sampler.generate(params, model_cfg, [p for _, _, p in padded],
                           jax.random.fold_in(key, start), max_new_tokens=ecfg.max_new_tokens,
                           temperature=ecfg.temperature, eos_ids=(tokenizer.eos_id,),
                           pad_id=tokenizer.pad_id, mesh=mesh)
    texts = completions_text(out, tokenizer)
    for j, (i, s, _) in enumerate(chunk):
      yield i, s, texts[j], int(out.lengths[j]), bool(out.truncated[j])


def evaluate(params, model_cfg, task, tokenizer, ecfg, *, mesh=None) -> dict:
  """Samples k completions for each of the first num_problems examples of ecfg.split."""
  examples = task.examples(ecfg.split, ecfg.num_problems, seed=ecfg.seed)
  correct = np.zeros((len(examples), ecfg.k), bool)
  answers = [[None] * ecfg.k for _ in examples]
  formatted, lengths, truncated = [], [], []
  for i, s, text, length, trunc in sample_completions(params, model_cfg, task, tokenizer, ecfg,
                                                      examples, mesh=mesh):
    correct[i, s] = task.is_correct(text, **examples[i].reward_kwargs())
    parsed = base.parse_response(text)
    formatted.append(parsed is not None)
    answers[i][s] = parsed[1].strip() if parsed else None
    lengths.append(length)
    truncated.append(trunc)
  maj = []
  for i in range(len(examples)):
    votes = collections.Counter(a for a in answers[i] if a is not None)
    if not votes:
      maj.append(False)
      continue
    best = max(votes.values())
    winner = next(a for a in answers[i] if a is not None and votes[a] == best)
    maj.append(bool(correct[i, answers[i].index(winner)]))
  return {"pass@1": float(correct.mean()), f"maj@{ecfg.k}": float(np.mean(maj)),
          "format_rate": float(np.mean(formatted)), "mean_completion_length": float(np.mean(lengths)),
          "truncation_rate": float(np.mean(truncated)), "num_problems": len(examples), "k": ecfg.k}


def run(cfg, workdir: str) -> dict:
  """`eval` mode: evaluates the latest GRPO (else SFT) checkpoint in workdir."""
  from r1jax import pipeline
  task, tokenizer, model_cfg = pipeline.build(cfg)
  params = pipeline.latest_params(cfg, workdir, model_cfg)
  result = evaluate(params, model_cfg, task, tokenizer, cfg.eval, mesh=pipeline.mesh_of(cfg))
  print(json.dumps(result, indent=2))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result

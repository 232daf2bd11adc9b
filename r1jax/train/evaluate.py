"""Held-out evaluation: pass@1 over k samples and maj@k (majority vote over k answers).

pass@1 is the mean correctness of all k samples per problem (with temperature 0 and k = 1
it is greedy accuracy); maj@k counts a problem solved when the most common extracted answer
among its k samples is correct (ties go to the answer seen first). `eval` mode runs this on
a checkpoint; the pipeline calls it before and after GRPO.

The held-out problems are the first num_problems of the split drawn with HELDOUT_SEED,
the same for every run and seed, so runs compare on one set; the sampling keys (k > 1 or
temperature > 0) derive from the run's seed.
"""
from __future__ import annotations

import collections

import jax
import ml_collections
import numpy as np

from r1jax.rollout import sampler as sampler_lib
from r1jax.tasks import base

HELDOUT_SEED = 1234


def eval_defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.split = "test"        # the split held-out problems come from
  c.num_problems = 256    # the first num_problems of the split drawn with HELDOUT_SEED
  c.k = 1                 # samples per problem (pass@1 over k, maj@k)
  c.temperature = 0.0     # 0 = greedy
  c.max_new_tokens = 64   # completion tokens per sample
  c.batch_size = 256      # rows per generate call
  return c


def validate(ecfg) -> None:
  """ValueError naming the first eval config field that no evaluation could use."""
  for field in ("num_problems", "k", "max_new_tokens", "batch_size"):
    if ecfg[field] < 1:
      raise ValueError(f"eval config field {field!r} must be >= 1, got {ecfg[field]}")
  if not ecfg.temperature >= 0:
    raise ValueError(f"eval config field 'temperature' must be >= 0 (0 = greedy), "
                     f"got {ecfg.temperature}")
  if "top_p" in ecfg and not 0 < ecfg.top_p <= 1:
    raise ValueError(f"eval config field 'top_p' must lie in (0, 1] (1 = off), got {ecfg.top_p}")
  if "top_k" in ecfg and (not isinstance(ecfg.top_k, int) or ecfg.top_k < 0):
    raise ValueError(f"eval config field 'top_k' must be >= 0 and an int (0 = off), "
                     f"got {ecfg.top_k!r}")
  if ecfg.split not in base.SPLITS:
    raise ValueError(f"eval config field 'split' must be one of {base.SPLITS}, got {ecfg.split!r}")


def sample_completions(params, model_cfg, task, tokenizer, ecfg, examples, *, seed: int = 0,
                       mesh=None):
  """ecfg.k completions of each example, ecfg.batch_size rows per generate call (with
  ecfg.top_p / ecfg.top_k where the config has them).

  Yields (example index, sample index, completion text, length, truncated) in order. The
  weights are laid out for decoding once, whatever the number of calls.
  """
  prompts = [tokenizer.encode(task.prompt(ex), add_bos=True) for ex in examples]
  rows = [(i, s, p) for i, p in enumerate(prompts) for s in range(ecfg.k)]
  key = jax.random.key(seed)
  sampler = sampler_lib.Sampler(model_cfg, mesh)
  dparams = sampler.prepare(params)
  for start in range(0, len(rows), ecfg.batch_size):
    chunk = rows[start:start + ecfg.batch_size]
    # Pad the last chunk to the full batch so one program serves every call.
    padded = chunk + [chunk[-1]] * (ecfg.batch_size - len(chunk))
    out = sampler.generate(dparams, [p for _, _, p in padded], jax.random.fold_in(key, start),
                           max_new_tokens=ecfg.max_new_tokens, temperature=ecfg.temperature,
                           top_p=ecfg.get("top_p", 1.0), top_k=ecfg.get("top_k", 0),
                           eos_ids=(tokenizer.eos_id,), pad_id=tokenizer.pad_id,
                           num_ids=tokenizer.vocab_size)
    texts = sampler_lib.completions_text(out, tokenizer)
    for j, (i, s, _) in enumerate(chunk):
      yield i, s, texts[j], int(out.lengths[j]), bool(out.truncated[j])


def heldout_examples(task, ecfg):
  """The held-out problems every evaluation of `ecfg` runs on (see the module docstring)."""
  return task.examples(ecfg.split, ecfg.num_problems, seed=HELDOUT_SEED)


def evaluate(params, model_cfg, task, tokenizer, ecfg, *, seed: int = 0, mesh=None) -> dict:
  """Samples k completions for each of the first num_problems held-out examples."""
  examples = heldout_examples(task, ecfg)
  correct = np.zeros((len(examples), ecfg.k), bool)
  answers = [[None] * ecfg.k for _ in examples]
  formatted, lengths, truncated = [], [], []
  for i, s, text, length, trunc in sample_completions(params, model_cfg, task, tokenizer, ecfg,
                                                      examples, seed=seed, mesh=mesh):
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

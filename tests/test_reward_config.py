"""Rewards as config (grpo.rewards / grpo.reward_mode / grpo.overlong_cache_len).

What they pin down: the composed reward of hand-written completions for 'sum' and 'gated'
equals hand-computed numbers; the task's default_rewards fill unset weights; the VerifierPool
path gives exactly the in-process per-component values; bad configs name their field; a tiny
GRPO run logs reward_<component> per nonzero weight with reward_mean their weighted sum; the
time split puts reward time in time_verify_s, not time_sample_s; a step with all-equal
rewards warns once and is counted.
"""
from __future__ import annotations

import copy
import os
import time
import zlib

import jax
import numpy as np
import pytest

from r1jax.model import decoder as model_lib
from r1jax.run import experiment
from r1jax.tasks import base
from r1jax.train import metrics as metrics_lib
from r1jax.train import rl
from r1jax.verify import rewards as rewards_lib

import tiny_runs


class _Lenient(base.Task):
  """Accuracy 1.0 iff the gold answer appears anywhere (so a malformed response can be
  'correct', which is what reward_mode='gated' is about)."""

  name = "lenient"
  default_rewards = {"accuracy": 1.0}

  def source(self, split, seed=0):
    return [base.Example("12+30", "42")]

  def is_correct(self, completion, *, answer, **unused):
    del unused
    return answer in completion


PROMPT = "User: 12+30\nAssistant:"
# (completion, its length in tokens); with max_new_tokens 10 and L_cache 4 the overlong
# penalty is 0 up to 6 tokens, then falls linearly to -1 at 10.
COMPLETIONS = [
    ("<think>add two and four</think><answer>42</answer>", 5),  # acc 1, fmt 1, lang 1, ovl 0
    ("42", 8),                                                # acc 1, fmt 0, lang 0, ovl -0.5
    ("<think>сумма is</think><answer>41</answer>", 10),        # acc 0, fmt 1, lang 0.5, ovl -1
    ("<think>a</think>", 3),                                  # acc 0, fmt 0, lang 1, ovl 0
]
WANT = {"accuracy": [1, 1, 0, 0], "format": [1, 0, 1, 0], "language": [1, 0, 0.5, 1],
        "overlong": [0, -0.5, -1, 0]}


def _gcfg(mode="sum", **weights):
  gcfg = rl.grpo_defaults()
  gcfg.max_new_tokens, gcfg.overlong_cache_len, gcfg.reward_mode = 10, 4, mode
  for k, v in weights.items():
    gcfg.rewards[k] = v
  rl.validate(gcfg)
  return gcfg


def _score(gcfg, task, completions=COMPLETIONS, task_name="", examples=None):
  scorer = rl.Scorer(task_name, {}, task, gcfg)
  try:
    examples = examples or [base.Example("12+30", "42")] * len(completions)
    prompts = [task.prompt(e) for e in examples]
    return scorer.result(scorer.submit(prompts, [c for c, _ in completions], examples,
                                       np.array([n for _, n in completions])))
  finally:
    scorer.close()


ALL = dict(accuracy=1.0, format=0.5, language=0.25, overlong=1.0)


@pytest.mark.parametrize("mode, weights, want_total", [
    # 1 * acc + 0.5 * fmt + 0.25 * lang + 1 * ovl
    ("sum", ALL, [1.75, 0.5, -0.375, 0.25]),
    # the second is correct but malformed: its accuracy term is gated off
    ("gated", ALL, [1.75, -0.5, -0.375, 0.25]),
    # the gate is computed even when format has no weight
    ("gated", dict(accuracy=1.0, format=0.0), [1.0, 0.0, 0.0, 0.0]),
    ("sum", dict(accuracy=1.0, format=0.0), [1.0, 1.0, 0.0, 0.0]),
])
def test_composition_on_hand_written_completions(mode, weights, want_total):
  scores = _score(_gcfg(mode, **weights), _Lenient())
  np.testing.assert_allclose(scores.total, want_total, atol=1e-12)
  for name in scores.components:
    np.testing.assert_allclose(scores.components[name], WANT[name], atol=1e-12, err_msg=name)
  active = {n for n, w in weights.items() if w}
  # accuracy always (the accuracy metric); the rule-based ones when weighted or gating
  assert set(scores.components) == {"accuracy"} | (active - {"accuracy"}) | (
      {"format"} if mode == "gated" else set())


def test_unset_weights_come_from_the_task_defaults():
  task = _Lenient()
  task.default_rewards = {"accuracy": 1.0, "format": 0.5}
  assert rl.reward_weights(_gcfg(), task) == dict(accuracy=1.0, format=0.5, language=0.0,
                                                  overlong=0.0)
  assert rl.reward_weights(_gcfg(format=0.0, language=2.0), task) == dict(
      accuracy=1.0, format=0.0, language=2.0, overlong=0.0)
  np.testing.assert_allclose(_score(_gcfg(), task).total, [1.5, 1.0, 0.5, 0.0])
  for builtin in ("arithmetic", "countdown", "code", "gsm8k", "math", "mbpp"):
    module, cls = base._REGISTRY[builtin].split(":")
    assert getattr(__import__(module, fromlist=[cls]), cls).default_rewards == {"accuracy": 1.0}


def test_pool_gives_the_in_process_components():
  """The same hand-written completions scored in-process and in a VerifierPool (which
  rebuilds the arithmetic task from its name): equal per component and in total."""
  task = base.get_task("arithmetic")
  example = base.Example("12 + 30", "42")
  completions = [("<think>2+0=2, 1+3=4</think><answer>42</answer>", 7),
                 ("<think>carry</think> <answer>41</answer>", 9),
                 ("42", 2),
                 ("<think>forty two</think><answer>42</answer>\n", 10),
                 ("<answer>42</answer>", 6)]
  gcfg = _gcfg("gated", accuracy=1.0, format=0.5, language=0.25, overlong=1.0)
  local = _score(gcfg, task, completions, "arithmetic", [example] * len(completions))
  gcfg.reward_workers = 1
  pooled = _score(gcfg, task, completions, "arithmetic", [example] * len(completions))
  np.testing.assert_array_equal(local.components["accuracy"], [1, 0, 0, 1, 0])
  assert local.components.keys() == pooled.components.keys()
  for name in local.components:
    np.testing.assert_array_equal(local.components[name], pooled.components[name], err_msg=name)
  np.testing.assert_array_equal(local.total, pooled.total)
  assert pooled.compute_s > 0


# ------------------------------------------------------------------------ config errors


def _set(**fields):
  def edit(gcfg):
    for k, v in fields.items():
      if k.startswith("rewards."):
        gcfg.rewards[k[len("rewards."):]] = v
      else:
        gcfg[k] = v
  return edit


@pytest.mark.parametrize("edit, message", [
    (_set(reward_mode="product"), "'reward_mode' must be one of \\('sum', 'gated'\\)"),
    (_set(**{"rewards.format": -0.5}), "grpo.rewards.format must be a finite weight >= 0"),
    (_set(**{"rewards.accuracy": 0.0, "rewards.format": 0.0, "rewards.language": 0.0,
             "rewards.overlong": 0.0}), "grpo.rewards: every weight is 0"),
    (_set(**{"rewards.overlong": 1.0}), "grpo.rewards.overlong > 0 needs grpo.overlong_cache_len"),
    (_set(overlong_cache_len=65), "grpo.overlong_cache_len \\(65\\) must be <= "
                                  "grpo.max_new_tokens \\(64\\)"),
    (_set(overlong_cache_len=-1), "grpo.overlong_cache_len must be >= 0"),
    (_set(**{"rewards.lenght": 1.0}), "grpo.rewards.lenght is not a reward component"),
])
def test_validate_names_the_reward_field(edit, message):
  gcfg = rl.grpo_defaults()
  rl.validate(gcfg)
  edit(gcfg)
  with pytest.raises(ValueError, match=message):
    rl.validate(gcfg)


@pytest.mark.parametrize("defaults, weights, message", [
    ({}, {}, "grpo.rewards: every weight is 0 \\(with task 'lenient'"),
    ({"accuracy": 1.0}, {"accuracy": 0.0}, "every weight is 0"),
    ({"accuracy": 1.0, "overlong": 0.5}, {}, "grpo.rewards.overlong > 0 \\(with task"),
    ({"acc": 1.0}, {}, "task 'lenient' default_rewards names unknown components \\['acc'\\]"),
])
def test_task_defaults_are_checked_with_the_config(defaults, weights, message):
  gcfg = rl.grpo_defaults()
  for k, v in weights.items():
    gcfg.rewards[k] = v
  rl.validate(gcfg)  # not decidable without the task
  task = _Lenient()
  task.default_rewards = defaults
  with pytest.raises(ValueError, match=message):
    rl.reward_weights(gcfg, task)


def test_combine_matches_make_reward_fn():
  """rewards.combine on component values is make_reward_fn's rule."""
  weights = {"accuracy": 1.0, "format": 0.5}
  for mode in rewards_lib.MODES:
    fn = rewards_lib.make_reward_fn(weights, mode=mode)
    for text in ("<think>a</think><answer>\\boxed{2}</answer>", "\\boxed{2}", "<answer>3</answer>"):
      values = {"accuracy": rewards_lib.accuracy_reward("Q", text, answer="2"),
                "format": rewards_lib.format_reward("Q", text)}
      assert rewards_lib.combine(values, weights, mode) == fn("Q", text, answer="2")


# ------------------------------------------------------------------------ tiny GRPO runs


@pytest.fixture(scope="module")
def built():
  cfg = tiny_runs.load_config()
  task, tokenizer, model_cfg = experiment.build(cfg)
  params = model_lib.init_params(model_cfg, jax.random.key(cfg.seed))
  return cfg, tokenizer, model_cfg, params


def _train(built, workdir, reward, **overrides):
  cfg, tokenizer, model_cfg, params = built
  task = experiment.build(cfg)[0]
  task.reward = reward
  gcfg = copy.deepcopy(cfg.grpo)
  for k, v in overrides.items():
    if k.startswith("rewards_"):
      gcfg.rewards[k[len("rewards_"):]] = v
    else:
      gcfg[k] = v
  rl.train(model_cfg, gcfg, str(workdir), task=task, tokenizer=tokenizer, params=params,
           task_name=cfg.task.name, task_kwargs=cfg.task.kwargs.to_dict(), seed=cfg.seed,
           progress=False)
  return metrics_lib.read_metrics(os.path.join(workdir, "grpo"))


SLEEP_S = 0.02


def test_tiny_run_logs_each_component_and_times_the_rewards(built, tmp_path):
  calls = []

  def slow_parity(prompt, completion, **fields):
    del fields
    time.sleep(SLEEP_S)
    calls.append((prompt, completion))
    return float(zlib.crc32(completion.encode("utf-8")) % 2)

  rows = _train(built, tmp_path, slow_parity, steps=2, rewards_accuracy=1.0,
                rewards_format=0.5)
  n = 16  # prompts_per_step 4 x G 4
  assert [r["step"] for r in rows] == [1, 2] and len(calls) == 2 * n
  for row, step_calls in zip(rows, (calls[:n], calls[n:])):
    acc = np.array([zlib.crc32(c.encode("utf-8")) % 2 for _, c in step_calls], float)
    fmt = np.array([rewards_lib.format_reward(p, c) for p, c in step_calls])
    assert row["reward_accuracy"] == pytest.approx(acc.mean(), abs=1e-12)
    assert row["accuracy"] == pytest.approx(acc.mean(), abs=1e-12)
    assert row["reward_format"] == pytest.approx(fmt.mean(), abs=1e-12)
    assert row["reward_mean"] == pytest.approx(acc.mean() + 0.5 * fmt.mean(), abs=1e-12)
    assert "reward_language" not in row and "reward_overlong" not in row
    assert row["time_verify_s"] >= n * SLEEP_S
    assert row["time_reward_compute_s"] >= n * SLEEP_S
  # step 2 compiles nothing: the phases are disjoint parts of the step, so the sleeps,
  # counted in time_verify_s, are not in time_sample_s too
  last = rows[1]
  assert last["time_sample_s"] + last["time_verify_s"] + last["time_train_s"] <= \
      last["step_time_s"] + 1e-3
  assert last["total_verify_s"] >= 2 * n * SLEEP_S


def test_all_equal_rewards_warn_once_and_are_counted(built, tmp_path, capsys):
  rows = _train(built, tmp_path, lambda prompt, completion, **fields: 0.0, steps=2)
  out = capsys.readouterr().out
  assert out.count("every advantage is 0") == 1, out
  assert "reward 0 for every completion" in out and "grpo.rewards.format" in out
  assert [r["steps_no_rows"] for r in rows] == [1, 2]
  assert [r["grad_norm"] for r in rows] == [0.0, 0.0]
  if built[2].mtp_depth > 0:
    assert out.count("MTP module(s) are not trained during RL") == 1

"""Tests of the GRPO loop (r1jax/train/rl.py) on configs/test_tiny.py.

What they pin down: one step really trains (a non-bias weight moves, the on-policy ratio is
1) and logs every promised metric; a run SIGKILLed past a checkpoint and resumed ends
bitwise equal to an uninterrupted run with equal metrics; a reward that raises never stops
training and is scored 0 and counted; a NaN stops the run before its checkpoint; a bad
config names its field.
"""
from __future__ import annotations

import copy
import math
import os
import zlib

import jax
import numpy as np
import pytest

from r1jax.model import decoder as model_lib
from r1jax.rollout import sampler as sampler_lib
from r1jax.run import experiment
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import metrics as metrics_lib
from r1jax.train import rl

import tiny_runs


@pytest.fixture(scope="module")
def built():
  cfg = tiny_runs.load_config()
  task, tokenizer, model_cfg = experiment.build(cfg)
  params = model_lib.init_params(model_cfg, jax.random.key(cfg.seed))
  return cfg, task, tokenizer, model_cfg, params


def _fresh_task(cfg):
  """A task object of its own, so a test may replace its reward."""
  return experiment.build(cfg)[0]


def _checksum(text: str) -> int:
  return zlib.crc32(text.encode("utf-8"))


def _train(built, workdir, task, **overrides):
  cfg, _, tokenizer, model_cfg, params = built
  gcfg = copy.deepcopy(cfg.grpo)
  task_kwargs = overrides.pop("task_kwargs", cfg.task.kwargs.to_dict())
  for k, v in overrides.items():
    gcfg[k] = v
  return rl.train(model_cfg, gcfg, str(workdir), task=task, tokenizer=tokenizer, params=params,
                  task_name=cfg.task.name, task_kwargs=task_kwargs, seed=cfg.seed,
                  progress=False)


_leaves = tiny_runs.leaves


# ------------------------------------------------------------------------ one step


def _parity_task(cfg, calls: list):
  """The config's task with a reward that splits completions (crc32 parity of the text);
  every (completion, reward) is appended to `calls`."""
  task = _fresh_task(cfg)

  def reward(prompt, completion, **fields):
    del prompt, fields
    r = float(_checksum(completion) % 2)
    calls.append((completion, r))
    return r

  task.reward = reward
  return task


@pytest.fixture(scope="module")
def one_step(built, tmp_path_factory):
  """One GRPO step with a reward that splits the completions (crc32 parity of the text)."""
  calls = []
  task = _parity_task(built[0], calls)
  workdir = tmp_path_factory.mktemp("grpo_one_step")
  params, info = _train(built, workdir, task, steps=1)
  return workdir, params, info, calls


def test_one_step_moves_weights_not_only_router_biases(built, one_step):
  before = _leaves(built[4])
  _, params, info, calls = one_step
  after = _leaves(params)
  assert info["steps"] == 1
  assert len(calls) == 16  # prompts_per_step 4 x G 4
  rewards = [r for _, r in calls]
  assert 0 < sum(rewards) < 16, "the test reward must split the group, or nothing is learned"
  changed = [k for k in before if not np.array_equal(before[k], after[k])]
  weights = [k for k in changed if "router']['bias" not in k]
  assert weights, f"only {changed} changed"
  assert all(np.isfinite(after[k]).all() for k in after)
  # The caller's parameters are copied, never donated or modified.
  assert all(np.array_equal(before[k], _leaves(built[4])[k]) for k in before)


def test_one_step_writes_finite_metrics(one_step):
  workdir, _, _, calls = one_step
  rows = metrics_lib.read_metrics(os.path.join(workdir, "grpo"))
  assert [r["step"] for r in rows] == [1]
  row = rows[0]
  for key in ("reward_mean", "reward_std", "accuracy", "format_rate", "loss", "grad_norm",
              "clip_frac_low", "clip_frac_high", "ratio_mean", "approx_kl_old", "kl_ref",
              "entropy", "expert_imbalance", "completion_length", "truncation_rate",
              "sample_tokens_per_s", "train_tokens_per_s", "time_sample_s", "time_verify_s",
              "time_train_s", "time_reward_compute_s", "step_time_s", "reward_failures",
              "reward_accuracy", "steps_no_rows", "refills_ahead", "refills_discarded"):
    assert key in row, key
    assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (key, row[key])
  rewards = np.array([r for _, r in calls])
  assert row["reward_mean"] == pytest.approx(rewards.mean(), abs=1e-12)
  assert row["reward_accuracy"] == row["reward_mean"]  # the default: accuracy alone, weight 1
  assert "reward_format" not in row
  assert row["reward_std"] == pytest.approx(rewards.std(), abs=1e-12)
  assert row["accuracy"] == pytest.approx((rewards >= 1).mean(), abs=1e-12)
  assert row["reward_failures"] == 0
  # On-policy (mu = 1, one minibatch): the first update sees the sampler's own log-probs,
  # so the importance ratio is 1 and nothing is clipped.
  assert row["ratio_mean"] == pytest.approx(1.0, abs=1e-3)
  assert row["approx_kl_old"] < 1e-5
  assert row["clip_frac_low"] == 0 and row["clip_frac_high"] == 0
  assert row["kl_ref"] == 0.0  # beta = 0: no reference term
  assert 0 < row["entropy"] <= math.log(43) + 1e-4
  assert row["expert_imbalance"] >= 1.0
  assert row["time_sample_s"] > 0 and row["time_train_s"] > 0
  assert row["step_time_s"] >= row["time_sample_s"] + row["time_train_s"]
  with ckpt_lib.CheckpointManager(os.path.join(workdir, "grpo")) as m:
    assert m.all_steps() == [1]


# ------------------------------------------------------------------------ resume


def test_grpo_killed_and_resumed_equals_uninterrupted(tmp_path):
  params_a, info_a = tiny_runs.run_grpo(str(tmp_path / "a"))
  params_b, info_b = tiny_runs.run_killed_then_resumed("grpo", tmp_path / "b")
  assert info_a["steps"] == info_b["steps"] == 4
  tiny_runs.assert_same_run("grpo", tmp_path / "a", params_a, tmp_path / "b", params_b)
  rows = metrics_lib.read_metrics(os.path.join(tmp_path / "b", "grpo"))
  assert [r["step"] for r in rows] == [1, 2, 3, 4]  # step 3 of the killed run written once
  # The resumed run continues the accumulated time split rather than restarting it.
  assert rows[-1]["total_train_s"] >= rows[1]["total_train_s"] + rows[-1]["time_train_s"] - 1e-6


# ------------------------------------------------------------------------ reward failures


def test_reward_exceptions_score_zero_and_are_counted_per_step(built, tmp_path):
  cfg = built[0]
  task = _fresh_task(cfg)
  raised = []  # one flag per scored item, in scoring order (16 per step)

  def flaky(prompt, completion, **fields):
    del prompt, fields
    raised.append(_checksum(completion) % 3 == 0)
    if raised[-1]:
      raise RuntimeError("verifier crashed")
    return 1.0

  task.reward = flaky
  _, info = _train(built, tmp_path, task, steps=2)
  assert info["steps"] == 2 and len(raised) == 32
  rows = metrics_lib.read_metrics(os.path.join(tmp_path, "grpo"))
  for row, flags in zip(rows, (raised[:16], raised[16:])):
    n = sum(flags)
    assert 0 < n < 16
    assert row["reward_failures"] == n  # this step's failures, not a running total
    assert row["reward_mean"] == pytest.approx((16 - n) / 16, abs=1e-12)


def test_reward_failures_in_a_verifier_pool_do_not_stop_training(built, tmp_path):
  # The workers rebuild the task from (name, kwargs); these kwargs make that raise for every
  # item, while the loop's own task object is fine.
  _, info = _train(built, tmp_path, _fresh_task(built[0]), steps=1, reward_workers=1,
                   reward_timeout_s=30.0, task_kwargs={"ops": ("/",)})
  assert info["steps"] == 1
  row = metrics_lib.read_metrics(os.path.join(tmp_path, "grpo"))[0]
  assert row["reward_mean"] == 0.0
  assert row["reward_failures"] == 16


# ------------------------------------------------------------------------ NaN guard


def test_nan_loss_stops_before_the_checkpoint(built, tmp_path):
  cfg, _, tokenizer, model_cfg, params = built
  bad = jax.tree.map(lambda x: x, params)
  bad["final_norm"] = bad["final_norm"] * np.nan
  with pytest.raises(FloatingPointError, match=r"step 1: loss is nan"):
    rl.train(model_cfg, cfg.grpo, str(tmp_path), task=_fresh_task(cfg), tokenizer=tokenizer,
             params=bad, seed=cfg.seed, progress=False)
  with ckpt_lib.CheckpointManager(os.path.join(tmp_path, "grpo")) as m:
    assert m.latest_step() is None
  assert metrics_lib.read_metrics(os.path.join(tmp_path, "grpo")) == []


# ------------------------------------------------------------------------ config errors


@pytest.mark.parametrize("field, value, message", [
    ("G", 1, "'G' must be >= 2"),
    ("minibatches", 3, "'minibatches' must divide prompts_per_step \\* G \\(16\\)"),
    ("loss", "ppo", "'loss' must be one of"),
    ("kl", "k4", "'kl' must be one of \\['k1', 'k2', 'k3'\\]"),
    ("adv_scale", "rank", "'adv_scale' must be one of"),
    ("temperature", 0.0, "'temperature' must be > 0"),
    ("beta", -0.1, "'beta' must be >= 0"),
    ("steps", 0, "'steps' must be >= 1"),
    ("mu", 0, "'mu' must be >= 1"),
    ("top_p", 1.5, "'top_p' must lie in \\(0, 1\\]"),
    ("top_k", -1, "'top_k' must be >= 0"),
    ("epsilon_high", -0.2, "'epsilon_high' must be >= 0"),
    ("reward_timeout_s", 0.0, "'reward_timeout_s' must be > 0"),
])
def test_validate_names_the_field(built, field, value, message):
  gcfg = copy.deepcopy(built[0].grpo)
  rl.validate(gcfg)  # the test config itself is valid
  gcfg[field] = value
  with pytest.raises(ValueError, match=message):
    rl.validate(gcfg)


def test_train_rejects_a_bad_config_before_writing_anything(built, tmp_path):
  with pytest.raises(ValueError, match="'G'"):
    _train(built, tmp_path, built[1], G=1)
  assert not os.path.exists(os.path.join(tmp_path, "grpo"))


def test_assemble_keeps_mixed_groups_of_every_refill():
  """Dynamic sampling concatenates refills, each max_prompt_len + max_new_tokens wide (the
  padded prompt batch plus new tokens); all-equal groups drop and padding rows fill the rest."""
  gcfg = rl.grpo_defaults()
  gcfg.G, gcfg.max_prompt_len, gcfg.max_new_tokens, gcfg.dynamic_sampling = 2, 6, 3, True

  def rollout(width, fill, prompt_len):
    tokens = np.full((4, width), fill, np.int32)
    mask = np.zeros((4, width), bool)
    mask[:, prompt_len:prompt_len + 3] = True
    return sampler_lib.SampleOutput(
        tokens=tokens, completion_mask=mask, lengths=np.full((4,), 3, np.int32),
        logprobs=np.where(mask, -0.5, 0.0).astype(np.float32), truncated=np.zeros((4,), bool),
        prompt_lengths=np.full((4,), prompt_len, np.int32), steps=np.int32(3))

  # the second group of each rollout is all-equal and dropped; 4 rows kept, 2 padding rows
  groups = [(rollout(9, 1, 4), ["a"] * 4, np.array([1.0, 0.0, 1.0, 1.0])),
            (rollout(9, 2, 6), ["b"] * 4, np.array([0.0, 1.0, 0.0, 0.0]))]
  rows = rl._assemble(groups, gcfg, n_rows=6)
  assert rows["tokens"].shape == (6, 9)
  np.testing.assert_array_equal(rows["tokens"][:2], [[1] * 9] * 2)
  np.testing.assert_array_equal(rows["tokens"][2:4], [[2] * 9] * 2)
  assert rows["mask"][:2, 4:7].all() and not rows["mask"][:2, 7:].any()
  assert rows["mask"][2:4, 6:9].all() and not rows["mask"][2:4, :6].any()
  assert not rows["mask"][4:].any() and not rows["tokens"][4:].any()
  np.testing.assert_allclose(rows["advantages"][:4], [1.0, -1.0, -1.0, 1.0], atol=1e-5)
  assert rows["info"]["rows_trained"] == 4
  with pytest.raises(ValueError, match="rollout width 7 is not max_prompt_len"):
    rl._assemble([(rollout(7, 1, 4), ["a"] * 4, np.array([1.0, 0.0, 1.0, 1.0]))], gcfg, 6)


# ------------------------------------------------------------------------ sharded


def test_sharded_step_equals_one_device(built, one_step, tmp_path):
  """The same GRPO step with parameters, optimizer state, minibatches and rollouts laid out
  over a data x fsdp x expert mesh: the same completions and, up to float reduction order,
  the same parameters as on one device.

  Why the tolerance has two parts: Adam's first step moves each element by
  lr * g / (|g| + eps), about lr * sign(g). Where |g| is at the level of the gradient's
  reduction-order noise (which differs between the sharded and the one-device program, and
  between XLA versions), its sign, and so the update, may flip; elsewhere the update is
  stable. So elements the one-device step moved by at least lr / 2 must agree to 1e-5, and
  every element must stay within the most one step can move it (2 lr).
  """
  from r1jax import sharding
  cfg, _, tokenizer, model_cfg, params = built
  calls = []
  task = _parity_task(cfg, calls)
  gcfg = copy.deepcopy(cfg.grpo)
  gcfg.steps = 1
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "expert": 2})
  got, _ = rl.train(model_cfg, gcfg, str(tmp_path), task=task, tokenizer=tokenizer,
                    params=params, task_name=cfg.task.name, seed=cfg.seed, progress=False,
                    mesh=mesh)
  _, want, _, want_calls = one_step
  assert calls == want_calls
  assert any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
             for x in jax.tree.leaves(got)), "no parameter was sharded"
  _assert_same_first_adam_step(got, want, params, gcfg.optimizer)


def _assert_same_first_adam_step(got, want, start, ocfg):
  """got and want are one Adam step from start, equal up to gradient reduction order."""
  lr = ocfg.lr
  assert ocfg.warmup_steps == 0 and ocfg.weight_decay == 0  # step 1 moves by about lr
  got, want, start = _leaves(got), _leaves(want), _leaves(start)
  stable_elements = 0
  for k in want:
    moved = np.abs(want[k] - start[k])
    assert moved.max() <= lr * (1 + 1e-3) + 1e-7, k  # what one Adam step can do
    stable = moved >= lr / 2
    stable_elements += int(stable.sum())
    np.testing.assert_allclose(got[k][stable], want[k][stable], atol=1e-5, rtol=1e-4, err_msg=k)
    assert np.all(np.abs(got[k] - want[k]) <= 2 * lr + 1e-6), k
  assert stable_elements > 0.5 * sum(v.size for v in want.values())


def test_rollouts_on_their_own_mesh_equal_one_device(built, one_step, tmp_path):
  """Rollouts on a data mesh of 4 host devices (one decode loop per device) while training
  stays on one device: the same completions, rewards and step as all on one device."""
  from r1jax import sharding
  cfg, _, tokenizer, model_cfg, params = built
  calls = []
  task = _parity_task(cfg, calls)
  gcfg = copy.deepcopy(cfg.grpo)
  gcfg.steps = 1
  got, _ = rl.train(model_cfg, gcfg, str(tmp_path), task=task, tokenizer=tokenizer,
                    params=params, task_name=cfg.task.name, seed=cfg.seed, progress=False,
                    rollout_mesh=sharding.make_mesh({"data": 4}, jax.devices()[:4]))
  _, want, _, want_calls = one_step
  assert calls == want_calls
  assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(got))
  _assert_same_first_adam_step(got, want, params, gcfg.optimizer)

"""Reward functions (R1 format/accuracy/language, DAPO overlong) and the verifier pool."""
from __future__ import annotations

import functools
import math
import time

import pytest

import pool_helpers
from r1jax.verify import pool as pool_lib
from r1jax.verify import rewards

GOOD = '<think>2 + 2 = 4, so half is 2</think> <answer>\\boxed{2}</answer>'


@pytest.mark.parametrize('completion,expected', [
    (GOOD, 1.0),
    ('<think>a</think>\n<answer>b</answer>\n', 1.0),
    ('<answer>b</answer>', 0.0),
    ('<think>a</think>', 0.0),
    ('<answer>b</answer><think>a</think>', 0.0),
    ('<think>a</think><answer>b</answer><answer>c</answer>', 0.0),
    ('<think>a<think>b</think><answer>c</answer>', 0.0),
    ('text <think>a</think><answer>b</answer>', 0.0),
    ('<think>a</think><answer>b</answer> trailing', 0.0),
    ('<think>a</think><answer> </answer>', 0.0),
])
def test_format_reward(completion, expected):
  assert rewards.format_reward('Q', completion) == expected


def test_format_reward_accepts_think_opened_by_the_prompt():
  assert rewards.format_reward('Assistant: <think>', 'a</think><answer>b</answer>') == 1.0
  assert rewards.format_reward('Assistant:', 'a</think><answer>b</answer>') == 0.0


def test_accuracy_reward():
  assert rewards.accuracy_reward('Q', GOOD, answer='2') == 1.0
  assert rewards.accuracy_reward('Q', GOOD, answer='\\frac{4}{2}') == 1.0
  assert rewards.accuracy_reward('Q', GOOD, answer='3') == 0.0
  assert rewards.accuracy_reward('Q', '<answer>\\boxed{2}\\boxed{3}</answer>', answer='2') == 0.0


def test_language_reward_is_the_share_of_target_script_words():
  # 4 Latin words + 2 Han characters (each a word) -> 4/6 for English, 2/6 for Chinese.
  completion = '<think>we add the numbers 加法</think><answer>3</answer>'
  assert rewards.language_reward('', completion, language='en') == pytest.approx(4 / 6)
  assert rewards.language_reward('', completion, language='zh') == pytest.approx(2 / 6)
  assert rewards.language_reward('', '<think>1 + 2 = 3</think><answer>3</answer>') == 0.0
  assert rewards.language_reward('', '<think>привет мир hello</think>', language='ru') == (
      pytest.approx(2 / 3))
  with pytest.raises(ValueError):
    rewards.language_reward('', GOOD, language='klingon')


@pytest.mark.parametrize('length,expected', [
    (0, 0.0), (80, 0.0), (81, -1 / 20), (90, -10 / 20), (100, -1.0), (101, -1.0), (500, -1.0)])
def test_overlong_reward_matches_dapo(length, expected):
  # L_max = 100, L_cache = 20: zero up to 80, then linear down to -1 at 100, -1 beyond.
  got = rewards.overlong_reward('', 'x', max_len=100, cache_len=20, num_tokens=length)
  assert got == pytest.approx(expected)
  assert rewards.overlong_reward('', 'x' * length, max_len=100, cache_len=20) == (
      pytest.approx(expected))


def test_combined_sum_and_gated():
  summed = rewards.make_reward_fn({'accuracy': 1.0, 'format': 0.5}, mode='sum')
  gated = rewards.make_reward_fn({'accuracy': 1.0}, mode='gated')
  unformatted = 'so \\boxed{2}'
  assert summed('Q', GOOD, answer='2') == 1.5
  assert summed('Q', unformatted, answer='2') == 1.0
  assert gated('Q', GOOD, answer='2') == 1.0
  assert gated('Q', unformatted, answer='2') == 0.0
  with_len = rewards.make_reward_fn({'accuracy': 1.0, 'overlong': 1.0}, mode='gated',
                                    max_len=100, cache_len=20)
  assert with_len('Q', GOOD, answer='2', num_tokens=90) == pytest.approx(0.5)
  with pytest.raises(ValueError):
    rewards.make_reward_fn({'nope': 1.0})
  with pytest.raises(ValueError):
    rewards.make_reward_fn({'accuracy': 1.0}, mode='product')
  with pytest.raises(ValueError):
    rewards.make_reward_fn({'overlong': 1.0})


def test_pool_scores_batches_and_never_raises_on_bad_items():
  fn = rewards.make_reward_fn({'accuracy': 1.0, 'format': 0.5}, mode='sum')
  batch = [{'prompt': 'Q', 'completion': GOOD, 'answer': '2'},
           {'prompt': 'Q', 'completion': GOOD, 'answer': '3'},
           {'prompt': 'Q', 'completion': GOOD},  # missing answer -> TypeError in the reward
           'not a dict',
           {'prompt': 'Q', 'completion': 5},
           {'prompt': 'Q', 'completion': '<answer>\\boxed{9^{9^{9}}}</answer>', 'answer': '2'}]
  with pool_lib.VerifierPool(fn, num_workers=2, item_timeout_s=20) as pool:
    future = pool.submit(batch)
    assert pool.map(batch[:2]) == [1.5, 0.5]
    assert future.result(timeout=60) == [1.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    stats = pool.stats()
  assert stats['error:TypeError'] == 1
  assert stats['bad_item:not_a_dict'] == 1
  assert stats['bad_item:prompt_or_completion'] == 1
  assert stats['ok'] == 5


def test_pool_kills_and_replaces_a_worker_stuck_in_native_code():
  with pool_lib.VerifierPool(pool_helpers.native_hang_reward, num_workers=2,
                             item_timeout_s=1.0) as pool:
    pool.map([{'prompt': '', 'completion': ''}])  # workers are up
    start = time.monotonic()
    batch = [{'prompt': '', 'completion': '', 'hang': i % 3 == 0} for i in range(7)]
    scores = pool.map(batch)
    assert time.monotonic() - start < 15
    assert scores == [0.0 if i % 3 == 0 else 1.0 for i in range(7)]
    assert pool.stats()['timeout'] == 3
    assert pool.compute_seconds() >= 3 * 1.0  # a timed-out item counts its deadline
    assert pool.map([{'prompt': '', 'completion': ''}] * 4) == [1.0] * 4


def test_pool_sums_the_workers_compute_seconds():
  with pool_lib.VerifierPool(pool_helpers.sleep_reward, num_workers=2) as pool:
    pool.map([{'prompt': '', 'completion': ''}] * 2)  # workers are up
    before = pool.compute_seconds()
    start = time.monotonic()
    assert pool.map([{'prompt': '', 'completion': '', 'sleep_s': 0.1}] * 6) == [1.0] * 6
    wall = time.monotonic() - start
    spent = pool.compute_seconds() - before
  assert 0.6 <= spent < 0.6 + 0.3  # what the workers measured, summed over both
  assert wall < spent  # two workers ran them side by side


def test_pool_survives_a_worker_that_dies():
  with pool_lib.VerifierPool(pool_helpers.crash_reward, num_workers=1,
                             item_timeout_s=10.0) as pool:
    batch = [{'prompt': '', 'completion': '', 'crash': c} for c in (False, True, False)]
    assert pool.map(batch) == [1.0, 0.0, 1.0]
    assert pool.stats()['worker_died'] == 1


def test_pool_rejects_unpicklable_reward_and_bad_arguments():
  with pytest.raises(ValueError):
    pool_lib.VerifierPool(lambda p, c: 1.0)
  with pytest.raises(ValueError):
    pool_lib.VerifierPool(pool_helpers.echo_reward, num_workers=0)


def test_pool_zeroes_non_finite_rewards():
  fn = functools.partial(pool_helpers.echo_reward)
  with pool_lib.VerifierPool(fn, num_workers=1) as pool:
    out = pool.map([{'prompt': '', 'completion': '', 'value': v}
                    for v in (0.25, math.nan, math.inf)])
  assert out == [0.25, 0.0, 0.0]

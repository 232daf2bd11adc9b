"""Generated small programming problems scored by running tests in the sandbox.

Each problem comes from a family with random constants ("write f(x) returning
3*x+2"), carries fn-style tests `{'fn': 'f', 'args': [...], 'expected': value}`
computed in this process by a reference implementation, and has a trace whose
<answer> holds the reference solution in a ```python block.

The reward runs the completion's last ```python block inside <answer> through
`r1jax.verify.code.score` (a separate, isolated process); tests never enter the
sandbox as code, comparisons happen in the parent. Malformed completions score 0
without starting the sandbox. The prompt states the function in words and shows
no test, so the reward checks inputs the model never saw. `score_code_completion`
is shared with MBPP files (see `jsonl.MbppTask` for what their prompts show).
"""
from __future__ import annotations

import functools
import string
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from r1jax.tasks import base

_MAX_TRIES = 1000
NUM_TESTS = 4


class Problem(NamedTuple):
  question: str
  think: str
  code: str
  reference: Callable[..., Any]
  draw_args: Callable[[np.random.Generator], list]


def _ints(rng, n, lo=-20, hi=20):
  return [int(v) for v in rng.integers(lo, hi + 1, n)]


def _affine(rng):
  a, b = int(rng.integers(2, 10)), int(rng.integers(-9, 10))
  return Problem(
      f"Write a Python function f(x) that returns {a}*x + {b}.",
      "multiply x, then add", f"def f(x):\n  return {a} * x + {b}",
      lambda x: a * x + b, lambda r: [int(r.integers(-50, 51))])


def _count_div(rng):
  k = int(rng.integers(2, 8))
  return Problem(
      f"Write a Python function f(xs) that returns how many numbers in the list xs "
      f"are divisible by {k}.",
      "count elements with remainder 0",
      f"def f(xs):\n  return sum(1 for x in xs if x % {k} == 0)",
      lambda xs: sum(1 for x in xs if x % k == 0),
      lambda r: [_ints(r, int(r.integers(0, 8)))])


def _max_plus(rng):
  k = int(rng.integers(1, 10))
  return Problem(
      f"Write a Python function f(xs) that returns the largest number in the non-empty "
      f"list xs plus {k}.",
      "take the max, then add", f"def f(xs):\n  return max(xs) + {k}",
      lambda xs: max(xs) + k, lambda r: [_ints(r, int(r.integers(1, 8)))])


def _repeat_reversed(rng):
  k = int(rng.integers(2, 5))
  letters = np.array(list("abcdefgh"))
  return Problem(
      f"Write a Python function f(s) that returns the string s reversed and repeated "
      f"{k} times.",
      "reverse with a slice, then multiply", f"def f(s):\n  return s[::-1] * {k}",
      lambda s: s[::-1] * k,
      lambda r: ["".join(r.choice(letters, int(r.integers(0, 6))).tolist())])


def _clip(rng):
  lo = int(rng.integers(-10, 5))
  hi = lo + int(rng.integers(1, 15))
  return Problem(
      f"Write a Python function f(x) that returns x clamped to the range [{lo}, {hi}].",
      "bound below, then above", f"def f(x):\n  return min(max(x, {lo}), {hi})",
      lambda x: min(max(x, lo), hi), lambda r: [int(r.integers(-30, 31))])


def _sum_multiples(rng):
  k = int(rng.integers(2, 7))
  return Problem(
      f"Write a Python function f(n) that returns the sum of the numbers i with "
      f"0 <= i < n that are multiples of {k}.",
      "loop and add the multiples",
      f"def f(n):\n  return sum(i for i in range(n) if i % {k} == 0)",
      lambda n: sum(i for i in range(n) if i % k == 0), lambda r: [int(r.integers(0, 60))])


FAMILIES = {"affine": _affine, "count_div": _count_div, "max_plus": _max_plus,
            "repeat_reversed": _repeat_reversed, "clip": _clip,
            "sum_multiples": _sum_multiples}


def _verify_code():
  try:
    from r1jax.verify import code as verify_code  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("code rewards need r1jax.verify.code (the sandboxed runner)") from e
  return verify_code


def extract_solution(completion: str) -> str | None:
  """The last ```python block inside a well-formed completion's <answer>, or None."""
  parsed = base.parse_response(completion)
  if parsed is None:
    return None
  code = _verify_code().extract_code(parsed[1])
  return code if code and code.strip() else None


def score_code_completion(completion: str, tests: list[dict],
                          partial_credit: bool = False) -> tuple[float, bool]:
  """(reward, all tests passed) for a completion; (0.0, False) when malformed.

  The reward is 1.0/0.0 (all tests pass or not), or the fraction of tests passed
  with `partial_credit`.
  """
  if not tests:
    raise ValueError("a code problem needs at least one test")
  code = extract_solution(completion)
  if code is None:
    return 0.0, False
  result = _verify_code().score(code, tests, all_or_nothing=not partial_credit)
  return float(result.reward), result.total > 0 and result.passed == result.total


def code_block(code: str) -> str:
  return f"```python\n{code}\n```"


class CodeTask(base.Task):
  """Small generated function-writing problems with fn-style tests.

  Args:
    families: which problem families to draw from (keys of FAMILIES).
    num_tests: tests per problem.
    partial_credit: reward = fraction of tests passed (default: 1.0 only if all pass).
    train_size / test_size / test_fraction / template: as in `ArithmeticTask`;
      the split hash is taken over the problem statement.

  Default GRPO rewards (`default_rewards`): {"accuracy": 1.0}, this task's reward only.
  """

  name = "code"
  default_rewards = {"accuracy": 1.0}

  def __init__(self, families=tuple(FAMILIES), num_tests: int = NUM_TESTS,
               partial_credit: bool = False, train_size: int = 10_000, test_size: int = 500,
               test_fraction: float = 0.2,
               template: str = "compact"):
    super().__init__(template)
    families = tuple(families)
    unknown = [f for f in families if f not in FAMILIES]
    if not families or unknown:
      raise ValueError(f"families must be non-empty and from {sorted(FAMILIES)}, got {families!r}")
    if num_tests < 1:
      raise ValueError(f"num_tests must be >= 1, got {num_tests}")
    if not 0.0 < test_fraction < 1.0:
      raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    self.families = families
    self.num_tests = int(num_tests)
    self.partial_credit = bool(partial_credit)
    self.sizes = {"train": int(train_size), "test": int(test_size)}
    self.test_fraction = float(test_fraction)

  def _generate(self, split: str, rng: np.random.Generator, index: int) -> base.Example:
    for _ in range(_MAX_TRIES):
      family = self.families[int(rng.integers(len(self.families)))]
      p = FAMILIES[family](rng)
      if base.split_bucket(p.question, self.test_fraction) != split:
        continue
      tests = []
      for _ in range(self.num_tests):
        args = p.draw_args(rng)
        tests.append({"fn": "f", "args": args, "expected": p.reference(*args)})
      return base.Example(
          question=p.question, answer=p.code,
          trace=base.format_response(p.think, code_block(p.code)),
          fields={"tests": tests, "family": family}, uid=f"{self.name}/{split}/{index}")
    raise ValueError(f"could not draw a {split} code problem in {_MAX_TRIES} tries; the "
                     f"families {self.families} have too few distinct problems")

  def source(self, split: str, seed: int = 0) -> base.GeneratedSource:
    base.check_split(split)
    return base.GeneratedSource(functools.partial(self._generate, split),
                                self.sizes[split], seed, split)

  def is_correct(self, completion: str, *, tests: list[dict], **unused) -> bool:
    del unused
    return score_code_completion(completion, tests)[1]

  def reward(self, prompt: str, completion: str, *, tests: list[dict], **unused) -> float:
    """`CodeScore.reward` of the sandboxed run; 0.0 for a malformed completion."""
    del prompt, unused
    return score_code_completion(completion, tests, self.partial_credit)[0]

  def pretrain_text(self, example: base.Example) -> str:
    """The reference function definition, e.g. `def f(x):\n  return 3 * x + 2`."""
    return example.answer

  def alphabet(self) -> str:
    chars = self._template_chars() | set(string.printable) - set("\r\x0b\x0c")
    return "".join(sorted(chars))

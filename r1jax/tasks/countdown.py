"""Countdown (the TinyZero task): reach a target with + - * / over the given numbers.

Rule chosen here, as in TinyZero's reward: every given number is used EXACTLY once
(`use_all=False` relaxes it to at most once). Division is exact rational
division: `(5/2)*4` reaches 10. Unary minus, powers, floor division and any name
or call are rejected, so is a number that was not given, a number used too often,
and division by zero.

The reward never evaluates model text: the <answer> must match a character
whitelist (digits, + - * / parentheses, spaces), is parsed with `ast`, and the
tree is walked over `fractions.Fraction` values.

Generation: draw the numbers, enumerate every value the solver can build
(intermediate results must be non-negative integers, so traces read as school
arithmetic), pick a reachable integer target uniformly in [target_min, target_max],
and keep the solver's expression as the trace:

    numbers [3, 44, 52, 1], target 25
    <think>52-44=8;8*3=24;24+1=25</think><answer>(52-44)*3+1</answer>
"""
from __future__ import annotations

import ast
import collections
import fractions
import functools
import re
from collections.abc import Sequence

import numpy as np

from r1jax.tasks import base

_ANSWER_CHARS_RE = re.compile(r"\A[0-9+\-*/() ]+\Z")
_MAX_ANSWER_CHARS = 256
_MAX_TRIES = 1000
_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2, None: 3}


class _Expr:
  """A solver expression: value, text with minimal parentheses, steps for the trace."""
  __slots__ = ("value", "text", "op", "steps")

  def __init__(self, value: int, text: str, op: str | None, steps: tuple[str, ...]):
    self.value, self.text, self.op, self.steps = value, text, op, steps


def _combine(x: _Expr, op: str, y: _Expr) -> _Expr | None:
  """x op y if the result is a non-negative integer, else None."""
  if op == "+":
    v = x.value + y.value
  elif op == "-":
    v = x.value - y.value
  elif op == "*":
    v = x.value * y.value
  else:
    if y.value == 0 or x.value % y.value:
      return None
    v = x.value // y.value
  if v < 0:
    return None
  p = _PRECEDENCE[op]
  left = f"({x.text})" if _PRECEDENCE[x.op] < p else x.text
  right_needs = _PRECEDENCE[y.op] < p or (_PRECEDENCE[y.op] == p and op in "-/")
  right = f"({y.text})" if right_needs else y.text
  step = f"{x.value}{op}{y.value}={v}"
  return _Expr(v, left + op + right, op, x.steps + y.steps + (step,))


def solve_all(numbers: Sequence[int], use_all: bool = True) -> dict[int, _Expr]:
  """Every reachable value -> one expression reaching it (first found, deterministic).

  Recursively combines two of the remaining expressions with each operator in both
  orders. With `use_all`, only expressions that use every number count.
  """
  found: dict[int, _Expr] = {}

  def rec(items: tuple[_Expr, ...]):
    if len(items) == 1 or not use_all:
      for e in items:
        found.setdefault(e.value, e)
    if len(items) == 1:
      return
    for i in range(len(items)):
      for j in range(len(items)):
        if i == j:
          continue
        rest = tuple(items[k] for k in range(len(items)) if k not in (i, j))
        for op in "+-*/":
          if op in "+*" and i > j:
            continue  # commutative: one order is enough
          e = _combine(items[i], op, items[j])
          if e is not None:
            rec(rest + (e,))

  rec(tuple(_Expr(n, str(n), None, ()) for n in numbers))
  return found


def evaluate_answer(text: str) -> tuple[fractions.Fraction, list[int]] | None:
  """(exact value, numbers used) of a whitelisted arithmetic expression, else None.

  None for anything outside digits/+-*/()/spaces, non-binary-arithmetic syntax,
  division by zero, or text longer than 256 characters.
  """
  text = text.strip()
  if not text or len(text) > _MAX_ANSWER_CHARS or not _ANSWER_CHARS_RE.match(text):
    return None
  try:
    tree = ast.parse(text, mode="eval")
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return None
  used: list[int] = []

  def walk(node) -> fractions.Fraction:
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
      left, right = walk(node.left), walk(node.right)
      op = _BINOPS[type(node.op)]
      if op == "+":
        return left + right
      if op == "-":
        return left - right
      if op == "*":
        return left * right
      return left / right  # ZeroDivisionError -> caught below
    if isinstance(node, ast.Constant) and type(node.value) is int:
      used.append(node.value)
      return fractions.Fraction(node.value)
    raise ValueError(f"disallowed syntax {type(node).__name__}")

  try:
    value = walk(tree.body)
  except (ValueError, ZeroDivisionError, RecursionError):
    return None
  return value, used


class CountdownTask(base.Task):
  """Reach `target` from `numbers` with + - * / and parentheses.

  Args:
    num_numbers: (min, max) how many numbers per problem (TinyZero: 3-4).
    number_range: (min, max) inclusive range of each number.
    target_range: (min, max) inclusive range of the target.
    use_all: True = each number exactly once (TinyZero); False = at most once.
    train_size / test_size / test_fraction / template: as in `ArithmeticTask`.

  Default GRPO rewards (`default_rewards`): {"accuracy": 1.0}, this task's reward only.
  """

  name = "countdown"
  default_rewards = {"accuracy": 1.0}

  def __init__(self, num_numbers=(3, 4), number_range=(1, 99), target_range=(1, 100),
               use_all: bool = True, train_size: int = 100_000, test_size: int = 1_000,
               test_fraction: float = 0.1, template: str = "compact"):
    super().__init__(template)
    self.num_numbers = self._pair("num_numbers", num_numbers, 2, 6)
    self.number_range = self._pair("number_range", number_range, 1, 10**6)
    self.target_range = self._pair("target_range", target_range, 0, 10**12)
    if not 0.0 < test_fraction < 1.0:
      raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    self.use_all = bool(use_all)
    self.sizes = {"train": int(train_size), "test": int(test_size)}
    self.test_fraction = float(test_fraction)

  @staticmethod
  def _pair(name, value, lo_bound, hi_bound) -> tuple[int, int]:
    try:
      lo, hi = (int(v) for v in value)
    except (TypeError, ValueError):
      raise ValueError(f"{name} must be a (min, max) pair, got {value!r}") from None
    if not lo_bound <= lo <= hi <= hi_bound:
      raise ValueError(f"{name} must satisfy {lo_bound} <= min <= max <= {hi_bound}, got {value!r}")
    return lo, hi

  @staticmethod
  def question(numbers: Sequence[int], target: int) -> str:
    return f"Using {' '.join(str(n) for n in numbers)} make {target}"

  def make_example(self, numbers: Sequence[int], target: int, uid: str = "") -> base.Example:
    """The example for given numbers and target; ValueError if the solver finds no way."""
    numbers = [int(n) for n in numbers]
    expr = solve_all(numbers, self.use_all).get(int(target))
    if expr is None:
      raise ValueError(f"target {target} is not reachable from {numbers}")
    return base.Example(
        question=self.question(numbers, target), answer=expr.text,
        trace=base.format_response(";".join(expr.steps), expr.text),
        fields={"numbers": numbers, "target": int(target)}, uid=uid)

  def _generate(self, split: str, rng: np.random.Generator, index: int) -> base.Example:
    lo_t, hi_t = self.target_range
    for _ in range(_MAX_TRIES):
      k = int(rng.integers(self.num_numbers[0], self.num_numbers[1] + 1))
      numbers = [int(x) for x in rng.integers(self.number_range[0], self.number_range[1] + 1, k)]
      reachable = sorted(v for v in solve_all(numbers, self.use_all) if lo_t <= v <= hi_t)
      if not reachable:
        continue
      target = reachable[int(rng.integers(len(reachable)))]
      key = f"{sorted(numbers)}->{target}"
      if base.split_bucket(key, self.test_fraction) == split:
        return self.make_example(numbers, target, uid=f"{self.name}/{split}/{index}")
    raise ValueError(f"could not draw a solvable {split} countdown problem in {_MAX_TRIES} tries; "
                     f"widen number_range/target_range")

  def source(self, split: str, seed: int = 0) -> base.GeneratedSource:
    base.check_split(split)
    return base.GeneratedSource(functools.partial(self._generate, split),
                                self.sizes[split], seed, split)

  def check_equation(self, text: str, numbers: Sequence[int], target: int) -> bool:
    """Whether `text` is a valid equation over `numbers` whose exact value is `target`."""
    result = evaluate_answer(text)
    if result is None:
      return False
    value, used = result
    have, want = collections.Counter(used), collections.Counter(int(n) for n in numbers)
    if self.use_all:
      if have != want:
        return False
    elif any(have[n] > want[n] for n in have):
      return False
    return value == fractions.Fraction(int(target))

  def is_correct(self, completion: str, *, numbers: Sequence[int], target: int,
                 **unused) -> bool:
    """Well-formed, and the <answer> equation checks (the gold `answer` is not needed)."""
    del unused
    parsed = base.parse_response(completion)
    return parsed is not None and self.check_equation(parsed[1], numbers, target)

  def pretrain_text(self, example: base.Example) -> str:
    """The solving equation over the given numbers, e.g. `(52-44)*3+1=25`."""
    return f"{example.answer}={example.fields['target']}"

  def alphabet(self) -> str:
    chars = self._template_chars() | set("0123456789+-*/()=; ") | set(self.question([0], 0))
    return "".join(sorted(chars))

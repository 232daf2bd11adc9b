"""Multi-digit arithmetic, generated on the fly: the smallest task with a checkable answer.

Questions look like `47+85`; the gold answer is the exact integer. Difficulty is
the operand digit count, set separately for the train and held-out ('test')
splits, so a demo can train on 2-3 digit problems and test on 4-digit ones.

Traces (for the SFT cold start) work column by column, least significant first,
which is the order a left-to-right model can actually compute in:

    47+85  -> <think>7+5+0=12;4+8+1=13</think><answer>132</answer>
    52-17  -> <think>2-7-0=-5;5-1-1=3</think><answer>35</answer>
    17-52  -> <think>neg;2-7-0=-5;5-1-1=3</think><answer>-35</answer>
    47*85  -> <think>47*5=235;47*80=3760;235+3760=3995</think><answer>3995</answer>

Each addition step is `x+y+carry_in=column_sum`; each subtraction step is
`x-y-borrow_in=value` (a negative value means borrow 1 and write value+10).

Train and test never share a problem: a problem's split is a stable hash of its
text (`base.split_bucket`), and each split's generator rejects the other's problems.
"""
from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence

import numpy as np

from r1jax.tasks import base

OPS = ("+", "-", "*")
_INT_RE = re.compile(r"\A-?\d+\Z")
_QUESTION_RE = re.compile(r"\A(\d+)([-+*])(\d+)\Z")
_MAX_TRIES = 1000


def _unit_hash(key: str) -> float:
  """A stable uniform number in [0, 1) for a string (blake2b, not the salted hash())."""
  return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") / 2.0**64


def _digits_lsb(n: int, width: int) -> list[int]:
  return [(n // 10**k) % 10 for k in range(width)]


def add_trace(a: int, b: int) -> str:
  """Column-wise addition with carries (see module docstring)."""
  width = max(len(str(a)), len(str(b)))
  steps, carry = [], 0
  for x, y in zip(_digits_lsb(a, width), _digits_lsb(b, width)):
    s = x + y + carry
    steps.append(f"{x}+{y}+{carry}={s}")
    carry = s // 10
  return ";".join(steps)


def sub_trace(a: int, b: int) -> str:
  """Column-wise subtraction with borrows; 'neg;' first when a < b (then b - a is computed)."""
  prefix = ""
  if a < b:
    a, b, prefix = b, a, "neg;"
  width = len(str(a))
  steps, borrow = [], 0
  for x, y in zip(_digits_lsb(a, width), _digits_lsb(b, width)):
    v = x - y - borrow
    steps.append(f"{x}-{y}-{borrow}={v}")
    borrow = 1 if v < 0 else 0
  return prefix + ";".join(steps)


def add_working(a: int, b: int) -> str:
  """Plain-text column working of a sum, least significant column first, with no tags:
  `47+85: 7+5=12, 4+8+1=13, so 132` (a carry in shows as `+1`)."""
  width = max(len(str(a)), len(str(b)))
  steps, carry = [], 0
  for x, y in zip(_digits_lsb(a, width), _digits_lsb(b, width)):
    s = x + y + carry
    steps.append(f"{x}+{y}+1={s}" if carry else f"{x}+{y}={s}")
    carry = s // 10
  return f"{a}+{b}: {', '.join(steps)}, so {a + b}"


def compare_question(a: int, b: int) -> str:
  """The OTHER question of the tagged pre-training documents: which of two numbers is larger."""
  return f"larger of {a} and {b}"


def compare_response(a: int, b: int) -> str:
  """Its tagged answer: `<think>47 vs 85</think><answer>85</answer>`."""
  return base.format_response(f"{a} vs {b}", str(max(a, b)))


def mul_trace(a: int, b: int) -> str:
  """Partial products by each digit of b (shifted), then their sum."""
  parts, steps = [], []
  for k, d in enumerate(_digits_lsb(b, len(str(b)))):
    factor = d * 10**k
    parts.append(a * factor)
    steps.append(f"{a}*{factor}={a * factor}")
  if len(parts) > 1:
    steps.append("+".join(str(p) for p in parts) + f"={sum(parts)}")
  return ";".join(steps)


_TRACES = {"+": add_trace, "-": sub_trace, "*": mul_trace}
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _check_digits(name: str, digits) -> tuple[int, int]:
  try:
    lo, hi = (int(d) for d in digits)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a (min, max) pair of digit counts, got {digits!r}") from None
  if not 1 <= lo <= hi <= 18:
    raise ValueError(f"{name} must satisfy 1 <= min <= max <= 18, got {digits!r}")
  return lo, hi


class ArithmeticTask(base.Task):
  """`a op b` with operands of a chosen number of digits.

  Args:
    ops: operators to draw from uniformly, a subset of ('+', '-', '*').
    train_digits / test_digits: (min, max) digits per operand for each split; each
      operand draws its digit count uniformly, then a uniform value with exactly
      that many digits (1 digit includes 0).
    train_size / test_size: length of each split's random-access source.
    test_fraction: share of the problem space reserved for 'test' by hashing.
    template: 'compact' (default), 'r1_zero' or a custom string with '{question}'.
    trace_slip_rate: models an imperfect teacher for the cold-start traces: for this share
      of the sums whose last column carries, the trace's <answer> drops the leading carry
      digit (its <think> columns stay correct). Chosen per problem by a stable hash. Only
      `trace` changes: the gold `answer`, rewards and evaluation always use the true sum.
    pretrain_working: `pretrain_text` of a sum is its plain-text column working
      (`add_working`: no tags, no template) instead of the bare equation; needs ops=('+',).
    pretrain_tag_rate: this share of the pre-training documents (by a stable hash of the
      question) is a dialogue about other content: the task's template around
      `compare_question` (the larger of the two operands), then `compare_response`.
      A base model so knows the <think>/<answer> tokens and that they may follow the
      template, as dialogue-like web text taught real base models, without ever seeing the
      task's own sums in the tagged format.

  Default GRPO rewards (`default_rewards`): {"accuracy": 1.0}, this task's reward only.
  """

  name = "arithmetic"
  default_rewards = {"accuracy": 1.0}

  def __init__(self, ops: Sequence[str] = ("+",), train_digits=(2, 3), test_digits=(4, 4),
               train_size: int = 100_000, test_size: int = 1_000,
               test_fraction: float = 0.1, template: str = "compact",
               trace_slip_rate: float = 0.0, pretrain_working: bool = False,
               pretrain_tag_rate: float = 0.0):
    super().__init__(template)
    if not 0.0 <= pretrain_tag_rate <= 1.0:
      raise ValueError(f"pretrain_tag_rate must be in [0, 1], got {pretrain_tag_rate}")
    if pretrain_working and tuple(ops) != ("+",):
      raise ValueError(f"pretrain_working writes column working for sums only; it needs "
                       f"ops=('+',), got {tuple(ops)!r}")
    self.pretrain_working = bool(pretrain_working)
    self.pretrain_tag_rate = float(pretrain_tag_rate)
    if not 0.0 <= trace_slip_rate <= 1.0:
      raise ValueError(f"trace_slip_rate must be in [0, 1], got {trace_slip_rate}")
    self.trace_slip_rate = float(trace_slip_rate)
    ops = tuple(ops)
    if not ops or any(o not in OPS for o in ops) or len(set(ops)) != len(ops):
      raise ValueError(f"ops must be distinct operators from {OPS}, got {ops!r}")
    if not 0.0 < test_fraction < 1.0:
      raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    self.ops = ops
    self.digits = {"train": _check_digits("train_digits", train_digits),
                   "test": _check_digits("test_digits", test_digits)}
    self.sizes = {"train": int(train_size), "test": int(test_size)}
    self.test_fraction = float(test_fraction)

  def _operand(self, rng: np.random.Generator, split: str) -> int:
    lo, hi = self.digits[split]
    n = int(rng.integers(lo, hi + 1))
    if n == 1:
      return int(rng.integers(0, 10))
    return int(rng.integers(10**(n - 1), 10**n))

  def make_example(self, op: str, a: int, b: int, uid: str = "") -> base.Example:
    """The example for `a op b` (used by the generator and by tests)."""
    if op not in OPS:
      raise ValueError(f"unknown operator {op!r}")
    if a < 0 or b < 0:
      raise ValueError("operands must be non-negative")
    answer = str(_APPLY[op](a, b))
    traced = answer
    final_carry = op == "+" and len(answer) > max(len(str(a)), len(str(b)))
    if final_carry and self.trace_slip_rate > 0 and _unit_hash(f"slip/{a}{op}{b}") < self.trace_slip_rate:
      traced = answer[1:]
    return base.Example(question=f"{a}{op}{b}", answer=answer,
                        trace=base.format_response(_TRACES[op](a, b), traced), uid=uid)

  def _generate(self, split: str, rng: np.random.Generator, index: int) -> base.Example:
    for _ in range(_MAX_TRIES):
      op = self.ops[int(rng.integers(len(self.ops)))]
      a, b = self._operand(rng, split), self._operand(rng, split)
      if base.split_bucket(f"{a}{op}{b}", self.test_fraction) == split:
        return self.make_example(op, a, b, uid=f"{self.name}/{split}/{index}")
    raise ValueError(f"could not draw a {split} problem in {_MAX_TRIES} tries: the problem "
                     f"space for digits {self.digits[split]} is too small")

  def source(self, split: str, seed: int = 0) -> base.GeneratedSource:
    base.check_split(split)
    return base.GeneratedSource(functools.partial(self._generate, split),
                                self.sizes[split], seed, split)

  def is_correct(self, completion: str, *, answer: str, **unused) -> bool:
    """Well-formed and the <answer> is exactly the gold integer (sign, digits only)."""
    del unused
    parsed = base.parse_response(completion)
    if parsed is None:
      return False
    got = parsed[1]
    return bool(_INT_RE.match(got)) and int(got) == int(answer)

  def pretrain_text(self, example: base.Example) -> str:
    """The bare equation, e.g. `47+85=132`; with `pretrain_working` the sum's column
    working; for a `pretrain_tag_rate` share of questions a tagged dialogue about another
    question instead (see the class docstring)."""
    m = _QUESTION_RE.match(example.question)
    if m is None:
      raise ValueError(f"{example.uid or 'example'}: not an arithmetic question: "
                       f"{example.question!r}")
    a, b = int(m.group(1)), int(m.group(3))
    tagged = _unit_hash(f"tag/{example.question}") < self.pretrain_tag_rate
    if tagged:
      return self.template.replace("{question}", compare_question(a, b)) + compare_response(a, b)
    if self.pretrain_working:
      return add_working(a, b)
    return f"{example.question}={example.answer}"

  def alphabet(self) -> str:
    chars = self._template_chars() | set("0123456789+-*=;neg")
    if self.pretrain_working:
      chars |= set(add_working(1, 2))
    if self.pretrain_tag_rate > 0:
      chars |= set(compare_question(1, 2) + compare_response(1, 2))
    return "".join(sorted(chars))

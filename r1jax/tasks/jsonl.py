"""Tasks from local JSONL files: GSM8K-style, MATH-style and MBPP-style records.

Formats (one JSON object per line; blank lines are skipped; extra keys ignored):

  gsm8k  {"question": str, "answer": str}   answer ends with '#### <final>'
         (Cobbe et al. 2021); the gold answer is the text after the last '####'
         with thousands separators removed; calculator annotations <<...>> are
         dropped from the worked solution used as the trace.
  math   {"problem": str, "solution": str}  the gold answer is the content of the
         last \\boxed{...} (Hendrycks et al. 2021), braces matched.
  mbpp   {"text": str, "code": str, "test_list": [str, ...],
          "challenge_test_list": [str, ...] (optional)}  (Austin et al. 2021);
         each test must be `assert name(args) == expected` with literal arguments
         and expected value; it becomes {'fn', 'args', 'expected'} via `ast` and
         `ast.literal_eval` (no code is run). The prompt shows the first
         `num_shown` asserts (default 1), as the MBPP paper's prompt shows its
         tests, but always holds at least one test back; the reward runs every
         test (test_list and challenge_test_list), so the shown ones are a strict
         subset and a lookup table keyed on the shown inputs fails the others.
         When nothing can be shown (a record with one test in all), the prompt
         names the function and its number of arguments instead.

Files are read and validated completely when the task is built, so bad data
stops the run at start-up with `ValueError('<path>:<line>: ...')`. The parsers
take a plain dict, so `tfds_source` reuses them for TFDS records.
"""
from __future__ import annotations

import ast
import functools
import json
import logging
import os
import re
from collections.abc import Callable, Sequence

from r1jax.tasks import base, code_task

_CALC_RE = re.compile(r"<<[^<>]*>>")


def _field(record: dict, key: str, uid: str, kind=str):
  if key not in record:
    raise ValueError(f"{uid}: missing field {key!r} (has {sorted(record)})")
  value = record[key]
  if not isinstance(value, kind):
    raise ValueError(f"{uid}: field {key!r} must be {kind.__name__}, got {type(value).__name__}")
  return value


def parse_gsm8k(record: dict, uid: str) -> base.Example:
  question = _field(record, "question", uid)
  solution = _field(record, "answer", uid)
  if "####" not in solution:
    raise ValueError(f"{uid}: field 'answer' has no '#### <final answer>' line")
  reasoning, final = solution.rsplit("####", 1)
  final = final.strip().replace(",", "")
  if not final:
    raise ValueError(f"{uid}: empty final answer after '####'")
  think = _CALC_RE.sub("", reasoning).strip()
  return base.Example(question=question.strip(), answer=final,
                      trace=base.format_response(think, final), uid=uid)


def last_boxed(text: str) -> str | None:
  """Content of the last \\boxed{...} (nested braces matched), or None."""
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  i = start + len("\\boxed{")
  depth = 1
  for j in range(i, len(text)):
    if text[j] == "{":
      depth += 1
    elif text[j] == "}":
      depth -= 1
      if depth == 0:
        return text[i:j]
  return None


def parse_math(record: dict, uid: str) -> base.Example:
  problem = _field(record, "problem", uid)
  solution = _field(record, "solution", uid)
  gold = last_boxed(solution)
  if gold is None or not gold.strip():
    raise ValueError(f"{uid}: field 'solution' has no complete, non-empty \\boxed{{...}}")
  gold = gold.strip()
  return base.Example(question=problem.strip(), answer=gold,
                      trace=base.format_response(solution.strip(), gold), uid=uid)


def assert_to_test(source: str, uid: str) -> dict:
  """`assert name(a, b) == expected` -> {'fn': name, 'args': [a, b], 'expected': expected}."""
  try:
    tree = ast.parse(source.strip())
  except SyntaxError as e:
    raise ValueError(f"{uid}: test is not valid Python ({e.msg}): {source!r}") from None
  stmt = tree.body[0] if len(tree.body) == 1 else None
  test = stmt.test if isinstance(stmt, ast.Assert) else None
  ok = (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)
        and isinstance(test.left, ast.Call) and isinstance(test.left.func, ast.Name)
        and not test.left.keywords
        and not any(isinstance(a, ast.Starred) for a in test.left.args))
  if not ok:
    raise ValueError(f"{uid}: unsupported test {source!r}; expected "
                     "'assert name(literal, ...) == literal'")
  try:
    args = [ast.literal_eval(a) for a in test.left.args]
    expected = ast.literal_eval(test.comparators[0])
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
    raise ValueError(f"{uid}: test arguments and expected value must be literals: "
                     f"{source!r}") from None
  return {"fn": test.left.func.id, "args": args, "expected": expected}


def _string_list(record: dict, key: str, uid: str, required: bool) -> list[str]:
  if not required and record.get(key) is None:
    return []
  values = _field(record, key, uid, list)
  if (required and not values) or not all(isinstance(t, str) for t in values):
    raise ValueError(f"{uid}: field {key!r} must be a {'non-empty ' if required else ''}"
                     "list of strings")
  return values


def parse_mbpp(record: dict, uid: str, num_shown: int = 1) -> base.Example:
  """An MBPP record; the prompt shows at most `num_shown` asserts, the reward runs all tests."""
  text = _field(record, "text", uid)
  code = _field(record, "code", uid)
  asserts = _string_list(record, "test_list", uid, required=True)
  challenge = _string_list(record, "challenge_test_list", uid, required=False)
  setup = record.get("test_setup_code", "")
  if setup:
    raise ValueError(f"{uid}: non-empty 'test_setup_code' is not supported")
  tests = [assert_to_test(t, uid) for t in asserts + challenge]
  shown = asserts[:max(0, min(num_shown, len(tests) - 1))]  # at least one test held back
  code = code.replace("\r\n", "\n").strip()
  if shown:
    question = text.strip() + "\nYour code should pass these tests:\n" + "\n".join(
        t.strip() for t in shown)
  else:
    n = len(tests[0]["args"])
    question = (text.strip() + f"\nYour code should define a function {tests[0]['fn']} "
                f"taking {n} argument{'' if n == 1 else 's'}.")
  return base.Example(question=question, answer=code,
                      trace=base.format_response("", code_task.code_block(code)),
                      fields={"tests": tests}, uid=uid)


PARSERS: dict[str, Callable[[dict, str], base.Example]] = {
    "gsm8k": parse_gsm8k, "math": parse_math, "mbpp": parse_mbpp}


def read_jsonl(path: str, parse: Callable[[dict, str], base.Example],
               strict: bool = True) -> list[base.Example]:
  """Parse every line of `path`; any problem raises ValueError('<path>:<line>: ...').

  With strict=False, records whose content is rejected (not malformed JSON) are
  skipped and counted in a warning instead.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such file")
  examples, skipped = [], []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      uid = f"{path}:{lineno}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{uid}: invalid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(record, dict):
        raise ValueError(f"{uid}: expected a JSON object, got {type(record).__name__}")
      try:
        examples.append(parse(record, uid))
      except ValueError as e:
        if strict:
          raise
        skipped.append(str(e))
  if skipped:
    logging.warning("%s: skipped %d records, first: %s", path, len(skipped), skipped[0])
  if not examples:
    raise ValueError(f"{path}: no records")
  return examples


def _math_module():
  try:
    from r1jax.verify import math as verify_math  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("math rewards need r1jax.verify.math") from e
  return verify_math


def math_is_correct(completion: str, answer: str) -> bool:
  """Well-formed, and the <answer> states a value equivalent to the gold answer.

  The answer is taken from the <answer> block by `r1jax.verify.math.extract_answer`
  (a \\boxed{} inside it wins, else its text) and compared by `is_equivalent`.
  """
  parsed = base.parse_response(completion)
  if parsed is None or not parsed[1]:
    return False
  verify_math = _math_module()
  return bool(verify_math.is_equivalent(answer, verify_math.extract_answer(completion)))


class JsonlTask(base.Task):
  """Examples from JSONL files of one format, loaded and validated eagerly.

  Args:
    train_path / test_path: JSONL files (at least one).
    strict: raise on the first rejected record (default) or skip such records.
    template: 'r1_zero' (default: these are natural-language problems), 'compact'
      or a custom string with '{question}'.

  Default GRPO rewards (`default_rewards`): {"accuracy": 1.0}, this task's reward only
  (gsm8k, math and mbpp alike).
  """

  fmt = ""
  default_rewards = {"accuracy": 1.0}

  def __init__(self, train_path: str | None = None, test_path: str | None = None,
               strict: bool = True, template: str = "r1_zero"):
    super().__init__(template)
    paths = {"train": train_path, "test": test_path}
    if all(p is None for p in paths.values()):
      raise ValueError(f"task {self.name!r} needs train_path and/or test_path")
    self._data = {s: read_jsonl(p, self._parser(), strict)
                  for s, p in paths.items() if p is not None}

  def _parser(self) -> Callable[[dict, str], base.Example]:
    return PARSERS[self.fmt]

  def source(self, split: str, seed: int = 0) -> Sequence[base.Example]:
    """The loaded examples (file order; the data pipeline shuffles). `seed` is unused."""
    del seed
    base.check_split(split)
    if split not in self._data:
      raise ValueError(f"task {self.name!r} was given no {split}_path")
    return self._data[split]

  def is_correct(self, completion: str, *, answer: str, **unused) -> bool:
    del unused
    return math_is_correct(completion, answer)

  def alphabet(self) -> str:
    """Every character in the loaded files' prompts and traces, plus the template."""
    chars = self._template_chars()
    for examples in self._data.values():
      for ex in examples:
        chars |= set(ex.question) | set(ex.trace or "")
    return "".join(sorted(chars))


class Gsm8kTask(JsonlTask):
  name = "gsm8k"
  fmt = "gsm8k"


class MathTask(JsonlTask):
  name = "math"
  fmt = "math"


class MbppTask(JsonlTask):
  """MBPP-style code problems; reward by the sandboxed tests (see `code_task`).

  The reward is 1.0 iff the completion's code passes every test of the record
  (test_list and challenge_test_list), of which the prompt shows only the first
  `num_shown` asserts and never all: passing the shown examples is not enough.

  Args:
    num_shown: asserts shown in the prompt (at most all tests but one).
    train_path / test_path / strict / template: as in `JsonlTask`.
  """

  name = "mbpp"
  fmt = "mbpp"

  def __init__(self, train_path: str | None = None, test_path: str | None = None,
               strict: bool = True, template: str = "r1_zero", num_shown: int = 1):
    if not isinstance(num_shown, int) or num_shown < 0:
      raise ValueError(f"num_shown must be an int >= 0, got {num_shown!r}")
    self.num_shown = num_shown
    super().__init__(train_path, test_path, strict, template)

  def _parser(self) -> Callable[[dict, str], base.Example]:
    return functools.partial(parse_mbpp, num_shown=self.num_shown)

  def is_correct(self, completion: str, *, tests: list[dict], **unused) -> bool:
    del unused
    return code_task.score_code_completion(completion, tests)[1]

  def reward(self, prompt: str, completion: str, *, tests: list[dict], **unused) -> float:
    del prompt, unused
    return code_task.score_code_completion(completion, tests)[0]


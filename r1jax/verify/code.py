"""Scores model-written Python against unit tests, running it only inside the sandbox.

API:

    extract_code(completion) -> str | None          the last ```python fenced block
    score(code, tests, *, all_or_nothing=False, timeout_s=5.0, memory_mb=512)
        -> CodeScore(passed, total, reward, details)

`tests` is a list of dicts of two kinds (they may be mixed):

  {'stdin': str, 'expected_stdout': str}
      The program runs once per test with that stdin. It passes iff it exits 0 within the time
      limit and its whole stdout equals expected_stdout after normalising line endings, trailing
      whitespace on each line and trailing blank lines (never a prefix, never line-by-line zip).
  {'fn': name, 'args': [...], 'expected': value}
      All fn tests run in one sandboxed process: a harness reads the calls (marshal, so integers
      of any size travel exactly), executes the source (with __name__ = 'solution', so a main guard
      does not run), calls name(*args) (or Solution().name(*args)) for each test and writes each
      return value as JSON on a line tagged with a random nonce, to a descriptor of its own: the
      program's own stdout goes to /dev/null, so nothing it prints (long lines, no trailing
      newline) can run into a record. The parent decodes the JSON itself and compares with exact
      types at every level (5 is not '5', not 5.0, not True; tuples count as lists, as in JSON).

Where the trust lies: the arguments enter the sandbox, the expected values never do. Everything
inside the sandbox (harness included) is assumed compromised: a program may patch builtins,
walk frames, register atexit hooks, exit early or forge output lines. None of it earns credit,
because the only thing trusted is the JSON text the parent reads, compared in the parent with
plain types; a test whose record is missing, duplicated or malformed fails. Objects with a
rigged __eq__ / __bool__, or subclasses of int / str / list, are rejected by the harness's
exact-type serialiser, and even a forged record could only claim a plain value.

Never raises because of the program or what it prints: the parent's reading of the output is
total (forged records nested past the recursion limit, integers longer than any expected one,
odd index digits all count as a failed test), and a sandbox server failure scores the tests it
covers 0 with reason 'sandbox_error'. It raises ValueError for malformed tests and
SandboxUnavailableError when isolation is missing (a set-up problem, not a verdict).

reward = passed / total, or 1.0 / 0.0 when all_or_nothing=True.
"""
from __future__ import annotations

import dataclasses
import json
import marshal
import re
import secrets
from typing import Any

from r1jax.verify import sandbox

_FENCE_RE = re.compile(r'```[ \t]*(?:python3?|py)[ \t]*\n(.*?)```', re.DOTALL | re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class CodeScore:
  """passed of total tests; reward per the scoring rule; one details dict per test, in order."""
  passed: int
  total: int
  reward: float
  details: list[dict]


def extract_code(completion: str) -> str | None:
  """The content of the last complete ```python (or ```py) block, or None."""
  if not isinstance(completion, str):
    raise ValueError(f'completion must be a str, got {type(completion).__name__}')
  blocks = _FENCE_RE.findall(completion)
  return blocks[-1] if blocks else None


def _normalise_output(text: str) -> str:
  lines = text.replace('\r\n', '\n').replace('\r', '\n').split('\n')
  return '\n'.join(line.rstrip() for line in lines).rstrip('\n')


def _plain(value: Any, depth: int = 0) -> Any:
  """Checks `value` is built from exact JSON types and returns it with tuples as lists."""
  if depth > 100:
    raise ValueError('expected value nests too deeply')
  kind = type(value)
  if value is None or kind in (bool, int, str):
    return value
  if kind is float:
    if value != value or value in (float('inf'), float('-inf')):
      raise ValueError('expected value contains a non-finite float')
    return value
  if kind in (list, tuple):
    return [_plain(v, depth + 1) for v in value]
  if kind is dict and all(type(k) is str for k in value):
    return {k: _plain(v, depth + 1) for k, v in value.items()}
  raise ValueError(f'expected values must be JSON-like builtins, got {kind.__name__}')


def strict_equal(expected: Any, got: Any) -> bool:
  """Equality that also requires identical types at every level (True != 1, 5 != 5.0)."""
  if type(expected) is not type(got):
    return False
  if isinstance(expected, list):
    return len(expected) == len(got) and all(strict_equal(e, g) for e, g in zip(expected, got))
  if isinstance(expected, dict):
    return (expected.keys() == got.keys()
            and all(strict_equal(expected[k], got[k]) for k in expected))
  return expected == got


def _validate(tests) -> list[str]:
  if not isinstance(tests, (list, tuple)) or not tests:
    raise ValueError('tests must be a non-empty list of dicts')
  kinds = []
  for i, test in enumerate(tests):
    if not isinstance(test, dict):
      raise ValueError(f'test {i} is not a dict: {test!r:.80}')
    if set(test) == {'stdin', 'expected_stdout'}:
      if not isinstance(test['stdin'], str) or not isinstance(test['expected_stdout'], str):
        raise ValueError(f'test {i}: stdin and expected_stdout must be str')
      kinds.append('stdin')
    elif set(test) == {'fn', 'args', 'expected'}:
      if not isinstance(test['fn'], str) or not test['fn'].isidentifier():
        raise ValueError(f'test {i}: fn must be an identifier, got {test["fn"]!r}')
      if not isinstance(test['args'], (list, tuple)):
        raise ValueError(f'test {i}: args must be a list')
      _plain(test['expected'])
      _plain(list(test['args']))
      kinds.append('fn')
    else:
      raise ValueError(f'test {i} must have keys {{stdin, expected_stdout}} or '
                       f'{{fn, args, expected}}, got {sorted(test)}')
  return kinds


_HARNESS = r'''
import io as _io, json as _json, marshal as _marshal, os as _os, sys as _sys
if hasattr(_sys, 'set_int_max_str_digits'):
  _sys.set_int_max_str_digits(0)  # return values of any size are written out exactly
_calls = _marshal.loads(_sys.stdin.buffer.read())
_sys.stdin = _io.StringIO('')
_emit_fd = _os.dup(1)
_null = _os.open(_os.devnull, _os.O_WRONLY)
_os.dup2(_null, 1)  # the program's own prints never share a stream with the records
_os.close(_null)
_NONCE = %(nonce)r
_dumps, _write, _type = _json.dumps, _os.write, type

def _plain(x, depth=0):
  t = _type(x)
  if depth > 100:
    raise TypeError('nests too deeply')
  if x is None or t is bool or t is int or t is str:
    return x
  if t is float:
    if x != x or x == float('inf') or x == float('-inf'):
      raise TypeError('non-finite float')
    return x
  if t is list or t is tuple:
    return [_plain(v, depth + 1) for v in x]
  if t is dict and all(type(k) is str for k in x):
    return {k: _plain(v, depth + 1) for k, v in x.items()}
  raise TypeError('unsupported return type ' + t.__name__)

def _emit(i, status, payload):
  data = (_NONCE + ' ' + str(i) + ' ' + status + ' ' + _dumps(payload) + '\n').encode()
  while data:
    data = data[_write(_emit_fd, data):]

_ns = {'__name__': 'solution', '__builtins__': __builtins__}
exec(compile(%(source)r, 'solution.py', 'exec'), _ns)
for _i, (_name, _args) in enumerate(_calls):
  try:
    _f = _ns.get(_name)
    if _f is None and isinstance(_ns.get('Solution'), type):
      _f = getattr(_ns['Solution'](), _name)
    _emit(_i, 'ok', _plain(_f(*_args)))
  except Exception as _e:
    _emit(_i, 'error', type(_e).__name__)
'''

_RECORD_RE = re.compile(r'([0-9]{1,9}) (ok|error) (.*)', re.DOTALL)
_STR_DIGITS = 4000  # below the interpreter's int <-> str limit (4300 by default)


class _IntTooLong(ValueError):
  pass


def _int_digits(value: Any) -> int:
  # An upper bound on the decimal digits of the longest integer in a plain expected value.
  if type(value) is int:
    return int(value.bit_length() * 0.30103) + 1
  if isinstance(value, list):
    return max((_int_digits(v) for v in value), default=0)
  if isinstance(value, dict):
    return max((_int_digits(v) for v in value.values()), default=0)
  return 0


def _parse_int(text: str, max_digits: int) -> int:
  # json's parse_int: an integer longer than every expected one cannot match; others of any size
  # are built in pieces (int() refuses long decimal text).
  digits = text.lstrip('-')
  if len(digits) > max(max_digits, 1):
    raise _IntTooLong('integer longer than any expected one')
  if len(digits) <= _STR_DIGITS:
    return int(text)
  value = 0
  for start in range(0, len(digits), _STR_DIGITS):
    chunk = digits[start:start + _STR_DIGITS]
    value = value * 10**len(chunk) + int(chunk)
  return -value if text.startswith('-') else value


def _read_records(stdout: str, nonce: str) -> dict[int, list]:
  records: dict[int, list] = {}
  for line in stdout.split('\n'):
    if not line.startswith(nonce + ' '):
      continue
    match = _RECORD_RE.fullmatch(line, len(nonce) + 1)
    if match:
      records.setdefault(int(match.group(1)), []).append((match.group(2), match.group(3)))
  return records


def _judge(test: dict, recs: list, timed_out: bool) -> dict:
  if len(recs) != 1:
    reason = 'missing' if not recs else 'duplicate_records'
    if not recs and timed_out:
      reason = 'timeout'
    return {'passed': False, 'reason': reason}
  status, payload = recs[0]
  if status != 'ok':
    return {'passed': False, 'reason': 'runtime_error', 'error': payload[:200]}
  expected = _plain(test['expected'])
  max_digits = _int_digits(expected)
  try:
    got = json.loads(payload, parse_constant=_reject_constant,
                     parse_int=lambda text: _parse_int(text, max_digits))
  except _IntTooLong:
    return {'passed': False, 'reason': 'wrong_answer'}
  except (ValueError, RecursionError):  # RecursionError: a forged record nested too deeply
    return {'passed': False, 'reason': 'malformed_record'}
  ok = strict_equal(expected, got)
  return {'passed': ok, 'reason': 'ok' if ok else 'wrong_answer'}


def _run_fn_tests(code: str, fn_tests: list[dict], timeout_s: float, memory_mb: int,
                  run) -> list[dict]:
  nonce = secrets.token_hex(16)
  program = _HARNESS % {'nonce': nonce, 'source': code}
  calls = [[t['fn'], _plain(list(t['args']))] for t in fn_tests]
  try:
    result = run(program, stdin=marshal.dumps(calls), timeout_s=timeout_s, memory_mb=memory_mb)
  except sandbox.SandboxUnavailableError:
    raise
  except RuntimeError as e:
    return [{'passed': False, 'reason': 'sandbox_error', 'error': repr(e)[:200]}
            for _ in fn_tests]
  records = _read_records(result.stdout, nonce)
  details = []
  for i, test in enumerate(fn_tests):
    try:
      details.append(_judge(test, records.get(i, []), result.timed_out))
    except Exception:  # pylint: disable=broad-except  # a verdict, never a crash
      details.append({'passed': False, 'reason': 'malformed_record'})
  return details


def _reject_constant(name: str):
  raise ValueError(f'non-finite JSON constant {name}')


def _run_stdin_test(code: str, test: dict, timeout_s: float, memory_mb: int, run) -> dict:
  try:
    result = run(code, stdin=test['stdin'], timeout_s=timeout_s, memory_mb=memory_mb)
  except sandbox.SandboxUnavailableError:
    raise
  except RuntimeError as e:
    return {'passed': False, 'reason': 'sandbox_error', 'error': repr(e)[:200]}
  if result.timed_out:
    return {'passed': False, 'reason': 'timeout'}
  if result.truncated:
    return {'passed': False, 'reason': 'output_limit'}
  if result.exit_code != 0:
    return {'passed': False, 'reason': 'runtime_error', 'exit_code': result.exit_code,
            'stderr_tail': result.stderr[-300:]}
  ok = _normalise_output(result.stdout) == _normalise_output(test['expected_stdout'])
  return {'passed': ok, 'reason': 'ok' if ok else 'wrong_answer'}


def score(code: str | None, tests: list[dict], *, all_or_nothing: bool = False,
          timeout_s: float = 5.0, memory_mb: int = 512, run=None) -> CodeScore:
  """Runs `code` against `tests` in the sandbox (see the module docstring).

  Args:
    code: the program source; None or blank scores 0 on every test.
    tests: list of stdin-style and/or fn-style test dicts.
    all_or_nothing: reward 1.0 only if every test passes, else 0.0.
    timeout_s: wall-clock limit per sandboxed run (one per stdin test, one for all fn tests).
    memory_mb: address-space limit per process.
    run: the executor (default sandbox.run_python); tests inject fakes here.

  Raises:
    ValueError: malformed tests.
    SandboxUnavailableError: isolation is unavailable (and unsafe execution was not allowed).
  """
  kinds = _validate(tests)
  run = run or sandbox.run_python
  total = len(tests)
  if code is None or not isinstance(code, str) or not code.strip():
    details = [{'passed': False, 'reason': 'no_code'} for _ in tests]
    return CodeScore(0, total, 0.0, details)
  details: list[dict | None] = [None] * total
  fn_index = [i for i, k in enumerate(kinds) if k == 'fn']
  if fn_index:
    fn_details = _run_fn_tests(code, [tests[i] for i in fn_index], timeout_s, memory_mb, run)
    for i, d in zip(fn_index, fn_details):
      details[i] = d
  for i, kind in enumerate(kinds):
    if kind == 'stdin':
      details[i] = _run_stdin_test(code, tests[i], timeout_s, memory_mb, run)
  passed = sum(d['passed'] for d in details)
  if all_or_nothing:
    reward = 1.0 if passed == total else 0.0
  else:
    reward = passed / total
  return CodeScore(passed, total, reward, details)

"""Sandbox mechanics (I/O, limits, refusal without isolation) and code scoring semantics."""
from __future__ import annotations

import shutil

import pytest

from r1jax.verify import code as code_lib
from r1jax.verify import sandbox

needs_bwrap = pytest.mark.skipif(shutil.which('bwrap') is None, reason='bubblewrap missing')


@needs_bwrap
def test_stdin_stdout_stderr_and_exit_code():
  r = sandbox.run_python('import sys\nx = input()\nprint(x[::-1])\nprint("e", file=sys.stderr)\n'
                         'sys.exit(3)', stdin='abc\n', timeout_s=5)
  assert (r.stdout, r.stderr, r.exit_code, r.timed_out) == ('cba\n', 'e\n', 3, False)


@needs_bwrap
def test_large_stdin_is_fed_while_output_is_read():
  data = 'x' * (3 << 20)
  r = sandbox.run_python('import sys\nd = sys.stdin.read()\nprint(len(d))', stdin=data,
                         timeout_s=10)
  assert r.stdout == f'{len(data)}\n'


@needs_bwrap
def test_timeout_output_cap_and_signals():
  r = sandbox.run_python('while True: pass', timeout_s=0.5)
  assert r.timed_out and r.exit_code == -9
  r = sandbox.run_python('print("y" * 5000)', timeout_s=5, max_output_bytes=1000)
  assert r.truncated and len(r.stdout_bytes) == 1000
  r = sandbox.run_python('import os\nos.abort()', timeout_s=5)
  assert r.exit_code == -6 and r.signal == 6


@needs_bwrap
def test_uncaught_exception_gives_traceback_and_exit_1():
  r = sandbox.run_python('raise ValueError("boom")', timeout_s=5)
  assert r.exit_code == 1 and 'ValueError: boom' in r.stderr


def test_invalid_limits_raise():
  with pytest.raises(ValueError):
    sandbox.run_python('print(1)', timeout_s=0)
  with pytest.raises(ValueError):
    sandbox.run_python('print(1)', memory_mb=1)
  with pytest.raises(ValueError):
    sandbox.run_python(b'print(1)')


def test_refuses_without_isolation_unless_opted_in(monkeypatch):
  monkeypatch.setattr(sandbox.shutil, 'which', lambda name: None)
  monkeypatch.delenv('R1JAX_ALLOW_UNSAFE_EXEC', raising=False)
  pool = sandbox.SandboxPool(1)
  with pytest.raises(sandbox.SandboxUnavailableError, match='bubblewrap'):
    sandbox.run_python('print(1)', pool=pool)
  r = sandbox.run_python('print(1)', pool=pool, allow_unsafe=True, timeout_s=10)
  assert r.stdout == '1\n'
  r = sandbox.run_python('while True: pass', pool=pool, allow_unsafe=True, timeout_s=0.5)
  assert r.timed_out


def test_extract_code_takes_last_python_block():
  text = 'a\n```python\nx = 1\n```\nb\n```py\ny = 2\n```\n```\nnot python\n```\n```python\nunclosed'
  assert code_lib.extract_code(text) == 'y = 2\n'
  assert code_lib.extract_code('no code') is None


def test_strict_equal_types():
  assert code_lib.strict_equal(5, 5)
  assert not code_lib.strict_equal(5, '5')
  assert not code_lib.strict_equal(5, 5.0)
  assert not code_lib.strict_equal(1, True)
  assert code_lib.strict_equal([1, [2, 'a']], [1, [2, 'a']])
  assert not code_lib.strict_equal([1, 2], [1, 2, 3])
  assert not code_lib.strict_equal({'a': 1}, {'a': 1.0})


class _FakeResult:
  def __init__(self, stdout, exit_code=0, timed_out=False, truncated=False):
    self.stdout, self.stderr = stdout, ''
    self.exit_code, self.timed_out, self.truncated = exit_code, timed_out, truncated


def test_stdin_output_must_match_whole_after_trailing_whitespace():
  def run(code, stdin, timeout_s, memory_mb):
    return _FakeResult(code)
  tests = [{'stdin': '', 'expected_stdout': '1\n2\n3\n'}]
  assert code_lib.score('1  \n2\t\n3\n\n\n', tests, run=run).reward == 1.0
  assert code_lib.score('1\r\n2\r\n3', tests, run=run).reward == 1.0
  assert code_lib.score('1\n2\n', tests, run=run).reward == 0.0  # a prefix
  assert code_lib.score('1\n2\n3\n4\n', tests, run=run).reward == 0.0  # extra lines
  assert code_lib.score(' 1\n2\n3', tests, run=run).reward == 0.0  # leading space matters


def test_all_or_nothing_and_partial_credit():
  def run(code, stdin, timeout_s, memory_mb):
    return _FakeResult(stdin)
  tests = [{'stdin': 'a', 'expected_stdout': 'a'}, {'stdin': 'b', 'expected_stdout': 'c'},
           {'stdin': 'd', 'expected_stdout': 'd'}, {'stdin': 'e', 'expected_stdout': 'e'}]
  assert code_lib.score('x', tests, run=run).reward == 0.75
  assert code_lib.score('x', tests, run=run, all_or_nothing=True).reward == 0.0
  assert code_lib.score('x', tests[:1], run=run, all_or_nothing=True).reward == 1.0


@pytest.mark.parametrize('tests', [[], 'x', [{'stdin': 'a'}], [{'fn': '1x', 'args': [], 'expected': 1}],
                                   [{'fn': 'f', 'args': [], 'expected': object()}]])
def test_malformed_tests_raise(tests):
  with pytest.raises(ValueError):
    code_lib.score('x = 1', tests)


@needs_bwrap
def test_fn_tests_in_the_sandbox():
  src = ('def add(a, b):\n  return a + b\n'
         'def pair(x):\n  return (x, [x])\n'
         'class Solution:\n  def twice(self, x):\n    return 2 * x\n'
         'if __name__ == "__main__":\n  print(input())\n')
  tests = [{'fn': 'add', 'args': [2, 3], 'expected': 5},
           {'fn': 'add', 'args': [2, 3], 'expected': 5.0},
           {'fn': 'add', 'args': ['a', 'b'], 'expected': 'ab'},
           {'fn': 'pair', 'args': [1], 'expected': [1, [1]]},
           {'fn': 'twice', 'args': [4], 'expected': 8},
           {'fn': 'missing', 'args': [], 'expected': None},
           {'stdin': 'hi', 'expected_stdout': 'hi'}]
  result = code_lib.score(src, tests)
  assert [d['passed'] for d in result.details] == [True, False, True, True, True, False, True]
  assert result.details[5]['reason'] == 'runtime_error'


@needs_bwrap
def test_fn_partial_credit_survives_a_later_hang():
  src = 'def f(x):\n  while x == 2:\n    pass\n  return x'
  tests = [{'fn': 'f', 'args': [1], 'expected': 1}, {'fn': 'f', 'args': [2], 'expected': 2}]
  result = code_lib.score(src, tests, timeout_s=1.0)
  assert [d['reason'] for d in result.details] == ['ok', 'timeout']
  assert result.reward == 0.5


def test_no_code_scores_zero_without_running():
  def run(*a, **k):
    raise AssertionError('must not run')
  result = code_lib.score(None, [{'stdin': '', 'expected_stdout': ''}], run=run)
  assert (result.passed, result.total, result.reward) == (0, 1, 0.0)


@needs_bwrap
@pytest.mark.parametrize('src,args,expected', [
    ('def f():\n  print("y" * 9000)\n  return 1', [], 1),  # a print line longer than the buffer
    ('def f():\n  print("partial", end="", flush=True)\n  return 2', [], 2),  # no newline
    ('def f():\n  import sys\n  sys.stdout.write("no newline at exit")\n  return 3', [], 3),
    ('def f():\n  return 2 ** 20000', [], 2**20000),  # past the int <-> str digit limit
    ('def f(x):\n  return x % 1000003', [10**5000], 10**5000 % 1000003),  # a huge argument
    ('def f(x):\n  return [x, -x]', [3**12000], [3**12000, -3**12000]),
], ids=['long_line', 'no_newline_flushed', 'no_newline_at_exit', 'huge_expected', 'huge_arg',
        'huge_both'])
def test_honest_fn_solutions_get_full_credit(src, args, expected):
  tests = [{'fn': 'f', 'args': args, 'expected': expected}] * 2
  result = code_lib.score(src, tests, timeout_s=10)
  assert result.reward == 1.0, result.details


def _forging_run(payloads):
  """A fake executor whose output is records forged with the harness's nonce."""
  def run(code, stdin, timeout_s, memory_mb):
    nonce = code.split("_NONCE = '", 1)[1].split("'", 1)[0]
    return _FakeResult(''.join(f'{nonce} {p}\n' for p in payloads))
  return run


@pytest.mark.parametrize('payload', [
    '0 ok ' + '[' * 100_000 + ']' * 100_000,  # past the recursion limit of json and compare
    '0 ok ' + '{"a": ' * 5000 + '1' + '}' * 5000,
    '0 ok ' + '9' * 100_000,  # far longer than the expected integer
    '0 ok -' + '9' * 5000,
    '\u00b2 ok 5', '9' * 5000 + ' ok 5', '0 ok NaN', '0 ok "\ud800"', '0 ok \x00', '0 weird 5',
    '0 ok [1, 2', '0 error ' + 'x' * 10_000,
])
def test_forged_records_never_raise(payload):
  tests = [{'fn': 'f', 'args': [], 'expected': [5]}]
  result = code_lib.score('def f(): pass', tests, run=_forging_run([payload]))
  assert result.reward == 0.0 and not result.details[0]['passed']


def test_a_sandbox_failure_is_a_zero_not_an_exception():
  def run(code, stdin, timeout_s, memory_mb):
    raise RuntimeError('sandbox server failed: EOFError()')
  tests = [{'fn': 'f', 'args': [], 'expected': 1}, {'stdin': '', 'expected_stdout': '1'}]
  result = code_lib.score('def f(): return 1', tests, run=run)
  assert [d['reason'] for d in result.details] == ['sandbox_error', 'sandbox_error']
  def unavailable(code, stdin, timeout_s, memory_mb):
    raise sandbox.SandboxUnavailableError('no bwrap')
  with pytest.raises(sandbox.SandboxUnavailableError):
    code_lib.score('def f(): return 1', tests, run=unavailable)

"""Strict symbolic equality of two math answers: math-verify parses, sympy decides exactly.

Used by `r1jax.verify.math` inside a guard process (a hung sympy call must never hang the
caller); call `symbolic_equal` directly only where something else enforces a deadline.

Parsing is math-verify's (LaTeX and plain expressions -> sympy, via latex2sympy2_extended). The
comparison is NOT math-verify's `verify`, which rounds floats (it accepts 0.3333333 for 1/3):

* numbers and expressions: decimals become the exact rationals they spell (0.33 -> 33/100),
  then `simplify(gold - answer) == 0`;
* equations: 'x = 3' against a gold '3' compares the right-hand side; two equations compare
  lhs - rhs up to sign;
* sets, tuples, intervals, matrices: same kind, same size, element by element (sets in any
  order, intervals with the same open/closed ends);
* a gold that is one value against an answer with several values is False (a hedge);
* numbers too large to build (more than _MAX_DIGITS digits, e.g. 9^{9^{9}}) are False.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import re
import select
import signal

import sympy
from sympy.core.relational import Relational

from r1jax.verify import frames

_MAX_DIGITS = 10_000  # refuse expressions whose integers would exceed this many digits
# The grading table (tests/verify/test_math.py) was checked against these parser versions; pin
# them (tests/constraints.txt) so verdicts do not drift silently between environments.
TESTED_VERSIONS = {'math-verify': '0.9.0', 'latex2sympy2_extended': '1.11.0'}


@functools.lru_cache(maxsize=None)
def _warn_untested_versions() -> None:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  for name, tested in TESTED_VERSIONS.items():
    try:
      found = metadata.version(name)
    except metadata.PackageNotFoundError:
      continue
    if found != tested:
      logging.getLogger(__name__).warning(
          '%s %s is installed; the math verdicts were checked with %s', name, found, tested)


@functools.lru_cache(maxsize=4096)
def parse(text: str):
  """math-verify parse of one answer string; returns a sympy object, or the string on failure."""
  import math_verify  # imported lazily: costs ~0.4 s
  _warn_untested_versions()
  logging.getLogger('math_verify').setLevel(logging.ERROR)  # it warns that we time out ourselves
  config = [math_verify.LatexExtractionConfig(), math_verify.ExprExtractionConfig()]
  parsed = math_verify.parse(f'${text}$', extraction_config=config, parsing_timeout=None)
  for item in parsed:
    if not isinstance(item, str):
      return item
  return text


_PLAIN_CHARS_RE = re.compile(r'^[0-9a-zA-Z+\-*/^()., ]+$')
_INNER_FRAC_RE = re.compile(r'\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}')
_INNER_SQRT_RE = re.compile(r'\\sqrt\s*\{([^{}]*)\}')
_NAMES = {c: sympy.Symbol(c) for c in 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'}
_NAMES.update(pi=sympy.pi, sqrt=sympy.sqrt)


@functools.lru_cache(maxsize=4096)
def parse_plain(text: str):
  """Fast parse of plain arithmetic (digits, one-letter symbols, + - * / ^, \\frac, \\sqrt,
  \\pi, \\cdot, parentheses, commas) with sympy's own parser; None when the text is anything
  else. Only a whitelisted alphabet reaches sympy's parser (which evaluates code), and every
  name in it is a one-letter symbol, pi or sqrt."""
  from sympy.parsing import sympy_parser as sp  # pylint: disable=g-import-not-at-top
  s = text
  for pattern, repl in ((_INNER_FRAC_RE, r'((\1)/(\2))'), (_INNER_SQRT_RE, r'sqrt(\1)')):
    while True:
      new = pattern.sub(repl, s)
      if new == s:
        break
      s = new
  s = s.replace('\\pi', ' pi ').replace('\\cdot', '*').replace('\\times', '*')
  s = s.replace('{', '(').replace('}', ')')
  if not _PLAIN_CHARS_RE.match(s) or re.search(r'\.(?!\d)', s) or '**' in s or '//' in s:
    return None
  if any(len(run) > 1 and run not in ('pi', 'sqrt') for run in re.findall(r'[a-zA-Z]+', s)):
    return None
  s = re.sub(r'(\d)\s*(?=[a-zA-Z(])', r'\1*', s)  # 2x -> 2*x (and never 0x10, 1e5, 2j)
  transformations = sp.standard_transformations + (sp.implicit_multiplication, sp.convert_xor)
  try:
    lazy = sp.parse_expr(s, local_dict=dict(_NAMES), transformations=transformations,
                         evaluate=False)
    if _too_big(lazy):
      return lazy
    return sp.parse_expr(s, local_dict=dict(_NAMES), transformations=transformations)
  except Exception:  # anything sympy's parser rejects goes to math-verify instead
    return None


def _log10_size(expr) -> float:
  """A cheap upper estimate of log10 |value| for integer towers and factorials; inf if huge."""
  if isinstance(expr, (sympy.Integer, sympy.Rational)):
    return max(len(str(abs(expr.p))), len(str(expr.q)))
  if isinstance(expr, sympy.Pow):
    base, exp = expr.args
    exp_size = _log10_size(exp)
    base_size = _log10_size(base)
    if exp_size > 15:
      return math.inf if base.is_number and base not in (0, 1, -1) else base_size
    try:
      exp_value = abs(float(exp)) if exp.is_number else 1.0
    except (TypeError, ValueError, OverflowError):
      exp_value = 1.0
    return base_size * max(exp_value, 1.0)
  if isinstance(expr, sympy.factorial):
    n_size = _log10_size(expr.args[0])
    if n_size > 6:
      return math.inf
    n = abs(float(expr.args[0])) if expr.args[0].is_number else 1.0
    return n * max(math.log10(max(n, 1.0)), 1.0)
  if isinstance(expr, sympy.Basic) and expr.args:
    sizes = [_log10_size(a) for a in expr.args]
    return sum(sizes) if isinstance(expr, sympy.Mul) else max(sizes) + 1
  return 1.0


def _too_big(expr) -> bool:
  return isinstance(expr, sympy.Basic) and _log10_size(expr) > _MAX_DIGITS


def _exact(expr):
  """Replaces every Float by the rational its decimal digits spell (0.33 -> 33/100)."""
  if not isinstance(expr, sympy.Basic):
    return expr
  floats = expr.atoms(sympy.Float)
  if not floats:
    return expr
  return expr.xreplace({f: sympy.Rational(sympy.sstr(f, full_prec=False)) for f in floats})


def _scalar_equal(gold, answer) -> bool:
  gold, answer = _exact(gold), _exact(answer)
  if gold == answer:
    return True
  diff = gold - answer
  if diff.is_number:
    zero = diff.is_zero
    if zero is not None:
      return bool(zero)
  return sympy.simplify(diff) == 0


def _single(obj):
  """The one element of a one-element set/tuple, else the object itself."""
  if isinstance(obj, (sympy.FiniteSet, sympy.Tuple, list, tuple)) and len(obj) == 1:
    return list(obj)[0]
  return obj


def _is_multi(obj) -> bool:
  return isinstance(obj, (sympy.FiniteSet, sympy.Tuple, sympy.Interval, sympy.Union,
                          sympy.MatrixBase, list, tuple))


def equal(gold, answer) -> bool:
  """Structural + exact symbolic equality of two parsed answers (see the module docstring)."""
  if isinstance(gold, str) or isinstance(answer, str):
    return isinstance(gold, str) and isinstance(answer, str) and gold == answer
  if _too_big(gold) or _too_big(answer):
    return False
  gold, answer = _single(gold), _single(answer)
  if isinstance(answer, Relational) and not isinstance(gold, Relational):
    if isinstance(answer, sympy.Eq) and isinstance(answer.lhs, sympy.Symbol):
      return equal(gold, answer.rhs)
    return False
  if isinstance(gold, Relational):
    if isinstance(answer, Relational):
      if type(gold) is not type(answer):
        return False
      g, a = gold.lhs - gold.rhs, answer.lhs - answer.rhs
      return _scalar_equal(g, a) or (isinstance(gold, sympy.Eq) and _scalar_equal(g, -a))
    if isinstance(gold, sympy.Eq) and isinstance(gold.lhs, sympy.Symbol):
      return equal(gold.rhs, answer)
    return False
  if _is_multi(gold) or _is_multi(answer):
    return _collection_equal(gold, answer)
  if isinstance(gold, sympy.Expr) and isinstance(answer, sympy.Expr):
    return _scalar_equal(gold, answer)
  return bool(gold == answer)


def _collection_equal(gold, answer) -> bool:
  if isinstance(gold, sympy.MatrixBase) or isinstance(answer, sympy.MatrixBase):
    if not (isinstance(gold, sympy.MatrixBase) and isinstance(answer, sympy.MatrixBase)):
      return False
    if gold.shape != answer.shape:
      return False
    return all(equal(g, a) for g, a in zip(list(gold), list(answer)))
  if isinstance(gold, sympy.Interval) or isinstance(answer, sympy.Interval):
    if not (isinstance(gold, sympy.Interval) and isinstance(answer, sympy.Interval)):
      return False
    return (gold.left_open == answer.left_open and gold.right_open == answer.right_open
            and equal(gold.start, answer.start) and equal(gold.end, answer.end))
  if isinstance(gold, sympy.Union) or isinstance(answer, sympy.Union):
    if not (isinstance(gold, sympy.Union) and isinstance(answer, sympy.Union)):
      return False
    return _unordered_equal(list(gold.args), list(answer.args))
  if isinstance(gold, sympy.FiniteSet) and isinstance(answer, sympy.FiniteSet):
    return _unordered_equal(list(gold), list(answer))
  g_items = list(gold) if _is_multi(gold) else None
  a_items = list(answer) if _is_multi(answer) else None
  if g_items is None or a_items is None or len(g_items) != len(a_items):
    return False
  return all(equal(g, a) for g, a in zip(g_items, a_items))


def _unordered_equal(gold_items: list, answer_items: list) -> bool:
  if len(gold_items) != len(answer_items):
    return False
  remaining = list(answer_items)
  for g in gold_items:
    for i, a in enumerate(remaining):
      if equal(g, a):
        del remaining[i]
        break
    else:
      return False
  return True


def symbolic_equal(gold: str, answer: str) -> bool:
  """Parses both normalised strings and compares them strictly. No deadline of its own.

  Both go through the same parser: parse_plain when both are plain arithmetic, else math-verify.
  """
  plain_gold = parse_plain(gold)
  plain_answer = parse_plain(answer) if plain_gold is not None else None
  if plain_gold is not None and plain_answer is not None:
    return equal(plain_gold, plain_answer)
  return equal(parse(gold), parse(answer))


# ----------------------------------------------------------------------------- guard server
# `python -m r1jax.verify.symbolic` serves comparisons for `r1jax.verify.math`. It keeps one forked,
# warm worker; when a comparison misses its deadline the worker is SIGKILLed (sympy can be stuck
# in C code, where no signal handler runs) and a fresh one is forked from this warm process.


def _worker_loop(req_fd: int, resp_fd: int) -> None:
  while True:
    req = frames.read_frame_or_none(req_fd)
    if req is None:
      os._exit(0)
    try:
      frames.write_frame(resp_fd, {'result': bool(symbolic_equal(req['gold'], req['answer']))})
    except Exception as e:  # a parse/sympy failure is a False verdict, reported
      frames.write_frame(resp_fd, {'result': False, 'error': repr(e)[:300]})


def _fork_worker() -> tuple[int, int, int]:
  req_r, req_w = os.pipe()
  resp_r, resp_w = os.pipe()
  pid = os.fork()
  if pid == 0:
    os.close(req_w), os.close(resp_r)
    try:
      _worker_loop(req_r, resp_w)
    finally:
      os._exit(0)
  os.close(req_r), os.close(resp_w)
  return pid, req_w, resp_r


def serve(in_fd: int = 0, out_fd: int = 1) -> None:
  """Answers {'gold', 'answer', 'timeout_s'} frames with {'result', 'error'?} frames."""
  out_fd = os.dup(out_fd)
  os.dup2(2, 1)  # stray prints from parsing code go to stderr, not into the protocol
  symbolic_equal('x+1', '1+x')  # loads the LaTeX parser before forking
  worker = None
  frames.write_frame(out_fd, {'ready': True})
  while True:
    req = frames.read_frame_or_none(in_fd)
    if req is None:
      return
    if worker is None:
      worker = _fork_worker()
    pid, req_w, resp_r = worker
    ready = []
    try:
      frames.write_frame(req_w, req)
      ready = select.select([resp_r], [], [], float(req['timeout_s']))[0]
      reply = frames.read_frame_or_none(resp_r) if ready else None
    except OSError:
      reply = None
    if reply is None:
      os.kill(pid, signal.SIGKILL)
      os.waitpid(pid, 0)
      os.close(req_w), os.close(resp_r)
      worker = None
      reply = {'result': False, 'error': 'timeout' if not ready else 'worker died'}
    frames.write_frame(out_fd, reply)


if __name__ == '__main__':
  serve()

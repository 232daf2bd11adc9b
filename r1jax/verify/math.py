"""Math answer extraction and strict equivalence, the accuracy reward of DeepSeek-R1's math tasks.

API:

    extract_answer(text) -> str | None
    is_equivalent(gold, answer, *, timeout_s=2.0) -> bool

Extraction priority (first rule that yields something wins):
  1. the region: the content of the last <answer>...</answer> if present, else the text after the
     last </think> if present, else the whole text;
  2. in the region, the outermost \\boxed{...} / \\fbox{...} (nested braces allowed; a box that
     holds nothing but another box is unwrapped). Several boxes that differ are several
     candidates: the result is None (a hedge earns nothing). Equal repeats are fine;
  3. the last GSM8K-style '#### <answer>' line;
  4. what follows the last 'the (final) answer is' phrase or '(Final) Answer:' line label
     (markdown bold allowed, '**Answer:** 5'), to the end of its line/sentence;
  5. the whole region when it came from <answer> tags.
Extraction is linear in the length of the text (one pass for braces, no regex that rescans the
rest of the text from each of many positions), so it needs no deadline of its own; equivalence
has one (below).

Equivalence (`is_equivalent`) normalises both strings (dollar signs, \\left/\\right, spacing
commands, \\dfrac, degrees, percent and currency signs, trailing \\text units, thousands
separators, 'x = ') one LaTeX token at a time ('\\\\' stays a row break, \\leftarrow stays
\\leftarrow), reads a whole number directly before a fraction of digits as a mixed number
(3\\frac{1}{2} is 7/2), then:
  * multiple-choice golds ('B', '(B)') need exactly that one letter; an answer naming another
    choice as well ('(B) or (C)', '(B) (C)') is a hedge;
  * plain numbers (scientific notation included: 1e3 is 1000) and simple fractions compare as
    exact rationals in-process (fast path);
  * words compare as text, case-insensitively ('yes' is not the product e*s*y; 'Yes' is 'yes');
    an answer made of letters with a run of two or more (other than names such as pi, sin, log)
    is a word, so 'xy' against 'yx' is False;
  * a gold that is a bare comma list ('1, 2, 3': all solutions) matches a bare list or a set
    with the same values and multiplicities in any order; tuples '(1, 2)' keep their order;
  * everything else goes to `symbolic.symbolic_equal` (math-verify parsing + exact sympy
    comparison: expressions, equations, tuples, intervals, sets, matrices) in a guard process
    killed at the deadline, so 9^{9^{9}} or a hung simplify returns False instead of hanging.
    The deadline covers the whole comparison, the items of a list together.
Strictness: an empty answer, an answer offering several candidates ('2 or 3', '2, 3' for gold 2)
and a decimal that only approximates an exact value (0.33 for 1/3) are all False. The percent
sign, degree mark and dollar sign are treated as units and dropped (gold 50 matches '50\\%'; 0.5
does not). Answers longer than 2000 characters (after stripping surrounding whitespace) are False.
"""
from __future__ import annotations

import fractions
import functools
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time

from r1jax.verify import frames as symbolic_frames

_LOG = logging.getLogger(__name__)
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SERVER_GRACE_S = 1.0  # how long past the deadline the client waits for the server's own kill

# ----------------------------------------------------------------------------- extraction

_BOX_RE = re.compile(r'\\(?:boxed|fbox)\s*')
_BARE_BOX_RE = re.compile(r'[\w.]+')
_BRACE_RE = re.compile(r'[{}]')
_SPACE_RE = re.compile(r'\s*')
_GSM8K_RE = re.compile(r'^[ \t]*####(.*)$', re.MULTILINE)
_ANSWER_IS_RE = re.compile(r'the\s+(?:final\s+)?answer\s+is\s*:?', re.IGNORECASE)
_ANSWER_LABEL_RE = re.compile(r'^[ \t>#*_]*(?:final[ \t]+)?answer[ \t]*(?:\*\*|__)?[ \t]*:[ \t]*'
                              r'(?:\*\*|__)?', re.IGNORECASE | re.MULTILINE)
_MAX_ANSWER_CHARS = 2000  # no real final answer is longer; parsing one that is is a DoS vector


def _matching_braces(text: str) -> dict[int, int]:
  """Index of each '{' -> index of its '}' (balanced pairs only), in one pass."""
  closing, stack = {}, []
  for match in _BRACE_RE.finditer(text):
    if match.group() == '{':
      stack.append(match.start())
    elif stack:
      closing[stack.pop()] = match.start()
  return closing


def _boxed_contents(text: str) -> list[str]:
  """Contents of the outermost \\boxed{...} / \\fbox{...} in order, balanced braces, in linear time.

  A box nested in another box is part of that box's content, not a candidate of its own; a box
  whose whole content is another box is unwrapped (\\boxed{\\boxed{5}} is 5).
  """
  closing = _matching_braces(text)
  found, covered_until = [], -1
  for match in _BOX_RE.finditer(text):
    if match.start() < covered_until:
      continue
    i = match.end()
    if i < len(text) and text[i] == '{':
      if i not in closing:
        continue
      start, end = i + 1, closing[i]
      covered_until = end
      while True:  # a box that is nothing but another box
        inner = _BOX_RE.match(text, _SPACE_RE.match(text, start).end(), end)
        brace = inner.end() if inner else -1
        if not inner or text[brace:brace + 1] != '{' or brace not in closing:
          break
        if _SPACE_RE.match(text, closing[brace] + 1, end).end() != end:
          break
        start, end = brace + 1, closing[brace]
      found.append(text[start:end].strip())
    elif i < len(text) and text[i].isalnum():  # '\boxed 5'
      found.append(_BARE_BOX_RE.match(text, i).group(0))
  return found


def _answer_region(text: str) -> tuple[str, bool]:
  """The content of the last <answer>...</answer>, else the text after the last </think>."""
  close = text.rfind('</answer>')
  if close >= 0:
    open_ = text.rfind('<answer>', 0, close)
    if open_ >= 0:
      return text[open_ + len('<answer>'):close], True
  return text.rsplit('</think>', 1)[-1], False


def _phrase_answer(region: str) -> str | None:
  """What follows the last 'the (final) answer is' or '(Final) Answer:' line label."""
  ends = [m.end() for m in (_last_match(_ANSWER_IS_RE, region),
                            _last_match(_ANSWER_LABEL_RE, region)) if m is not None]
  if not ends:
    return None
  start = max(ends)
  line_end = region.find('\n', start)
  answer = region[start:] if line_end < 0 else region[start:line_end]
  sentence_end = re.search(r'\.\s', answer + ' ')
  answer = answer[:sentence_end.start()].strip() if sentence_end else answer.strip()
  end = len(answer)
  while True:  # trailing full stops and bold markers, one pass from the end
    while end and answer[end - 1].isspace():
      end -= 1
    if answer.endswith('.', 0, end):
      end -= 1
    elif answer.endswith('**', 0, end):
      end -= 2
    else:
      break
  answer = answer[:end].strip().strip('*').strip().strip('$').strip()
  return answer or None


def _last_match(pattern: re.Pattern, text: str):
  last = None
  for last in pattern.finditer(text):
    pass
  return last


def _same_candidate(a: str, b: str) -> bool:
  if len(a) > _MAX_ANSWER_CHARS or len(b) > _MAX_ANSWER_CHARS:
    return a == b  # too long to be credited anyway; normalising it would only cost time
  return normalize(a) == normalize(b)


def extract_answer(text: str) -> str | None:
  """The final answer of a completion, or None (see the module docstring for the priority).

  Linear in len(text): no step rescans the text from each of many positions.
  """
  if not isinstance(text, str):
    raise ValueError(f'text must be a str, got {type(text).__name__}')
  region, from_tags = _answer_region(text)
  boxes = [b for b in _boxed_contents(region) if b]
  if boxes:
    if any(not _same_candidate(boxes[-1], b) for b in boxes[:-1]):
      return None
    return boxes[-1]
  gsm = _last_match(_GSM8K_RE, region)
  if gsm:
    return gsm.group(1).strip() or None
  said = _phrase_answer(region)
  if said is not None:
    return said
  if from_tags:
    return region.strip() or None
  return None


# ----------------------------------------------------------------------------- normalisation

# One LaTeX token at a time, so a deletion never takes part of another token: '\\' (a row break
# in a matrix or cases) is one token, and so is each control word (\left is not the start of
# \leftarrow).
_FORMAT_TOKEN_RE = re.compile(
    r'\^\s*(?:\{\s*\\circ\s*\}|\\circ(?![A-Za-z]))|\\(?:[A-Za-z]+|.)|[$%°]|\{,\}', re.DOTALL)
_FORMAT_TOKENS = {
    r'\displaystyle': '', r'\textstyle': '', r'\!': '', r'\,': '', r'\;': '', r'\:': '',
    '\\ ': ' ', r'\left': '', r'\right': '', r'\degree': '', r'\%': '', '%': '', '°': '',
    '{,}': '', '$': '', r'\$': '', r'\dfrac': r'\frac', r'\tfrac': r'\frac'}
# A whole number directly before a fraction of digits is a mixed number: 3\frac{1}{2} is 7/2.
_MIXED_RE = re.compile(r'(?<![\w.^_}\\)])(\d{1,100})\s*\\frac\s*(?:\{\s*(\d{1,100})\s*\}|(\d))'
                       r'\s*(?:\{\s*(\d{1,100})\s*\}|(\d))')
_UNIT_RE = re.compile(r'\s*\\(?:text|mbox|mathrm)\s*\{\s*[A-Za-z][A-Za-z\s.]*\}\s*$')
_WRAP_RE = re.compile(r'^\\(?:text|textbf|mathrm|mbox|mathbf)\s*\{(.*)\}$', re.DOTALL)
_THOUSANDS_RE = re.compile(r'^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$')
_LHS_RE = re.compile(r'^[A-Za-z]\s*=\s*(?=\S)')


def _balanced(s: str) -> bool:
  depth = 0
  for ch in s:
    depth += (ch == '{') - (ch == '}')
    if depth < 0:
      return False
  return depth == 0


def _format_token(match: re.Match) -> str:
  token = match.group(0)
  return '' if token.startswith('^') else _FORMAT_TOKENS.get(token, token)


def _mixed_number(match: re.Match) -> str:
  whole = int(match.group(1))
  num, den = int(match.group(2) or match.group(3)), int(match.group(4) or match.group(5))
  if den == 0:
    return match.group(0)
  return rf'\frac{{{whole * den + num}}}{{{den}}}'


def normalize(text: str) -> str:
  """Canonical text of an answer: removes formatting that never changes its value."""
  s = text.strip()
  if s.startswith(r'\(') and s.endswith(r'\)') or s.startswith(r'\[') and s.endswith(r'\]'):
    s = s[2:-2]
  s = _FORMAT_TOKEN_RE.sub(_format_token, s)
  s = re.sub(r'\s+', ' ', s).strip()
  s = _MIXED_RE.sub(_mixed_number, s)
  while True:
    wrapped = _WRAP_RE.match(s)
    if not wrapped or not _balanced(wrapped.group(1)):
      break
    s = wrapped.group(1).strip()
  unit = _UNIT_RE.search(s)
  if unit and unit.start() > 0:
    s = s[:unit.start()].strip()
  s = s.rstrip('.').strip()
  if _THOUSANDS_RE.match(s):
    s = s.replace(',', '')
  return s


_NUMBER_RE = re.compile(r'^[+-]?(\d+\.?\d*|\.\d+)$')
_SCIENTIFIC_RE = re.compile(r'^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d{1,4}$')
_FRAC_RE = re.compile(r'^([+-]?)\\frac\s*(?:\{\s*(\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))$')
_SLASH_RE = re.compile(r'^([+-]?\d+)\s*/\s*(\d+)$')


def _as_rational(s: str) -> fractions.Fraction | None:
  """Exact value of a plain number or simple fraction, or None for anything else."""
  if _NUMBER_RE.match(s) or _SCIENTIFIC_RE.match(s):
    return fractions.Fraction(s)
  m = _FRAC_RE.match(s)
  if m:
    num, den = int(m.group(2) or m.group(3)), int(m.group(4) or m.group(5))
    if den:
      return fractions.Fraction(-num if m.group(1) == '-' else num, den)
    return None
  m = _SLASH_RE.match(s)
  if m and int(m.group(2)):
    return fractions.Fraction(int(m.group(1)), int(m.group(2)))
  return None


_CHOICE_GOLD_RE = re.compile(r'^\(?([A-J])\)?$')
_CHOICE_ANSWER_RE = re.compile(r'^(?:option|choice)?\s*\(?([A-Ja-j])\)?\s*[.:]?$', re.IGNORECASE)
_HEDGE_RE = re.compile(r'(\bor\b|\\lor\b|\\vee\b|\band/or\b|\\text\{\s*or\s*\})')


_CHOICE_WITH_TEXT_RE = re.compile(r'^\(([A-J])\)\s(.*)$', re.DOTALL)
_ANOTHER_CHOICE_RE = re.compile(r'\(\s*[A-Ja-j]\s*\)|(?<![A-Za-z\\])[A-J](?![A-Za-z])')


def _choice_equal(gold_letter: str, answer: str) -> bool:
  """One choice, the gold one: 'B', '(B)', 'Option B', or '(B) <its text>' naming no other."""
  m = _CHOICE_ANSWER_RE.match(answer)
  if m:
    return m.group(1).upper() == gold_letter
  m = _CHOICE_WITH_TEXT_RE.match(answer)
  return bool(m) and m.group(1) == gold_letter and not _ANOTHER_CHOICE_RE.search(m.group(2))


_TEXT_RE = re.compile(r"^[A-Za-z]+(?:[ '\-][A-Za-z]+)*$")
_MATH_WORDS = frozenset({'pi', 'infty', 'inf', 'infinity', 'sqrt', 'sin', 'cos', 'tan', 'cot',
                         'sec', 'csc', 'log', 'ln', 'exp', 'arcsin', 'arccos', 'arctan'})


def _is_text(s: str) -> bool:
  """Words ('yes', 'Monday', 'no solution'), not a product of one-letter symbols."""
  return bool(_TEXT_RE.match(s)) and any(
      len(word) >= 2 and word.lower() not in _MATH_WORDS for word in re.findall(r'[A-Za-z]+', s))


_MAX_LIST_ITEMS = 32


def _top_level_items(s: str) -> list[str]:
  """s split at the commas outside every bracket."""
  items, depth, start = [], 0, 0
  for i, ch in enumerate(s):
    if ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == ',' and depth == 0:
      items.append(s[start:i].strip())
      start = i + 1
  items.append(s[start:].strip())
  return items


def _as_list(s: str, allow_set: bool) -> list[str] | None:
  """Items of a bare comma list ('1, 2, 3'), or of a set '\\{1, 2, 3\\}' if allow_set."""
  if allow_set and s.startswith(r'\{') and s.endswith(r'\}') and _balanced(s[2:-2]):
    items = _top_level_items(s[2:-2])
  else:
    items = _top_level_items(s)
    if len(items) < 2:
      return None
  if len(items) > _MAX_LIST_ITEMS or not all(items):
    return None
  return items


def _same_items(gold_items: list[str], answer_items: list[str], deadline: float) -> bool:
  """The same values with the same multiplicities, in any order."""
  if len(gold_items) != len(answer_items):
    return False
  remaining = [normalize(a) for a in answer_items]
  for g in gold_items:
    g = normalize(g)
    for i, a in enumerate(remaining):
      if _equivalent(g, a, deadline):
        del remaining[i]
        break
    else:
      return False
  return True


# ----------------------------------------------------------------------------- the guard process


class _Guard:
  """Client of one `python -m r1jax.verify.symbolic` server (see symbolic.serve).

  The server kills its worker at the deadline; if the server itself fails to answer shortly
  after, this client kills the server too, so the caller never waits much past timeout_s.
  """

  def __init__(self):
    self._proc = None

  def _start(self):
    self._proc = subprocess.Popen(
        [sys.executable, '-m', 'r1jax.verify.symbolic'], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, cwd=_REPO_ROOT, start_new_session=True)
    ready = select.select([self._proc.stdout], [], [], 60.0)[0]
    if not ready or symbolic_frames.read_frame_or_none(self._proc.stdout.fileno()) is None:
      self.kill()
      raise RuntimeError('the symbolic comparison server did not start')

  def kill(self):
    if self._proc is not None:
      self._proc.kill()
      self._proc.wait()
    self._proc = None

  def compare(self, gold: str, answer: str, timeout_s: float) -> bool:
    if self._proc is None or self._proc.poll() is not None:
      self._start()
    try:
      symbolic_frames.write_frame(self._proc.stdin.fileno(),
                                  {'gold': gold, 'answer': answer, 'timeout_s': timeout_s})
      ready = select.select([self._proc.stdout], [], [], timeout_s + _SERVER_GRACE_S)[0]
      reply = symbolic_frames.read_frame_or_none(self._proc.stdout.fileno()) if ready else None
    except OSError:
      reply = None
    if reply is None:
      _LOG.warning('symbolic server unresponsive; restarting it')
      self.kill()
      return False
    if reply.get('error'):
      _LOG.debug('symbolic comparison of %.80r and %.80r: %s', gold, answer, reply['error'])
    return bool(reply['result'])


class _GuardPool:
  def __init__(self, size: int = 2):
    self._guards = [_Guard() for _ in range(size)]
    self._free = threading.Semaphore(size)
    self._lock = threading.Lock()

  def compare(self, gold: str, answer: str, timeout_s: float) -> bool:
    with self._free:
      with self._lock:
        guard = self._guards.pop()
      try:
        return guard.compare(gold, answer, timeout_s)
      finally:
        with self._lock:
          self._guards.append(guard)


_GUARDS: _GuardPool | None = None
_GUARDS_LOCK = threading.Lock()
_IN_PROCESS = False


def run_symbolic_in_process(enabled: bool) -> None:
  """Skips the guard process (for workers that are themselves killed at a deadline)."""
  global _IN_PROCESS
  _IN_PROCESS = enabled


def _symbolic(gold: str, answer: str, timeout_s: float) -> bool:
  global _GUARDS
  if _IN_PROCESS:
    from r1jax.verify import symbolic
    try:
      return bool(symbolic.symbolic_equal(gold, answer))
    except Exception:  # a parse/sympy failure is a False verdict
      return False
  with _GUARDS_LOCK:
    if _GUARDS is None:
      _GUARDS = _GuardPool()
  return _GUARDS.compare(gold, answer, timeout_s)


# ----------------------------------------------------------------------------- equivalence


def _equivalent(g: str, a: str, deadline: float) -> bool:
  """The verdict on two normalised answers; the symbolic path gets what is left of the deadline."""
  if not a or not g:
    return False
  if _HEDGE_RE.search(a) and not _HEDGE_RE.search(g):
    return False
  choice = _CHOICE_GOLD_RE.match(g)
  if choice:
    return _choice_equal(choice.group(1), a)
  if not _LHS_RE.match(g):
    a = _LHS_RE.sub('', a)
  g_value, a_value = _as_rational(g), _as_rational(a)
  if g_value is not None and a_value is not None:
    return g_value == a_value
  if g == a:
    return True
  if _is_text(g) or _is_text(a):
    return _is_text(g) and _is_text(a) and g.casefold() == a.casefold()
  g_items = _as_list(g, allow_set=False)
  a_items = _as_list(a, allow_set=True) if g_items is not None else None
  if g_items is not None and a_items is not None:
    return _same_items(g_items, a_items, deadline)
  left = deadline - time.monotonic()
  return left > 0 and _symbolic(g, a, left)


@functools.lru_cache(maxsize=65536)
def _cached_equivalent(gold: str, answer: str, timeout_s: float) -> bool:
  return _equivalent(normalize(gold), normalize(answer), time.monotonic() + timeout_s)


def is_equivalent(gold: str, answer: str | None, *, timeout_s: float = 2.0) -> bool:
  """True iff `answer` states exactly the value of `gold` (see the module docstring).

  Args:
    gold: the reference answer (LaTeX or plain text).
    answer: the model's extracted answer; None or empty is False.
    timeout_s: deadline for the symbolic path; a comparison that misses it is False.

  Raises:
    ValueError: gold is not a str, or timeout_s is not positive.
  """
  if not isinstance(gold, str):
    raise ValueError(f'gold must be a str, got {type(gold).__name__}')
  if not timeout_s > 0:
    raise ValueError(f'timeout_s must be > 0, got {timeout_s}')
  if answer is None or not isinstance(answer, str):
    return False
  answer = answer.strip()
  if len(answer) > _MAX_ANSWER_CHARS:  # measured after stripping: padding is not a long answer
    return False
  return _cached_equivalent(gold, answer, float(timeout_s))


def clear_cache() -> None:
  """Forgets memoised verdicts (benchmarks use it to measure uncached throughput)."""
  _cached_equivalent.cache_clear()

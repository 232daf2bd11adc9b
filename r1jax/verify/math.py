"""Math answer extraction and strict equivalence, the accuracy reward of DeepSeek-R1's math tasks.

API:

    extract_answer(text) -> str | None
    is_equivalent(gold, answer, *, timeout_s=2.0) -> bool

Extraction priority (first rule that yields something wins):
  1. the region: the content of the last <answer>...</answer> if present, else the text after the
     last </think> if present, else the whole text;
  2. in the region, \\boxed{...} / \\fbox{...} (nested braces allowed). Several boxes that differ
     are several candidates: the result is None (a hedge earns nothing). Equal repeats are fine;
  3. the last GSM8K-style '#### <answer>' line;
  4. the last 'the (final) answer is <answer>' phrase (to the end of its line/sentence);
  5. the whole region when it came from <answer> tags.

Equivalence (`is_equivalent`) normalises both strings (dollar signs, \\left/\\right, spacing
commands, \\dfrac, degrees, percent signs, trailing \\text units, thousands separators, 'x = '),
then:
  * multiple-choice golds ('B', '(B)') need exactly that one letter;
  * plain numbers and simple fractions compare as exact rationals in-process (fast path);
  * everything else goes to `symbolic.symbolic_equal` (math-verify parsing + exact sympy
    comparison: expressions, equations, tuples, intervals, sets, matrices) in a guard process
    killed at the deadline, so 9^{9^{9}} or a hung simplify returns False instead of hanging.
Strictness: an empty answer, an answer offering several candidates ('2 or 3', '2, 3' for gold 2)
and a decimal that only approximates an exact value (0.33 for 1/3) are all False. The percent
sign and degree mark are treated as units and dropped (gold 50 matches '50\\%'; 0.5 does not).
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

from r1jax.verify import frames as symbolic_frames

_LOG = logging.getLogger(__name__)
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SERVER_GRACE_S = 1.0  # how long past the deadline the client waits for the server's own kill

# ----------------------------------------------------------------------------- extraction

_BOX_RE = re.compile(r'\\(?:boxed|fbox)\s*')
_ANSWER_TAG_RE = re.compile(r'<answer>(.*?)</answer>', re.DOTALL)
_GSM8K_RE = re.compile(r'^\s*####\s*(.+?)\s*$', re.MULTILINE)
_ANSWER_IS_RE = re.compile(r'the\s+(?:final\s+)?answer\s+is\s*:?', re.IGNORECASE)


def _boxed_contents(text: str) -> list[str]:
  """Contents of every \\boxed{...} / \\fbox{...} in order, with balanced braces."""
  found = []
  for match in _BOX_RE.finditer(text):
    i = match.end()
    if i < len(text) and text[i] == '{':
      depth, j = 0, i
      while j < len(text):
        if text[j] == '{':
          depth += 1
        elif text[j] == '}':
          depth -= 1
          if depth == 0:
            break
        j += 1
      if depth == 0:
        found.append(text[i + 1:j].strip())
    elif i < len(text) and text[i].isalnum():  # '\boxed 5'
      found.append(re.match(r'[\w.]+', text[i:]).group(0))
  return found


def extract_answer(text: str) -> str | None:
  """The final answer of a completion, or None (see the module docstring for the priority)."""
  if not isinstance(text, str):
    raise ValueError(f'text must be a str, got {type(text).__name__}')
  tags = _ANSWER_TAG_RE.findall(text)
  if tags:
    region, from_tags = tags[-1], True
  else:
    region, from_tags = text.rsplit('</think>', 1)[-1], False
  boxes = [b for b in _boxed_contents(region) if b]
  if boxes:
    if len({normalize(b) for b in boxes}) > 1:
      return None
    return boxes[-1]
  gsm = _GSM8K_RE.findall(region)
  if gsm:
    return gsm[-1].strip() or None
  said = list(_ANSWER_IS_RE.finditer(region))
  if said:
    answer = region[said[-1].end():].split('\n')[0]
    answer = re.split(r'\.\s', answer + ' ')[0].strip()
    answer = re.sub(r'(\.|\*\*)+\s*$', '', answer).strip().strip('*').strip()
    answer = re.sub(r'^\$+|\$+$', '', answer).strip()
    return answer or None
  if from_tags:
    return region.strip() or None
  return None


# ----------------------------------------------------------------------------- normalisation

_DELETE = (r'\displaystyle', r'\textstyle', r'\!', r'\,', r'\;', r'\:', r'\ ', r'\left', r'\right',
           r'^\circ', r'^{\circ}', '°', r'\degree', r'\%', '%', '{,}', '$')
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


def normalize(text: str) -> str:
  """Canonical text of an answer: removes formatting that never changes its value."""
  s = text.strip()
  if s.startswith(r'\(') and s.endswith(r'\)') or s.startswith(r'\[') and s.endswith(r'\]'):
    s = s[2:-2]
  for token in _DELETE:
    s = s.replace(token, ' ' if token == r'\ ' else '')
  s = s.replace(r'\dfrac', r'\frac').replace(r'\tfrac', r'\frac')
  s = re.sub(r'\s+', ' ', s).strip()
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
_FRAC_RE = re.compile(r'^([+-]?)\\frac\s*(?:\{\s*(\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))$')
_SLASH_RE = re.compile(r'^([+-]?\d+)\s*/\s*(\d+)$')


def _as_rational(s: str) -> fractions.Fraction | None:
  """Exact value of a plain number or simple fraction, or None for anything else."""
  if _NUMBER_RE.match(s):
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


def _choice_equal(gold_letter: str, answer: str) -> bool:
  m = _CHOICE_ANSWER_RE.match(answer) or re.match(r'^\(([A-J])\)\s', answer)
  return bool(m) and m.group(1).upper() == gold_letter


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


@functools.lru_cache(maxsize=65536)
def _cached_equivalent(gold: str, answer: str, timeout_s: float) -> bool:
  g, a = normalize(gold), normalize(answer)
  if not a or not g:
    return False
  choice = _CHOICE_GOLD_RE.match(g)
  if choice:
    return _choice_equal(choice.group(1), a)
  if _HEDGE_RE.search(a) and not _HEDGE_RE.search(g):
    return False
  if not _LHS_RE.match(g):
    a = _LHS_RE.sub('', a)
  g_value, a_value = _as_rational(g), _as_rational(a)
  if g_value is not None and a_value is not None:
    return g_value == a_value
  if g == a:
    return True
  return _symbolic(g, a, timeout_s)


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
  if len(answer) > 2000:  # no real final answer is this long; parsing it is a DoS vector
    return False
  return _cached_equivalent(gold, answer, float(timeout_s))


def clear_cache() -> None:
  """Forgets memoised verdicts (benchmarks use it to measure uncached throughput)."""
  _cached_equivalent.cache_clear()

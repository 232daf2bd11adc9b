"""Rule-based rewards of the DeepSeek-R1 recipe, all with one signature.

    reward_fn(prompt: str, completion: str, **task_fields) -> float

task_fields are the example's fields (e.g. answer=..., tests=..., language=..., num_tokens=...);
each function takes what it needs and ignores the rest.

  accuracy_reward   1.0 iff the extracted final answer is equivalent to `answer`
                    (r1jax.verify.math; DeepSeek-R1 sec. 2.2.2 "accuracy rewards").
  code_reward       passed/total (or all-or-nothing) of `tests` in the sandbox (r1jax.verify.code).
  format_reward     1.0 iff the completion is '<think>...</think>' then '<answer>...</answer>',
                    each tag exactly once, only whitespace around (R1 sec. 2.2.2 "format rewards";
                    the prompt may end with the opening '<think>', which then counts as present).
  language_reward   share of the chain-of-thought words written in the target language's script
                    (R1 sec. 2.3.2: "the proportion of target language words in the CoT").
                    Words are runs of letters; each Han/kana/Hangul character counts as a word.
  overlong_reward   DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): with L = length,
                    L_max = max_len and L_cache = cache_len,
                      0                                  if L <= L_max - L_cache
                      ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
                      -1                                 if L > L_max
                    L is task_fields['num_tokens'] when given, else len(completion) in characters.

`make_reward_fn(weights, mode=..., **options)` combines them:
  mode='sum':   sum_i w_i * r_i.
  mode='gated': the accuracy (or code) term counts only when format_reward == 1 (R1-Zero style:
                a correct answer in a malformed response earns nothing); other terms are summed.
`combine(values, weights, mode)` is that same rule on component values computed elsewhere
(the RL loop takes 'accuracy' from the task's own verifier and the rule-based ones from here).
"""
from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Mapping

from r1jax.verify import code as code_lib
from r1jax.verify import math as math_lib

RewardFn = Callable[..., float]

_FORMAT_RE = re.compile(r'^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$', re.DOTALL)
_TAGS = ('<think>', '</think>', '<answer>', '</answer>')


def _with_opening_think(prompt: str, completion: str) -> str:
  if prompt.rstrip().endswith('<think>') and '<think>' not in completion:
    return '<think>' + completion
  return completion


def format_reward(prompt: str, completion: str, **_) -> float:
  """1.0 for '<think>...</think> <answer>...</answer>' (each tag once, non-empty answer)."""
  completion = _with_opening_think(prompt, completion)
  if any(completion.count(tag) != 1 for tag in _TAGS):
    return 0.0
  match = _FORMAT_RE.match(completion)
  return 1.0 if match and match.group(2).strip() else 0.0


def accuracy_reward(prompt: str, completion: str, *, answer: str, timeout_s: float = 2.0,
                    **_) -> float:
  """1.0 iff extract_answer(completion) is equivalent to the gold `answer`."""
  del prompt
  return float(math_lib.is_equivalent(answer, math_lib.extract_answer(completion),
                                      timeout_s=timeout_s))


def code_reward(prompt: str, completion: str, *, tests: list[dict],
                all_or_nothing: bool = False, timeout_s: float = 5.0, **_) -> float:
  """Sandboxed test score of the last ```python block of the completion."""
  del prompt
  region = completion.rsplit('</think>', 1)[-1]
  result = code_lib.score(code_lib.extract_code(region), tests, all_or_nothing=all_or_nothing,
                          timeout_s=timeout_s)
  return float(result.reward)


_SCRIPTS = {
    'en': {'LATIN'}, 'fr': {'LATIN'}, 'de': {'LATIN'}, 'es': {'LATIN'}, 'it': {'LATIN'},
    'pt': {'LATIN'}, 'nl': {'LATIN'}, 'vi': {'LATIN'}, 'zh': {'CJK'},
    'ja': {'CJK', 'HIRAGANA', 'KATAKANA'}, 'ko': {'HANGUL'}, 'ru': {'CYRILLIC'},
    'uk': {'CYRILLIC'}, 'el': {'GREEK'}, 'ar': {'ARABIC'}, 'he': {'HEBREW'},
    'hi': {'DEVANAGARI'}, 'th': {'THAI'},
}
_PER_CHARACTER = {'CJK', 'HIRAGANA', 'KATAKANA', 'HANGUL', 'THAI'}
_WORD_RE = re.compile(r'[^\W\d_]+')


@functools.lru_cache(maxsize=65536)
def _script(ch: str) -> str:
  name = unicodedata.name(ch, '')
  return name.split(' ')[0] if name else 'UNKNOWN'


def _word_scripts(text: str) -> list[str]:
  """One script name per word: letter runs split where the script changes; CJK per character."""
  scripts = []
  for token in _WORD_RE.findall(text):
    run_script = None
    for ch in token:
      s = _script(ch)
      if s in _PER_CHARACTER:
        scripts.append(s)
        run_script = None
      elif s != run_script:
        scripts.append(s)
        run_script = s
  return scripts


def chain_of_thought(prompt: str, completion: str) -> str:
  """The text inside <think>...</think>, else everything before <answer>."""
  completion = _with_opening_think(prompt, completion)
  match = re.search(r'<think>(.*?)(?:</think>|$)', completion, re.DOTALL)
  if match:
    return match.group(1)
  return completion.split('<answer>', 1)[0]


def language_reward(prompt: str, completion: str, *, language: str = 'en', **_) -> float:
  """Share of chain-of-thought words in the target language's script (0.0 if no words)."""
  if language not in _SCRIPTS:
    raise ValueError(f'unknown language {language!r}; known: {sorted(_SCRIPTS)}')
  scripts = _word_scripts(chain_of_thought(prompt, completion))
  if not scripts:
    return 0.0
  target = _SCRIPTS[language]
  return sum(s in target for s in scripts) / len(scripts)


def overlong_reward(prompt: str, completion: str, *, max_len: int, cache_len: int,
                    num_tokens: int | None = None, **_) -> float:
  """DAPO soft overlong punishment (see the module docstring)."""
  del prompt
  if not 0 < cache_len <= max_len:
    raise ValueError(f'need 0 < cache_len <= max_len, got {cache_len}, {max_len}')
  length = len(completion) if num_tokens is None else int(num_tokens)
  if length <= max_len - cache_len:
    return 0.0
  if length <= max_len:
    return ((max_len - cache_len) - length) / cache_len
  return -1.0


REWARDS: dict[str, RewardFn] = {
    'accuracy': accuracy_reward,
    'code': code_reward,
    'format': format_reward,
    'language': language_reward,
    'overlong': overlong_reward,
}
MODES = ('sum', 'gated')
_GATED = ('accuracy', 'code')


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"mode must be 'sum' or 'gated', got {mode!r}")
  return mode


def needs_gate(weights: Mapping[str, float], mode: str) -> bool:
  """Whether `combine` reads values['format'] as the gate (also when format has no weight)."""
  return mode == 'gated' and any(name in _GATED for name in weights)


def combine(values: Mapping[str, float], weights: Mapping[str, float], mode: str = 'sum') -> float:
  """sum_i weights[i] * values[i]; mode='gated' skips the accuracy/code terms unless
  values['format'] == 1 (their values may then be missing).

  Raises:
    ValueError: an unknown mode. KeyError: a weighted value (or the gate) is missing.
  """
  check_mode(mode)
  gate_open = values['format'] >= 1.0 if needs_gate(weights, mode) else True
  total = 0.0
  for name, weight in weights.items():
    if mode == 'gated' and name in _GATED and not gate_open:
      continue
    total += float(weight) * float(values[name])
  return total


def make_reward_fn(weights: Mapping[str, float], *, mode: str = 'sum',
                   **options) -> RewardFn:
  """A combined reward with the common signature.

  Args:
    weights: reward name (a key of REWARDS) -> weight, e.g. {'accuracy': 1.0, 'format': 0.5}.
    mode: 'sum' or 'gated' (see the module docstring). 'gated' needs 'format' in weights only
      to add its own term; the gate is computed either way.
    **options: keyword arguments bound into every component (e.g. max_len=, cache_len= for
      'overlong'); task_fields passed at call time override them.

  Raises:
    ValueError: an unknown reward name or mode, or an empty weights mapping.
  """
  check_mode(mode)
  if not weights:
    raise ValueError('weights must name at least one reward')
  unknown = set(weights) - set(REWARDS)
  if unknown:
    raise ValueError(f'unknown rewards {sorted(unknown)}; known: {sorted(REWARDS)}')
  if 'overlong' in weights and not {'max_len', 'cache_len'} <= set(options):
    raise ValueError("'overlong' needs max_len= and cache_len= options")
  items = tuple((name, float(w)) for name, w in weights.items())
  return functools.partial(_combined, items, mode, dict(options))


def _combined(items, mode, options, prompt: str, completion: str, **task_fields) -> float:
  fields = {**options, **task_fields}
  weights = dict(items)
  values = {}
  if needs_gate(weights, mode):
    values['format'] = format_reward(prompt, completion)
  for name in weights:
    if name in values or (mode == 'gated' and name in _GATED and values['format'] < 1.0):
      continue  # computed already, or shut by the gate (never run)
    values[name] = REWARDS[name](prompt, completion, **fields)
  return combine(values, weights, mode)

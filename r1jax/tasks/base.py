"""What a task is: examples, the R1 prompt/response format, a reward, a registry.

A task = a data source (random-access, so grain can shuffle and shard it) + a
prompt template + a verifiable reward. Every task speaks the response format of
DeepSeek-R1-Zero (DeepSeek-AI 2025, Table 1):

    <think> reasoning process here </think> <answer> answer here </answer>

`Example.trace` holds a worked response in exactly that format, for the SFT cold
start; `Example.fields` holds what the reward needs besides the gold answer
(numbers and target for Countdown, tests for code).

Rewards here are binary (1.0 correct and well-formed, 0.0 otherwise), like the
rule-based accuracy reward of R1-Zero. The GRPO loop calls this the 'accuracy' component
and may add the rule-based ones of `r1jax.verify.rewards` (format, language, overlong):
the config's `grpo.rewards.<name>` weights, where unset, come from the task's
`default_rewards`.
"""
from __future__ import annotations

import abc
import dataclasses
import hashlib
import importlib
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

SPLITS = ("train", "test")

# DeepSeek-R1 paper, Table 1 (the R1-Zero template), with {question} for "prompt".
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the "
    "Assistant solves it. The assistant first thinks about the reasoning process in "
    "the mind and then provides the user with the answer. The reasoning process and "
    "answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer "
    "here </answer>. User: {question}. Assistant:")
# The same contract in a few characters, for tiny character-level models.
COMPACT_TEMPLATE = "User: {question}\nAssistant:"
TEMPLATES = {"r1_zero": R1_ZERO_TEMPLATE, "compact": COMPACT_TEMPLATE}

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
# Whitespace only outside the two blocks; each tag exactly once, in order.
_RESPONSE_RE = re.compile(
    r"\A\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*\Z", re.DOTALL)
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)


@dataclasses.dataclass(frozen=True)
class Example:
  """One problem.

  Attributes:
    question: the user's question (goes into the template).
    answer: the gold final answer as a string.
    trace: a full response `<think>...</think><answer>...</answer>` or None.
    fields: extra keyword arguments for `Task.reward` (JSON-like values).
    uid: where it came from ('path:line' for files, 'task/split/index' when generated),
      used in error messages.
  """
  question: str
  answer: str
  trace: str | None = None
  fields: dict[str, Any] = dataclasses.field(default_factory=dict)
  uid: str = ""

  def reward_kwargs(self) -> dict[str, Any]:
    """What to pass as `**fields` to `Task.reward` / `Task.is_correct`."""
    return {"answer": self.answer, **self.fields}


def format_response(think: str, answer: str) -> str:
  """The R1 response format (compact: no spaces around the blocks)."""
  return f"{THINK_OPEN}{think}{THINK_CLOSE}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def parse_response(completion: str) -> tuple[str, str] | None:
  """(think, answer) of a well-formed completion, else None.

  Well-formed: `<think>...</think>` then `<answer>...</answer>`, each tag exactly
  once, nothing but whitespace outside the blocks. The answer is stripped.
  """
  if not isinstance(completion, str):
    return None
  if any(completion.count(t) != 1 for t in _TAGS):
    return None
  m = _RESPONSE_RE.match(completion)
  if m is None:
    return None
  return m.group("think"), m.group("answer").strip()


def resolve_template(template: str) -> str:
  """A template name from TEMPLATES, or a custom string with one '{question}'."""
  text = TEMPLATES.get(template, template)
  if text.count("{question}") != 1:
    raise ValueError(f"template must be one of {sorted(TEMPLATES)} or contain '{{question}}' "
                     f"exactly once; got {template[:60]!r}")
  return text


def split_bucket(key: str, test_fraction: float) -> str:
  """'test' or 'train' for a canonical problem string, by a stable hash.

  Generated tasks call this on every candidate problem and reject those that
  belong to the other split, so train and held-out problems can never coincide,
  whatever the difficulty knobs (Python's hash() is salted per process; blake2b is not).
  """
  h = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")
  return "test" if (h / 2.0**64) < test_fraction else "train"


def check_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  return split


class GeneratedSource(Sequence):
  """A random-access view of generated examples: item i depends only on (seed, split, i).

  It has `__len__` and `__getitem__`, which is all `grain.MapDataset.source` needs,
  so shuffling, sharding and checkpointed iteration work as for files.
  """

  def __init__(self, make: Callable[[np.random.Generator, int], Example], size: int,
               seed: int, split: str):
    if size <= 0:
      raise ValueError(f"source size must be positive, got {size}")
    self._make, self._size, self._seed = make, int(size), int(seed)
    self._split_id = SPLITS.index(check_split(split))

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(self._size))]
    index = int(index)
    if index < 0:
      index += self._size
    if not 0 <= index < self._size:
      raise IndexError(f"index {index} out of range for source of size {self._size}")
    rng = np.random.default_rng([self._seed, self._split_id, index])
    return self._make(rng, index)


class Task(abc.ABC):
  """A data source + the R1 prompt template + a verifiable reward."""

  name: str = "task"
  # GRPO reward weights for the components a config leaves unset (grpo.rewards.<name> None);
  # 'accuracy' is `reward` below. Read only: subclasses assign their own dict.
  default_rewards: dict[str, float] = {"accuracy": 1.0}

  def __init__(self, template: str = "compact"):
    self.template = resolve_template(template)

  @abc.abstractmethod
  def source(self, split: str, seed: int = 0) -> Sequence[Example]:
    """A random-access sequence of examples (grain-compatible)."""

  def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
    """The first n examples of `source(split, seed)` (all of them when n is None)."""
    src = self.source(split, seed)
    if n is None:
      n = len(src)
    if n < 0 or n > len(src):
      raise ValueError(f"asked for {n} {split} examples of task {self.name!r}, "
                       f"which has {len(src)}")
    return [src[i] for i in range(n)]

  def prompt(self, example: Example) -> str:
    """The template applied to the question (str.replace: questions may contain braces)."""
    return self.template.replace("{question}", example.question)

  @abc.abstractmethod
  def is_correct(self, completion: str, **fields) -> bool:
    """Whether a completion is well-formed and its answer verifies."""

  def pretrain_text(self, example: Example) -> str:
    """The example as plain text for next-token pre-training: never the example in the
    template or the tags, nor its worked trace (pre-training on it, then GRPO, is the R1-Zero
    recipe). A task may return other content in its place for a share of examples, as
    `ArithmeticTask`'s `pretrain_tag_rate` does."""
    raise NotImplementedError(f"task {self.name!r} has no plain-text form for pre-training "
                              f"(implement {type(self).__name__}.pretrain_text)")

  def reward(self, prompt: str, completion: str, **fields) -> float:
    """Binary accuracy reward: 1.0 if `is_correct`, else 0.0. `prompt` is unused here."""
    del prompt
    return 1.0 if self.is_correct(completion, **fields) else 0.0

  def alphabet(self) -> str | None:
    """Every character prompts and traces can contain (for `CharTokenizer`), or None."""
    return None

  def _template_chars(self) -> set[str]:
    return set(self.template.replace("{question}", "")) | set("".join(_TAGS))


# name -> "module:Class"; modules load lazily so optional dependencies (tfds) stay optional.
_REGISTRY = {
    "arithmetic": "r1jax.tasks.arithmetic:ArithmeticTask",
    "countdown": "r1jax.tasks.countdown:CountdownTask",
    "code": "r1jax.tasks.code_task:CodeTask",
    "gsm8k": "r1jax.tasks.jsonl:Gsm8kTask",
    "math": "r1jax.tasks.jsonl:MathTask",
    "mbpp": "r1jax.tasks.jsonl:MbppTask",
    "tfds": "r1jax.tasks.tfds_source:TfdsTask",
}


def task_names() -> list[str]:
  return sorted(_REGISTRY)


def get_task(name: str, **kwargs) -> Task:
  """Build a registered task, e.g. `get_task('arithmetic', train_digits=(2, 3))`."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown task {name!r}; registered: {task_names()}")
  module, cls_name = _REGISTRY[name].split(":")
  cls = getattr(importlib.import_module(module), cls_name)
  params = inspect.signature(cls.__init__).parameters
  unknown = sorted(set(kwargs) - set(params) - {"self"})
  if unknown:
    known = sorted(set(params) - {"self"})
    raise ValueError(f"task {name!r} has no option(s) {unknown}; its options: {known}")
  return cls(**kwargs)

"""TFDS without TensorFlow: a builder for our JSONL formats, and any TFDS dataset by name.

Two entry points:

  prepare_jsonl(name, fmt, files, data_dir)  parses GSM8K/MATH/MBPP-style JSONL
      with the `jsonl` parsers (so bad data fails here, naming file and line) and
      writes a TFDS dataset in array_record format; returns its data sources.
  from_tfds(name, split, field_map, ...)     reads any prepared TFDS dataset with
      `tfds.data_source` (random access, grain-compatible) and maps its features to
      `Example`s.

Only array_record works without TensorFlow: TFDS's tfrecord format and
`as_dataset()` need TF, `as_data_source()` does not. Downloads are off by default
(`download=False`): a missing dataset is an error, not a surprise fetch.

`TfdsTask` wraps either in the task interface (registry name 'tfds').
"""
from __future__ import annotations

import ast
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds

from r1jax.tasks import base, code_task, jsonl

# Stored features of a prepared JSONL dataset; `fields` is a Python literal (repr),
# which keeps tuples as tuples (code tests compare exact types; JSON would not).
_STORED = ("question", "answer", "trace", "fields", "uid")
_NAME_RE = re.compile(r"\A[a-z0-9_]+\Z")
RECORD_FORMATS = ("example", "gsm8k", "math", "mbpp")


def _sha256(paths: Sequence[str]) -> str:
  h = hashlib.sha256()
  for p in paths:
    with open(p, "rb") as f:
      h.update(f.read())
  return h.hexdigest()


class R1jaxJsonl(tfds.core.GeneratorBasedBuilder):
  """Normalised examples from one JSONL format; one builder config per prepared name."""

  VERSION = tfds.core.Version("1.0.0")
  # No checksums or metadata files beside this module. Setting this also avoids a
  # lookup that imports `importlib_resources`, which tensorflow-datasets 4.9.10
  # uses without declaring it as a dependency.
  code_path = None

  def __init__(self, *, name: str, fmt: str, files: Mapping[str, str], **kwargs):
    self._fmt, self._files = fmt, dict(files)
    self.input_sha256 = _sha256([self._files[s] for s in sorted(self._files)])
    super().__init__(config=tfds.core.BuilderConfig(name=name, description=f"{fmt} JSONL"),
                     **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self, description="r1jax examples parsed from JSONL",
        features=tfds.features.FeaturesDict({k: text for k in _STORED}),
        metadata=tfds.core.MetadataDict(format=self._fmt, input_sha256=self.input_sha256),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(path) for split, path in self._files.items()}

  def _generate_examples(self, path):
    for i, ex in enumerate(jsonl.read_jsonl(path, jsonl.PARSERS[self._fmt])):
      yield i, {"question": ex.question, "answer": ex.answer, "trace": ex.trace or "",
                "fields": repr(ex.fields), "uid": ex.uid}


def prepare_jsonl(name: str, fmt: str, files: Mapping[str, str], data_dir: str
                  ) -> dict[str, Sequence[dict]]:
  """Parse JSONL files and write them as an array_record TFDS dataset.

  Args:
    name: dataset config name ([a-z0-9_]+); it lands in data_dir/r1jax_jsonl/<name>/1.0.0.
    fmt: 'gsm8k', 'math' or 'mbpp'.
    files: split name -> JSONL path.
    data_dir: TFDS data directory.

  Returns:
    split -> random-access data source of raw records (see `from_tfds`).

  Raises ValueError for bad data (naming file and line), and when `name` was
  already prepared from different files (delete that directory or pick a new name).
  """
  if not _NAME_RE.match(name):
    raise ValueError(f"dataset name must match [a-z0-9_]+, got {name!r}")
  if fmt not in jsonl.PARSERS:
    raise ValueError(f"unknown JSONL format {fmt!r}; expected one of {sorted(jsonl.PARSERS)}")
  if not files:
    raise ValueError("files must map at least one split to a JSONL path")
  for split, path in files.items():
    base.check_split(split)
    if not os.path.isfile(path):
      raise ValueError(f"{path}: no such file")
  builder = R1jaxJsonl(name=name, fmt=fmt, files=files, data_dir=data_dir,
                       file_format="array_record")
  if builder.is_prepared():
    stored = builder.info.metadata or {}
    if stored.get("input_sha256") != builder.input_sha256 or stored.get("format") != fmt:
      raise ValueError(f"{builder.data_dir} was prepared from other files or format; "
                       "delete it or choose another name")
  else:
    builder.download_and_prepare()
  return builder.as_data_source()


def _text(value) -> Any:
  return value.decode("utf-8") if isinstance(value, bytes) else value


def _plain(value) -> Any:
  """Numpy scalars/arrays from TFDS -> Python values (bytes -> str)."""
  if hasattr(value, "tolist"):
    value = value.tolist()
  if isinstance(value, list):
    return [_plain(v) for v in value]
  return _text(value)


class TfdsSource(Sequence):
  """Random-access `Example`s over a TFDS data source (decoding happens per item)."""

  def __init__(self, records: Sequence[dict], field_map: Mapping[str, str], record_format: str,
               name: str):
    self._records, self._map = records, dict(field_map)
    self._format, self._name = record_format, name

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    record = self._records[index]
    uid = f"{self._name}[{index}]"
    missing = [k for k in self._map.values() if k not in record]
    if missing:
      raise ValueError(f"{uid}: record has no feature(s) {missing}; it has {sorted(record)}")
    mapped = {ours: _plain(record[theirs]) for ours, theirs in self._map.items()}
    if self._format == "example":
      fields = mapped.get("fields", "{}")
      return base.Example(question=mapped["question"], answer=mapped["answer"],
                          trace=mapped.get("trace") or None,
                          fields=ast.literal_eval(fields) if isinstance(fields, str) else fields,
                          uid=mapped.get("uid") or uid)
    return jsonl.PARSERS[self._format](mapped, uid)


def from_tfds(name: str, split: str, field_map: Mapping[str, str] | None = None, *,
              record_format: str = "example", data_dir: str | None = None,
              download: bool = False) -> TfdsSource:
  """Any TFDS dataset as a random-access sequence of `Example`s.

  Args:
    name: TFDS name, e.g. 'r1jax_jsonl/my_gsm8k' or a catalog dataset.
    split: the TFDS split to read (e.g. 'train', 'test[:100]').
    field_map: our key -> the dataset's feature name. For record_format 'example'
      our keys are question, answer and optionally trace, fields, uid (identity by
      default); for 'gsm8k'/'math'/'mbpp' they are that format's JSONL keys, and the
      mapped record goes through the same parser as a JSONL line.
    record_format: 'example', 'gsm8k', 'math' or 'mbpp'.
    data_dir: TFDS data directory.
    download: allow TFDS to download and prepare (off: no network surprises).

  The first record is parsed here, so a wrong field map fails at start-up.
  """
  if record_format not in RECORD_FORMATS:
    raise ValueError(f"record_format must be one of {RECORD_FORMATS}, got {record_format!r}")
  if field_map is None:
    if record_format != "example":
      raise ValueError(f"record_format {record_format!r} needs a field_map")
    field_map = {k: k for k in _STORED}
  if record_format == "example" and not {"question", "answer"} <= set(field_map):
    raise ValueError(f"field_map must map 'question' and 'answer', got {sorted(field_map)}")
  records = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
  source = TfdsSource(records, field_map, record_format, f"{name}/{split}")
  if len(source) == 0:
    raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty")
  source[0]  # pylint: disable=pointless-statement  (validates the field map now)
  return source


class TfdsTask(base.Task):
  """A task whose examples come from TFDS.

  Args:
    dataset: TFDS dataset name (see `from_tfds`).
    splits: our split -> TFDS split, e.g. {'train': 'train', 'test': 'test[:500]'}.
    field_map / record_format / data_dir / download: as in `from_tfds`.
    reward: 'math' (equivalence of the <answer>) or 'code' (sandboxed tests in
      fields['tests']); by default 'code' when the first example has tests, else 'math'.
    template: as for JSONL tasks.

  Default GRPO rewards (`default_rewards`): {"accuracy": 1.0}, this task's reward only.
  """

  name = "tfds"
  default_rewards = {"accuracy": 1.0}

  def __init__(self, dataset: str, splits: Mapping[str, str] | None = None,
               field_map: Mapping[str, str] | None = None, record_format: str = "example",
               data_dir: str | None = None, download: bool = False,
               reward: str | None = None, template: str = "r1_zero"):
    super().__init__(template)
    splits = dict(splits or {"train": "train", "test": "test"})
    if reward not in (None, "math", "code"):
      raise ValueError(f"reward must be 'math' or 'code', got {reward!r}")
    self.dataset = dataset
    self._sources = {base.check_split(ours): from_tfds(
        dataset, theirs, field_map, record_format=record_format, data_dir=data_dir,
        download=download) for ours, theirs in splits.items()}
    if reward is None:  # code when the examples carry tests (mbpp), else math
      first = next(iter(self._sources.values()))[0]
      reward = "code" if "tests" in first.fields else "math"
    self.reward_kind = reward

  def source(self, split: str, seed: int = 0) -> Sequence[base.Example]:
    del seed
    base.check_split(split)
    if split not in self._sources:
      raise ValueError(f"TFDS task {self.dataset!r} has no {split!r} split configured")
    return self._sources[split]

  def is_correct(self, completion: str, *, answer: str = "", tests=None, **unused) -> bool:
    del unused
    if self.reward_kind == "code":
      return code_task.score_code_completion(completion, tests or [])[1]
    return jsonl.math_is_correct(completion, answer)

  def reward(self, prompt: str, completion: str, *, answer: str = "", tests=None,
             **unused) -> float:
    del prompt, unused
    if self.reward_kind == "code":
      return code_task.score_code_completion(completion, tests or [])[0]
    return 1.0 if jsonl.math_is_correct(completion, answer) else 0.0

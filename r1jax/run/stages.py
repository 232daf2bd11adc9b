"""Stage bookkeeping of a multi-stage run: workdir/stages.json, keyed on the config.

A multi-stage mode (the pipeline, the R1-Zero pipeline) declares its stages once, in order:

  PLAN = (stages.Stage("sft", fields=("seed", "task", "model", "sft"), run_dir="sft"),
          stages.Stage("eval_sft", fields=("seed", "task", "model", "eval"), after=("sft",),
                       run_dir="eval_sft"), ...)

`fields` are the config paths (a section such as "sft" or one leaf such as "eval.k") whose
values the stage reads, `after` the earlier stages whose outputs it uses. A stage's
fingerprint hashes the values of its fields and the fingerprints of the stages it comes
after, so it is computed from the config alone, before anything runs, and a change anywhere
upstream reaches every stage that depends on it (and no other: an eval setting never
retrains GRPO). Then

  book = stages.Book(workdir, cfg, PLAN)   # compares with stages.json, invalidates (prints why)
  result = book.result("eval_sft")         # the recorded result under this config, or None
  book.start("grpo")                       # before the stage writes anything
  book.finish("grpo", info)                # its result (JSON-able), saved at once

A stage recorded under another fingerprint (or under none: a workdir from before the
fingerprints) is stale: the Book prints the stage and the field that changed, drops its
record, and moves its run directory (checkpoints, metrics, TensorBoard events) to
`<run_dir>.stale` (replacing an older one), so a recomputed training stage starts from
scratch instead of resuming another config's checkpoint. A stage whose fingerprint matches
is reused: resumed if it was running, its result returned if it finished.

Fields that never change what a stage computes are left out of every fingerprint
(NEUTRAL_FIELDS, matched on the last part of a path):
  checkpoint_every, max_to_keep   how often state is saved and how much is kept; a resumed
                                  run equals an uninterrupted one (tests/test_rl.py, test_sft.py)
  reward_workers                  where rewards are computed (in-process or a pool), not which
The top-level fields `mode`, `mesh`, `rollout_mesh` and `rollout_mesh_devices` belong to no
stage's fields: they say which stages run and where the work is laid out, not what it
computes (sharded runs equal unsharded ones, tests/test_sharding.py, test_meshes.py).
Everything else a stage names counts, including fields that change only speed or memory in
principle (eval.batch_size moves the sampling keys, logprob_chunk the reduction order):
recomputing is always safe, reusing a wrong result is not.

Plain Python and ml_collections only (no JAX), so the rule is testable on its own.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any, Mapping, Optional, Sequence

import ml_collections

from r1jax.train import metrics as metrics_lib

STAGES_FILE = "stages.json"
FORMAT_VERSION = 2
NEUTRAL_FIELDS = frozenset(("checkpoint_every", "max_to_keep", "reward_workers"))
STALE_SUFFIX = ".stale"


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of a plan: its name (the key in stages.json), the config paths it reads, the
  earlier stages it uses, and the workdir subdirectory it writes (None: it writes none)."""
  name: str
  fields: tuple[str, ...]
  after: tuple[str, ...] = ()
  run_dir: Optional[str] = None


def _jsonable(value):
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return repr(value)


def _flatten(prefix: str, value, out: dict) -> None:
  if isinstance(value, Mapping):
    for k in sorted(value):
      _flatten(f"{prefix}.{k}", value[k], out)
  elif prefix.rsplit(".", 1)[-1] not in NEUTRAL_FIELDS:
    out[prefix] = value


def config_fields(cfg, paths: Sequence[str]) -> dict:
  """{dotted path: value} of every leaf under `paths` in cfg, NEUTRAL_FIELDS left out; values
  as JSON reads them back (tuples become lists), so they compare with a stored record."""
  out = {}
  for path in paths:
    node = cfg
    for part in path.split("."):
      if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or part not in node:
        raise ValueError(f"stage field {path!r}: the config has no field {path!r}")
      node = node[part]
    _flatten(path, _jsonable(node), out)
  return json.loads(json.dumps(out))


def fingerprints(cfg, plan: Sequence[Stage]) -> dict[str, dict]:
  """{stage name: {"fingerprint", "fields", "after"}} of every stage of `plan` under cfg.

  "after" maps each stage it comes after to that stage's fingerprint. A stage may only
  come after an earlier one of the plan (ValueError otherwise)."""
  out = {}
  for stage in plan:
    if stage.name in out:
      raise ValueError(f"stage {stage.name!r} appears twice in the plan")
    unknown = [a for a in stage.after if a not in out]
    if unknown:
      raise ValueError(f"stage {stage.name!r} comes after {unknown}, which are not earlier "
                       f"stages of the plan")
    fields = config_fields(cfg, stage.fields)
    after = {a: out[a]["fingerprint"] for a in stage.after}
    blob = json.dumps({"fields": fields, "after": after}, sort_keys=True)
    out[stage.name] = {"fingerprint": hashlib.sha256(blob.encode()).hexdigest()[:16],
                       "fields": fields, "after": after}
  return out


def _describe(value) -> str:
  return "(absent)" if value is _MISSING else json.dumps(value)


_MISSING = object()


def why_stale(record: Optional[Mapping], current: Mapping, stale_before: Mapping[str, str]
              ) -> Optional[str]:
  """Why a stored stage record does not hold under the current fingerprint (None: it holds).

  record: the stage's entry in stages.json (None: no entry); current: its entry of
  `fingerprints`; stale_before: {stage: reason} of the earlier stages already found stale."""
  if record is None:
    return None
  if "fingerprint" not in record:
    return "recorded without a config fingerprint"
  if record["fingerprint"] == current["fingerprint"]:
    return None
  old, new = record.get("fields", {}), current["fields"]
  changed = [f"{k} {_describe(old.get(k, _MISSING))} -> {_describe(new.get(k, _MISSING))}"
             for k in sorted(set(old) | set(new)) if old.get(k, _MISSING) != new.get(k, _MISSING)]
  if changed:
    return "config changed: " + ", ".join(changed)
  upstream = [a for a in current["after"] if a in stale_before
              or record.get("after", {}).get(a) != current["after"][a]]
  return f"it comes after {', '.join(upstream)}, which changed" if upstream else \
      "its fingerprint changed"


def stale_stages(records: Mapping[str, Mapping], current: Mapping[str, Mapping]
                 ) -> dict[str, str]:
  """{stage: reason} of the stages of `current` (a `fingerprints` result, in plan order) whose
  record in `records` was made under another config, or under one upstream of it."""
  stale = {}
  for name, entry in current.items():
    reason = why_stale(records.get(name), entry, stale)
    if reason is not None:
      stale[name] = reason
  return stale


class Book:
  """workdir/stages.json for the stages of `plan` under config `cfg` (see the module
  docstring). Building one invalidates the stale stages: prints each with its reason,
  drops its record and moves its run directory aside; a stage with no record whose run
  directory exists (left by a run without fingerprints) is moved aside too."""

  def __init__(self, workdir: str, cfg, plan: Sequence[Stage], *, log=print):
    self.workdir = os.fspath(workdir)
    self.plan = {s.name: s for s in plan}
    self.current = fingerprints(cfg, plan)
    self._log = log
    self.path = os.path.join(self.workdir, STAGES_FILE)
    data = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        data = json.load(f)
    if data.get("version") == FORMAT_VERSION:
      self.records = data.get("stages", {})
      self.wall_time_s = float(data.get("wall_time_s", 0.0))
    else:  # no file, or one written before fingerprints: every stage's provenance is unknown
      self.records = {name: {} for name in data if name in self.plan}
      self.wall_time_s = 0.0
    self.stale = stale_stages(self.records, self.current)
    for name in self.current:
      stage = self.plan[name]
      if name in self.stale:
        self._log(f"[{name}] recomputing: {self.stale[name]}")
        del self.records[name]
        self._move_aside(stage)
      elif name not in self.records and stage.run_dir and \
          os.path.exists(os.path.join(self.workdir, stage.run_dir)):
        self._log(f"[{name}] recomputing: {stage.run_dir}/ has no record in {STAGES_FILE}")
        self._move_aside(stage)
    os.makedirs(self.workdir, exist_ok=True)
    self.save()

  def _move_aside(self, stage: Stage) -> None:
    if not stage.run_dir:
      return
    src = os.path.join(self.workdir, stage.run_dir)
    if not os.path.exists(src):
      return
    dst = src + STALE_SUFFIX
    if os.path.exists(dst):
      shutil.rmtree(dst)
    os.replace(src, dst)
    self._log(f"[{stage.name}] moved {stage.run_dir}/ (made under another config) to "
              f"{stage.run_dir}{STALE_SUFFIX}/; it is not resumed")

  def _check(self, name: str) -> None:
    if name not in self.plan:
      raise KeyError(f"stage {name!r} is not in the plan ({', '.join(self.plan)})")

  def result(self, name: str) -> Optional[Any]:
    """The finished result of stage `name` under this config, or None (prints which)."""
    self._check(name)
    record = self.records.get(name)
    if record and record.get("done"):
      self._log(f"[{name}] reusing the recorded result: its config is unchanged")
      return record["result"]
    return None

  def start(self, name: str) -> None:
    """Records that stage `name` runs under this config (call before it writes anything), so
    a rerun under another config knows its partial outputs are stale."""
    self._check(name)
    if self.records.get(name, {}).get("fingerprint") == self.current[name]["fingerprint"]:
      if not self.records[name].get("done"):
        self._log(f"[{name}] resuming: its config is unchanged")
      return
    self.records[name] = dict(self.current[name], done=False)
    self.save()

  def finish(self, name: str, result: Any) -> None:
    """Records stage `name`'s result (JSON-able) under this config and saves stages.json."""
    self._check(name)
    self.records[name] = dict(self.current[name], done=True, result=result)
    self.save()

  def results(self) -> dict:
    """{stage: result} of the finished stages."""
    return {n: r["result"] for n, r in self.records.items() if r.get("done")}

  def save(self) -> None:
    if not metrics_lib.is_primary():  # process 0 keeps the book of a multi-process run
      return
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"version": FORMAT_VERSION, "wall_time_s": self.wall_time_s,
                 "stages": self.records}, f, indent=2)
    os.replace(tmp, self.path)


def load_results(workdir: str) -> dict:
  """{stage: result} of the finished stages recorded in workdir/stages.json."""
  with open(os.path.join(workdir, STAGES_FILE)) as f:
    data = json.load(f)
  return {n: r["result"] for n, r in data.get("stages", {}).items() if r.get("done")}

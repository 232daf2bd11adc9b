"""Tests of the stage bookkeeping (r1jax/run/stages.py) on plain configs, without JAX.

A changed field invalidates the stage that reads it and every stage after it in the
dependency chain, nothing else; neutral fields invalidate nothing; stale run directories are
moved aside and said so; a workdir from before the fingerprints is recomputed.
"""
from __future__ import annotations

import json
import os

import ml_collections
import pytest

from r1jax.run import stages

Stage = stages.Stage
PLAN = (Stage("train", ("seed", "train"), run_dir="train"),
        Stage("eval_train", ("seed", "eval"), after=("train",), run_dir="eval_train"),
        Stage("rl", ("seed", "rl"), after=("train",), run_dir="rl"),
        Stage("eval_rl", ("seed", "eval"), after=("rl",)),
        Stage("control", ("seed", "train"), after=("train", "rl"), run_dir="control"))


def config():
  return ml_collections.ConfigDict({
      "seed": 0, "mode": "pipeline",
      "train": {"steps": 4, "lr": 1e-3, "checkpoint_every": 2, "max_to_keep": 1,
                "shape": (2, 3)},
      "rl": {"steps": 2, "beta": 0.0, "reward_workers": 0},
      "eval": {"k": 1, "max_new_tokens": 24}})


def stale_after(change):
  """{stage: reason} of the stages recorded under config() that `change(cfg)` invalidates."""
  cfg = config()
  records = {n: dict(e, done=True) for n, e in stages.fingerprints(cfg, PLAN).items()}
  records = json.loads(json.dumps(records))  # as stored and read back
  change(cfg)
  return stages.stale_stages(records, stages.fingerprints(cfg, PLAN))


def test_a_changed_field_invalidates_its_stage_and_those_after_it():
  def set_(path, value):
    def change(cfg):
      node = cfg
      *parents, leaf = path.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
    return change

  stale = stale_after(set_("eval.max_new_tokens", 32))
  assert list(stale) == ["eval_train", "eval_rl"]
  assert stale["eval_train"] == "config changed: eval.max_new_tokens 24 -> 32"
  stale = stale_after(set_("rl.beta", 0.04))
  assert list(stale) == ["rl", "eval_rl", "control"]
  assert stale["rl"] == "config changed: rl.beta 0.0 -> 0.04"
  assert stale["eval_rl"] == "it comes after rl, which changed"
  assert stale["control"] == "it comes after rl, which changed"
  assert list(stale_after(set_("train.steps", 5))) == ["train", "eval_train", "rl", "eval_rl",
                                                       "control"]
  assert list(stale_after(set_("seed", 1))) == [s.name for s in PLAN]
  stale = stale_after(set_("train.shape", (2, 4)))
  assert stale["train"] == "config changed: train.shape [2, 3] -> [2, 4]"
  stale = stale_after(lambda cfg: cfg.rl.update({"extra": 1}))
  assert stale["rl"] == "config changed: rl.extra (absent) -> 1"


@pytest.mark.parametrize("path,value", [("train.checkpoint_every", 1), ("train.max_to_keep", 5),
                                        ("rl.reward_workers", 4), ("mode", "eval")])
def test_neutral_and_unread_fields_invalidate_nothing(path, value):
  def change(cfg):
    section, _, leaf = path.rpartition(".")
    (cfg[section] if section else cfg)[leaf] = value
  assert stale_after(change) == {}


def test_fingerprints_check_the_plan_and_the_fields():
  cfg = config()
  fp = stages.fingerprints(cfg, PLAN)
  assert fp["eval_rl"]["after"] == {"rl": fp["rl"]["fingerprint"]}
  assert "train.checkpoint_every" not in fp["train"]["fields"]
  assert fp["train"]["fields"]["train.shape"] == [2, 3]
  with pytest.raises(ValueError, match=r"comes after \['rl'\], which are not earlier"):
    stages.fingerprints(cfg, (Stage("a", ("seed",), after=("rl",)),))
  with pytest.raises(ValueError, match="the config has no field 'train.nope'"):
    stages.fingerprints(cfg, (Stage("a", ("train.nope",)),))


def _fill(workdir, name):
  os.makedirs(workdir / name / "checkpoints" / "4")
  (workdir / name / "metrics.jsonl").write_text('{"step": 4}\n')


def test_book_reuses_invalidates_and_moves_stale_run_dirs_aside(tmp_path):
  log = []
  book = stages.Book(tmp_path, config(), PLAN, log=log.append)
  for name in ("train", "rl", "control", "eval_train"):
    book.start(name)
    if book.plan[name].run_dir:
      _fill(tmp_path, book.plan[name].run_dir)
    if name != "control":  # the control was killed before it finished
      book.finish(name, {"steps": 4, "name": name})
  book.wall_time_s = 12.5
  book.save()
  assert log == []

  log.clear()
  again = stages.Book(tmp_path, config(), PLAN, log=log.append)
  assert log == [] and again.wall_time_s == 12.5
  assert again.result("train") == {"steps": 4, "name": "train"}
  assert again.result("control") is None and again.result("eval_rl") is None
  again.start("control")
  assert log == ["[train] reusing the recorded result: its config is unchanged",
                 "[control] resuming: its config is unchanged"]

  cfg = config()
  cfg.rl.beta = 0.1
  log.clear()
  changed = stages.Book(tmp_path, cfg, PLAN, log=log.append)
  assert log == ["[rl] recomputing: config changed: rl.beta 0.0 -> 0.1",
                 "[rl] moved rl/ (made under another config) to rl.stale/; it is not resumed",
                 "[control] recomputing: it comes after rl, which changed",
                 "[control] moved control/ (made under another config) to control.stale/; "
                 "it is not resumed"]
  assert not (tmp_path / "rl").exists() and (tmp_path / "rl.stale" / "checkpoints" / "4").is_dir()
  assert (tmp_path / "train" / "checkpoints" / "4").is_dir()  # untouched
  assert changed.result("rl") is None and changed.result("eval_train") is not None
  on_disk = json.load(open(tmp_path / stages.STAGES_FILE))
  assert sorted(on_disk["stages"]) == ["eval_train", "train"]
  assert stages.load_results(tmp_path) == {"train": {"steps": 4, "name": "train"},
                                           "eval_train": {"steps": 4, "name": "eval_train"}}


def test_a_workdir_without_fingerprints_is_recomputed(tmp_path):
  # The layout before fingerprints: results at the top level, run dirs beside.
  (tmp_path / stages.STAGES_FILE).write_text(json.dumps(
      {"train": {"steps": 4}, "eval_train": {"pass@1": 0.5}, "wall_time_before_s": 3.0}))
  _fill(tmp_path, "train")
  _fill(tmp_path, "rl")  # a run dir with no record at all
  log = []
  book = stages.Book(tmp_path, config(), PLAN, log=log.append)
  assert log == [
      "[train] recomputing: recorded without a config fingerprint",
      "[train] moved train/ (made under another config) to train.stale/; it is not resumed",
      "[eval_train] recomputing: recorded without a config fingerprint",
      "[rl] recomputing: rl/ has no record in stages.json",
      "[rl] moved rl/ (made under another config) to rl.stale/; it is not resumed"]
  assert book.results() == {} and book.wall_time_s == 0.0
  assert not (tmp_path / "train").exists() and not (tmp_path / "rl").exists()

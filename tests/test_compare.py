"""Tests of `python -m r1jax.compare` on two hand-made run directories.

One run is a stage directory (metrics.jsonl + summary.json), the other a pipeline workdir
(summary.json at the top, the metrics in grpo/); the figure holds a line per run and metric
with the written numbers, the table a column per run with their summary figures.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from r1jax import compare

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(path, records, summary):
  path.mkdir(parents=True, exist_ok=True)
  if records is not None:
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  (path / "summary.json").write_text(json.dumps(summary))


@pytest.fixture()
def two_runs(tmp_path):
  a = tmp_path / "run_a"
  _write(a, [{"step": s, "reward_mean": 0.1 * s, "accuracy": 0.5} for s in (1, 2, 3)],
         {"accuracy_after_grpo": 0.75, "steps": 3, "grpo_time_split_s": {"train_s": 1.5}})
  b = tmp_path / "run_b"
  _write(b, None, {"accuracy_after_grpo": 0.5, "steps": 2, "only_b": "x"})
  _write(b / "grpo", [{"step": 1, "reward_mean": 0.2}, {"step": 2, "reward_mean": 0.4,
                                                         "accuracy": 0.25}], {})
  _write(b / "grpo.stale", [{"step": 1, "reward_mean": 9.0}], {})  # moved aside: ignored
  return a, b


def test_compare_draws_a_line_per_run_and_tabulates_the_summaries(two_runs, tmp_path):
  a, b = two_runs
  out = tmp_path / "cmp.png"
  result = compare.compare([str(a), str(b)], ["reward_mean", "accuracy"], str(out))
  assert open(out, "rb").read(8) == PNG_MAGIC
  reward, accuracy = result.figure.axes
  assert reward.get_title() == "reward_mean"
  lines = {line.get_label(): line for line in reward.get_lines()}
  assert sorted(lines) == ["run_a", "run_b (grpo)"]  # run_b's curves come from its stage
  np.testing.assert_allclose(lines["run_a"].get_ydata(), [0.1, 0.2, 0.3])
  np.testing.assert_array_equal(lines["run_b (grpo)"].get_xdata(), [1, 2])
  np.testing.assert_allclose(lines["run_b (grpo)"].get_ydata(), [0.2, 0.4])
  acc = {line.get_label(): list(line.get_ydata()) for line in accuracy.get_lines()}
  assert acc == {"run_a": [0.5, 0.5, 0.5], "run_b (grpo)": [0.25]}

  rows = [line.split() for line in result.table.splitlines()]
  assert rows[0] == ["key", "run_a", "run_b"]
  table = {r[0]: r[1:] for r in rows[2:]}
  assert table["accuracy_after_grpo"] == ["0.75", "0.5"]
  assert table["steps"] == ["3", "2"]
  assert table["grpo_time_split_s.train_s"] == ["1.5"]  # run_b's cell is blank
  line = next(x for x in result.table.splitlines() if x.startswith("only_b"))
  assert line.split() == ["only_b", "x"] and line.index("x") > line.index("only_b") + 10
  assert list(table) == sorted(table)


def test_compare_main_prints_the_table_and_defaults_to_the_logged_keys(two_runs, tmp_path,
                                                                      capsys):
  a, b = two_runs
  out = tmp_path / "default.png"
  assert compare.main([str(a), str(b), "--out", str(out)]) == 0
  text = capsys.readouterr().out
  assert text.splitlines()[0].split() == ["key", "run_a", "run_b"]
  assert f"curves of reward_mean, accuracy: {out}" in text
  assert open(out, "rb").read(8) == PNG_MAGIC
  # a named stage, and errors
  result = compare.compare([str(b)], ["grpo/reward_mean"], None)
  (line,) = result.figure.axes[0].get_lines()
  assert line.get_label() == "run_b"
  np.testing.assert_allclose(line.get_ydata(), [0.2, 0.4])
  assert compare.main([str(a), "--keys", "kl_ref", "--out", str(out)]) == 2
  assert "no run logged metric(s) ['kl_ref']" in capsys.readouterr().err
  with pytest.raises(ValueError, match="does not exist"):
    compare.load_run(str(tmp_path / "nope"))

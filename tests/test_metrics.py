"""Tests for r1jax/train/metrics.py: JSONL content and resume, TensorBoard, summary, plots, lag."""
from __future__ import annotations

import glob
import io
import json
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from r1jax.train import metrics


def _tb_scalars(workdir):
  """(tag, step, value) of every scalar in the event files, read from the TFRecord framing."""
  out = []
  for path in sorted(glob.glob(os.path.join(workdir, metrics.TB_DIR, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        out.append((v.tag, event.step, v.simple_value))
  return out


def test_jsonl_lines_and_tensorboard(tmp_path):
  with metrics.MetricsWriter(tmp_path) as w:
    w.write(1, {"loss": jnp.float32(0.5), "reward": 1, "tag": "a", "time_train_s": 2.0})
    host = w.write(2, {"loss": np.float32(0.25), "reward": jnp.int32(3), "kl": float("nan")})
    assert host == {"loss": 0.25, "reward": 3, "kl": host["kl"]} and np.isnan(host["kl"])
    # flushed after each write: readable before close
    assert len(open(tmp_path / "metrics.jsonl").read().splitlines()) == 2
  lines = open(tmp_path / "metrics.jsonl").read().splitlines()
  assert [json.loads(x) for x in lines] == [
      {"step": 1, "loss": 0.5, "reward": 1, "tag": "a", "time_train_s": 2.0},
      {"step": 2, "loss": 0.25, "reward": 3, "kl": None},
  ]
  scalars = _tb_scalars(str(tmp_path))
  assert ("train/loss", 1, 0.5) in scalars and ("train/loss", 2, 0.25) in scalars
  assert ("train/reward", 2, 3.0) in scalars and ("time/time_train_s", 1, 2.0) in scalars
  assert {tag for tag, _, _ in scalars} == {"train/loss", "train/reward", "train/kl",
                                            "time/time_train_s"}


@pytest.mark.parametrize("key,group,tag", [
    ("loss", "train", "train/loss"), ("reward_format", "train", "train/reward_format"),
    ("time_sample_s", "train", "time/time_sample_s"), ("elapsed_s", "train", "time/elapsed_s"),
    ("step_time_s", "train", "time/step_time_s"), ("total_train_s", "train", "time/total_train_s"),
    ("sample_tokens_per_s", "train", "time/sample_tokens_per_s"),
    ("timeouts", "train", "train/timeouts"), ("pass@1", "eval", "eval/pass@1"),
    ("wall_time_s", "eval", "time/wall_time_s"), ("hparams/x", "train", "hparams/x")])
def test_tb_tag_groups_metrics(key, group, tag):
  assert metrics.tb_tag(key, group) == tag


def _tb_texts_and_hparams(tb_dir):
  """Text summaries and hparam session names under tb_dir (recursively)."""
  texts, plugins = {}, set()
  for path in sorted(glob.glob(os.path.join(tb_dir, "**", "events.out.tfevents.*"),
                               recursive=True)):
    data, pos = open(path, "rb").read(), 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        plugins.add(v.metadata.plugin_data.plugin_name)
        if v.metadata.plugin_data.plugin_name == "text":
          texts[v.tag] = b"".join(v.tensor.string_val).decode()
  return texts, plugins


def test_log_eval_log_hparams_and_finish_run(tmp_path):
  result = {"pass@1": 0.625, "maj@1": 0.5, "num_problems": 8, "note": "x"}
  assert metrics.log_eval(str(tmp_path / "eval"), 4, result) == {
      "pass@1": 0.625, "maj@1": 0.5, "num_problems": 8}
  # TensorBoard's tag rules turn '@' into '_'
  assert sorted(_tb_scalars(str(tmp_path / "eval"))) == [
      ("eval/maj_1", 4, 0.5), ("eval/num_problems", 4, 8.0), ("eval/pass_1", 4, 0.625)]

  with metrics.MetricsWriter(tmp_path / "run") as w:
    for step in (1, 2, 3):
      w.write(step, {"loss": 1.0 / step, "elapsed_s": float(step)})
  summary = metrics.finish_run(str(tmp_path / "run"), {"steps": 3, "nested": {"a": 2.5}},
                               config={"seed": 0, "sft": {"lr": 1e-3, "shape": (2, 3)}},
                               curves=("loss", "accuracy"))
  assert summary == {"steps": 3, "nested": {"a": 2.5}, "final_loss": pytest.approx(1 / 3)}
  assert json.load(open(tmp_path / "run" / "summary.json")) == summary
  assert open(tmp_path / "run" / "curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  texts, plugins = _tb_texts_and_hparams(str(tmp_path / "run" / metrics.TB_DIR))
  assert "hparams" in plugins  # the HParams dashboard's session
  table = texts["hparams/text_summary"]
  assert "| sft.lr | 0.001 |" in table and "| sft.shape | [2, 3] |" in table
  assert "| **hparams/nested.a** | 2.5 |" in table and "hparams/final_loss" in table
  assert os.path.isdir(tmp_path / "run" / metrics.TB_DIR / metrics.HPARAMS_RUN)


def test_write_config_and_plot_bars(tmp_path):
  import ml_collections
  cfg = ml_collections.ConfigDict({"seed": 3, "grpo": {"G": 4, "digits": (2, 3)}})
  path = metrics.write_config(str(tmp_path / "w"), cfg)
  assert json.load(open(path)) == {"seed": 3, "grpo": {"G": 4, "digits": [2, 3]}}
  fig = metrics.plot_bars(str(tmp_path / "bars.png"), {"pass@1": 0.25, "format_rate": 1.0})
  assert [p.get_height() for p in fig.axes[0].patches] == [0.25, 1.0]
  assert open(tmp_path / "bars.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_resume_truncates_steps_after_the_checkpoint(tmp_path):
  with metrics.MetricsWriter(tmp_path) as w:
    for step in range(1, 8):
      w.write(step, {"loss": 1.0 / step})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 8, "lo')  # a line cut short by SIGKILL
  with metrics.MetricsWriter(tmp_path, resume_step=5) as w:
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5]
    w.write(6, {"loss": 42.0})
  records = metrics.read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert records[-1]["loss"] == 42.0 and records[4]["loss"] == pytest.approx(0.2)
  # the resumed writer (within the same second) kept the first one's events
  scalars = _tb_scalars(str(tmp_path))
  assert ("train/loss", 1, 1.0) in scalars and ("train/loss", 6, 42.0) in scalars
  # a fresh run in the same workdir starts a fresh file
  metrics.MetricsWriter(tmp_path, tensorboard=False).close()
  assert metrics.read_metrics(str(tmp_path)) == []


def test_malformed_middle_line_is_an_error(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match="metrics.jsonl:2"):
    metrics.read_metrics(str(tmp_path))


def test_bad_metric_values_raise(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
    with pytest.raises(ValueError, match="metric 'hist' must be a scalar"):
      w.write(1, {"hist": jnp.arange(3.0)})
    with pytest.raises(ValueError, match="'step' key"):
      w.write(1, {"step": 3})
    with pytest.raises(ValueError, match="step must be a non-negative int"):
      w.write(-1, {"loss": 1.0})


def test_write_summary(tmp_path):
  path = metrics.write_summary(str(tmp_path), {
      "final_accuracy": jnp.float32(0.75), "steps": 100, "nested": {"x": np.int64(3)},
      "curve": jnp.array([1.0, 2.0]), "bad": float("inf")})
  assert path == str(tmp_path / "summary.json")
  assert json.load(open(path)) == {"final_accuracy": 0.75, "steps": 100, "nested": {"x": 3},
                                   "curve": [1.0, 2.0], "bad": None}


def test_plot_curves_writes_png_with_requested_curves(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
    for step in range(10):
      w.write(step, {"loss": 1.0 / (step + 1), "reward": step * 0.1, "other": 0.0})
  fig = metrics.plot_curves(str(tmp_path), ["loss", "reward"], "curves.png")
  data = open(tmp_path / "curves.png", "rb").read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
  labels = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
  assert labels == ["loss", "reward"]
  loss_line = fig.axes[0].get_lines()[0]
  np.testing.assert_array_equal(loss_line.get_xdata(), np.arange(10))
  np.testing.assert_allclose(loss_line.get_ydata(), 1.0 / np.arange(1, 11))
  with pytest.raises(ValueError, match=r"no values for metric\(s\) \['accuracy'\]"):
    metrics.plot_curves(str(tmp_path), ["loss", "accuracy"], "x.png")


def test_one_step_late_never_touches_the_newest_metrics():
  class Unreadable:
    def __array__(self, *a, **k):
      raise RuntimeError("read too early")

  late = metrics.OneStepLate()
  assert late.push(1, {"loss": Unreadable()}) is None  # not converted yet
  with pytest.raises(RuntimeError, match="read too early"):
    late.push(2, {"loss": jnp.float32(2.0)})  # converting step 1 now
  assert late.flush() == (2, {"loss": 2.0})
  assert late.flush() is None
  assert late.push(3, {"loss": jnp.float32(3.0)}) is None
  assert late.push(4, {"loss": jnp.float32(4.0)}) == (3, {"loss": 3.0})


def test_progress_bar_shows_chosen_metrics():
  out = io.StringIO()
  with metrics.ProgressBar(10, keys=("loss", "reward"), initial=2, file=out) as bar:
    bar.update(5, {"loss": jnp.float32(0.123456), "reward": 0.5, "hidden": 9.0})
    assert bar._bar.n == 5
  text = out.getvalue()
  assert "loss=0.1235" in text and "reward=0.5" in text and "hidden" not in text

"""Run metrics: JSONL + TensorBoard per step, a progress bar, summary.json and PNG curves.

Every long run writes into its workdir
  metrics.jsonl   one JSON object per logged step: {"step": 12, "loss": 0.41, ...}
  tb/             TensorBoard event files (tensorboardX) with the same scalars, tagged by
                  group (tb_tag): train/..., eval/..., time/...; the run's config and final
                  figures once (log_hparams: the HParams dashboard and a text table)
  summary.json    final figures, written once at the end (write_summary)
  *.png           learning curves drawn from metrics.jsonl (plot_curves)
so a researcher can read results with `tail`, TensorBoard, a notebook, or `python -m
r1jax.compare` over several runs.

Device values are read one step late (OneStepLate, STYLE.md item 11): the host queues the
step's metrics and converts the previous step's, which is already computed, so it never
waits on the device and dispatch stays ahead.
"""
from __future__ import annotations

import collections
import itertools
import json
import math
import numbers
import os
import threading
import time
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
TB_DIR = "tb"
HPARAMS_RUN = "hparams"  # the tb/ subdirectory add_hparams writes its session into


_writer_ids = itertools.count()


def is_primary() -> bool:
  """True in process 0 of a multi-process run (and in a one-process run): the one process
  that writes metrics, TensorBoard events, summaries, config.json and plots, and shows
  progress bars (r1jax/run/multihost.py); the others compute the same values and write
  nothing."""
  return jax.process_index() == 0


def _summary_writer(logdir: str, **kwargs):
  """A tensorboardX SummaryWriter whose event file no other writer shares: tensorboardX names
  files by the second and opens them for writing, so a second writer on the same directory
  within one second (a fast resume, the hparams after a short run) would erase the first's
  events; the file name carries the process id and a counter."""
  from tensorboardX import SummaryWriter  # imported lazily: heavy and optional at read time
  return SummaryWriter(logdir=logdir, filename_suffix=f".{os.getpid()}.{next(_writer_ids)}",
                       **kwargs)


def is_time_key(key: str) -> bool:
  """Wall-clock figures: `time_*` (a phase's seconds), `*_s` (seconds: elapsed_s,
  step_time_s, total_train_s) and `*_per_s` (throughputs)."""
  return key.startswith("time_") or key.endswith("_s")


def tb_tag(key: str, group: str = "train") -> str:
  """The TensorBoard tag of metric `key` of a run of `group` ('train' for a training stage,
  'eval' for an evaluation): time/<key> for wall-clock figures (is_time_key), else
  <group>/<key>; a key that already names its group ('a/b') is kept."""
  if "/" in key:
    return key
  return f"time/{key}" if is_time_key(key) else f"{group}/{key}"

# JAX's own duration events for tracing, lowering and compiling (or reading from the
# persistent cache) a top-level program; they do not nest.
_COMPILE_EVENTS = frozenset(("/jax/core/compile/jaxpr_trace_duration",
                             "/jax/core/compile/jaxpr_to_mlir_module_duration",
                             "/jax/core/compile/backend_compile_duration"))
_compile_s = collections.defaultdict(float)  # thread id -> seconds


def _count_compile(event: str, duration: float, **_) -> None:
  if event in _COMPILE_EVENTS:
    _compile_s[threading.get_ident()] += duration


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compile_seconds() -> float:
  """Seconds this thread has spent tracing, lowering and compiling JAX programs so far."""
  return _compile_s[threading.get_ident()]


class WorkClock:
  """Wall-clock seconds since `start()` less the compile time (compile_seconds) meanwhile.

  A run that restarts compiles its programs again; timing with this clock, the steps of a
  resumed run cost what they would have in an uninterrupted one, so time budgets that
  compare stages (the pipeline's SFT control) do not depend on how often a run was killed.
  """

  def __init__(self):
    self.start()

  def start(self) -> "WorkClock":
    self._t, self._c = time.perf_counter(), compile_seconds()
    return self

  def compile_s(self) -> float:
    """Compile seconds since start()."""
    return compile_seconds() - self._c

  def elapsed(self) -> float:
    return max(time.perf_counter() - self._t - self.compile_s(), 0.0)


def to_host(metrics: Mapping[str, Any]) -> dict:
  """Fetches a flat dict of scalar (device or host) values to Python numbers.

  Size-1 arrays become float (int for integer dtypes, bool for booleans); strings pass
  through. Anything else raises ValueError naming the key, rather than logging garbage.
  """
  fetched = jax.device_get(dict(metrics))
  out = {}
  for key, value in fetched.items():
    if isinstance(value, str) or value is None:
      out[key] = value
      continue
    arr = np.asarray(value)
    if arr.size != 1 or arr.dtype.kind not in "biuf":
      raise ValueError(f"metric {key!r} must be a scalar number or a string; "
                       f"got shape {arr.shape} dtype {arr.dtype}")
    item = arr.reshape(()).item()
    out[key] = item if arr.dtype.kind in "biu" else float(item)
  return out


def _json_value(value):
  if isinstance(value, float) and not math.isfinite(value):
    return None  # strict JSON has no NaN/inf; TensorBoard still gets the raw value
  return value


def read_metrics(path: str) -> list[dict]:
  """Records of a metrics.jsonl (path to the file or to its workdir), in file order.

  A last line cut short by a killed process (no trailing newline, not valid JSON) is
  skipped; any other malformed line raises ValueError with its line number.
  """
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:  # an unterminated final line: an interrupted write
        break
      raise ValueError(f"{path}:{i + 1}: not a JSON line ({e})") from e
  return records


class MetricsWriter:
  """Appends one JSON line per step to <workdir>/metrics.jsonl and scalars to TensorBoard.

  Resuming: pass resume_step, the step of the checkpoint the run restarts from. Lines
  with step > resume_step (written after that checkpoint by the interrupted run) are
  removed, and TensorBoard is told to purge its events past resume_step, so the curves
  hold each step once. resume_step=None means a fresh run: an existing metrics.jsonl
  (left by a run killed before its first checkpoint) is cleared.
  Each write() is flushed, so a killed run loses at most the line being written. With
  OneStepLate, flush it and write the pending step before saving a checkpoint, or the
  checkpoint step's own line is lost on resume.
  group: the TensorBoard tag group of the run's metrics (tb_tag); metrics.jsonl keeps the
  plain keys.
  """

  def __init__(self, workdir: str, *, resume_step: Optional[int] = None,
               tensorboard: bool = True, group: str = "train"):
    self.group = group
    if resume_step is not None and (not isinstance(resume_step, int) or resume_step < 0):
      raise ValueError(f"resume_step must be a non-negative int or None; got {resume_step!r}")
    self.workdir = os.fspath(workdir)
    self.path = os.path.join(self.workdir, METRICS_FILE)
    self._file = self._tb = None
    if not is_primary():
      return
    os.makedirs(self.workdir, exist_ok=True)
    keep = []
    if resume_step is not None:
      keep = [r for r in read_metrics(self.path) if r.get("step", math.inf) <= resume_step]
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for record in keep:
        f.write(json.dumps(record) + "\n")
    os.replace(tmp, self.path)  # atomic: a crash here leaves the old or the new file
    self._file = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      purge = 0 if resume_step is None else resume_step + 1
      self._tb = _summary_writer(os.path.join(self.workdir, TB_DIR), purge_step=purge)

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
    """Writes `metrics` (scalars, device or host) for `step`; returns the host values."""
    if not isinstance(step, numbers.Integral) or step < 0:
      raise ValueError(f"step must be a non-negative int; got {step!r}")
    if "step" in metrics:
      raise ValueError("metrics must not contain a 'step' key (it is the record's own step)")
    values = to_host(metrics)
    record = {"step": int(step)}
    record.update({k: _json_value(v) for k, v in values.items()})
    if self._file is None:
      return values
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(tb_tag(key, self.group), value, global_step=int(step))
    return values

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None and not self._file.closed:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class OneStepLate:
  """Holds a step's device metrics and hands back the previous step's as host numbers.

    late = OneStepLate()
    for step in ...:
      state, m = train_step(state, batch)        # dispatched, not waited for
      if (ready := late.push(step, m)) is not None:
        writer.write(*ready)                     # step - 1, already computed
    if (ready := late.flush()) is not None:
      writer.write(*ready)

  push() never touches the metrics it is given, so it does not block on the step that
  was just dispatched.
  """

  def __init__(self):
    self._pending: Optional[tuple[int, Mapping[str, Any]]] = None

  def push(self, step: int, device_metrics: Mapping[str, Any]) -> Optional[tuple[int, dict]]:
    previous, self._pending = self._pending, (step, device_metrics)
    if previous is None:
      return None
    return previous[0], to_host(previous[1])

  def flush(self) -> Optional[tuple[int, dict]]:
    """The pending step's metrics as host numbers (blocks on it), or None if none."""
    if self._pending is None:
      return None
    step, metrics = self._pending
    self._pending = None
    return step, to_host(metrics)


class ProgressBar:
  """tqdm bar over steps whose postfix shows a few chosen metrics.

  Shown on non-terminals too (logs of batch jobs) unless disable=True; disable=None
  leaves it to tqdm (off when the stream is not a TTY).

    bar = ProgressBar(num_steps, keys=("loss", "reward"), initial=start_step)
    bar.update(step + 1, metrics)
  """

  def __init__(self, total: int, keys: Sequence[str] = (), *, initial: int = 0,
               desc: Optional[str] = None, file=None, disable: Optional[bool] = False):
    from tqdm.auto import tqdm
    self.keys = tuple(keys)
    disable = True if not is_primary() else disable
    self._bar = tqdm(total=total, initial=initial, desc=desc, file=file, disable=disable,
                     dynamic_ncols=True)
    self._position = initial

  def update(self, step: int, metrics: Optional[Mapping[str, Any]] = None) -> None:
    """Moves the bar to `step` (steps done) and shows the chosen metrics from `metrics`."""
    if step > self._position:
      self._bar.update(step - self._position)
      self._position = step
    if metrics:
      shown = {k: metrics[k] for k in self.keys if k in metrics}
      if shown:
        host = to_host(shown)
        self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                               for k, v in host.items()})

  def close(self) -> None:
    self._bar.close()

  def __enter__(self) -> "ProgressBar":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write_summary(workdir: str, summary: Mapping[str, Any]) -> str:
  """Writes <workdir>/summary.json (sorted keys, indented); returns its path.

  Device scalars are fetched; non-finite floats become null. Values must be JSON-able.
  """
  def convert(v):
    if isinstance(v, Mapping):
      return {str(k): convert(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
      return [convert(x) for x in v]
    if isinstance(v, (jax.Array, np.ndarray, np.generic)):
      arr = np.asarray(jax.device_get(v))
      v = arr.tolist()
      return convert(v) if isinstance(v, list) else _json_value(v)
    return _json_value(v)

  path = os.path.join(workdir, SUMMARY_FILE)
  summary = convert(summary)  # every process: the device values are fetched together
  if not is_primary():
    return path
  os.makedirs(workdir, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2, sort_keys=True, allow_nan=False)
    f.write("\n")
  os.replace(tmp, path)
  return path


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict:
  """{'a.b': leaf} of a nested mapping (a summary, a config's to_dict())."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def write_config(workdir: str, cfg) -> str:
  """Writes <workdir>/config.json, the config as run (an ml_collections ConfigDict); returns
  its path. Every mode calls it before any work, so even a failed run says what it ran."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not is_primary():
    return path
  os.makedirs(workdir, exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))
    f.write("\n")
  os.replace(path + ".tmp", path)
  return path


def final_values(records: Sequence[Mapping], keys: Iterable[str]) -> dict:
  """{'final_<key>': value at the last step that logged it} for each key logged at all."""
  out = {}
  for key in keys:
    pts = curve(records, key)
    if pts:
      out[f"final_{key}"] = pts[-1][1]
  return out


def _hparam_value(value):
  if isinstance(value, (bool, int, float, str)):
    return value
  return json.dumps(value) if isinstance(value, (list, tuple)) or value is None else str(value)


def log_hparams(run_dir: str, config: Mapping[str, Any], summary: Mapping[str, Any]) -> None:
  """The run's config and final figures in <run_dir>/tb, once per run: the HParams dashboard
  (a session in tb/hparams, one hparam per flattened config field, one metric per numeric
  summary figure, tagged hparams/<key>) and a text table of both (tag 'hparams')."""
  if not is_primary():
    return None
  hparams = {k: _hparam_value(v) for k, v in flatten(config).items()}
  figures = {f"hparams/{k}": float(v) for k, v in flatten(summary).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
  tb_dir = os.path.join(run_dir, TB_DIR)
  hp_dir = os.path.join(tb_dir, HPARAMS_RUN)
  if os.path.isdir(hp_dir):  # a rerun's session replaces the last one
    for name in os.listdir(hp_dir):
      os.remove(os.path.join(hp_dir, name))
  rows = [f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |"
          for k, v in sorted(flatten(config).items())]
  rows += [f"| **{k}** | {v:.6g} |" for k, v in sorted(figures.items())]
  with _summary_writer(tb_dir) as w:
    w.add_hparams(hparams, figures, name=HPARAMS_RUN)
    w.add_text("hparams", "| field | value |\n|---|---|\n" + "\n".join(rows))


def log_eval(run_dir: str, step: int, result: Mapping[str, Any]) -> dict:
  """One evaluation's figures as metrics.jsonl line `step` and TensorBoard tags eval/<key> in
  run_dir (a fresh record: an evaluation runs once per run_dir); returns the host values."""
  numeric = {k: v for k, v in result.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
  with MetricsWriter(run_dir, group="eval") as w:
    return w.write(step, numeric)


def finish_run(run_dir: str, summary: Mapping[str, Any], *, config=None,
               curves: Sequence[str] = (), out_png: str = "curves.png") -> dict:
  """The end of a one-stage run: adds final_<key> of each of `curves` that the run logged
  (final_values), writes <run_dir>/summary.json and out_png (those curves, plot_curves) and,
  given the config as a dict, logs it with the summary to TensorBoard (log_hparams).
  Returns the summary written."""
  records = read_metrics(run_dir)
  keys = [k for k in curves if curve(records, k)]
  summary = {**summary, **final_values(records, keys)}
  write_summary(run_dir, summary)
  if keys:
    plot_curves(run_dir, keys, out_png)
  if config is not None:
    log_hparams(run_dir, config, summary)
  return summary


def plot_bars(out_png: str, values: Mapping[str, float], *, ylabel: str = "",
              title: str = "", ylim: Optional[tuple] = None):
  """One bar per entry of `values` (label -> number), its value printed above; returns the
  Figure."""
  if not is_primary():  # nothing drawn outside process 0
    return None
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  if not values:
    raise ValueError("plot_bars needs at least one value")
  fig = Figure(figsize=(max(4.0, 1.2 * len(values)), 3.5), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  labels, heights = list(values), [float(v) for v in values.values()]
  ax.bar(labels, heights, color="tab:blue")
  for i, v in enumerate(heights):
    ax.text(i, v, f"{v:.3g}", ha="center", va="bottom")
  if ylim is not None:
    ax.set_ylim(*ylim)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(out_png, format="png")
  return fig


def curve(records: Iterable[Mapping], key: str, x: str = "step") -> list[tuple]:
  """(x, value) points of one metric over records, skipping steps where it is missing, null
  or not a number."""
  def number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)
  return [(r[x], r[key]) for r in records if number(r.get(key)) and number(r.get(x))]


def plot_curves(workdir: str, keys: Iterable[str], out_png: str):
  """Draws each metric in `keys` against step from <workdir>/metrics.jsonl into out_png.

  One panel per key; steps where a key is missing or null are skipped. out_png is taken
  relative to workdir unless absolute. Returns the matplotlib Figure (no pyplot state is
  touched, so this is safe in threads and headless jobs); its panels' lines carry the
  key as label.
  """
  if not is_primary():  # nothing drawn outside process 0
    return None
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  keys = list(keys)
  if not keys:
    raise ValueError("plot_curves needs at least one metric key")
  records = read_metrics(workdir)
  series = {key: curve(records, key) for key in keys}
  missing = [k for k, pts in series.items() if not pts]
  if missing:
    raise ValueError(f"no values for metric(s) {missing} in {os.path.join(workdir, METRICS_FILE)}")

  fig = Figure(figsize=(5.0 * min(len(keys), 3), 3.5 * math.ceil(len(keys) / 3)), dpi=100)
  FigureCanvasAgg(fig)
  cols = min(len(keys), 3)
  rows = math.ceil(len(keys) / cols)
  for i, key in enumerate(keys):
    ax = fig.add_subplot(rows, cols, i + 1)
    steps, values = zip(*series[key])
    ax.plot(steps, values, label=key)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
  fig.tight_layout()
  if not os.path.isabs(out_png):
    out_png = os.path.join(workdir, out_png)
  fig.savefig(out_png, format="png")
  return fig

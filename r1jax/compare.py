"""Compare runs: their curves side by side and their summaries as one table.

  python -m r1jax.compare DIR1 DIR2 ... [--out compare.png] [--keys reward_mean,accuracy]

A DIR is a run directory (metrics.jsonl and summary.json, e.g. workdir/grpo) or a pipeline
workdir (summary.json at the top, each stage's metrics.jsonl in its own subdirectory). The
figure has one panel per metric and one line per run, labelled by the run's directory name;
a metric is read from the directory's own metrics.jsonl, else from the first stage
subdirectory that logged it (STAGE_ORDER; the label then names the stage: 'seed0 (sft)'), or
from a named one with 'grpo/reward_mean'.
The table has one column per run and one row per (flattened) summary key; a run without
that key leaves its cell blank.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Optional, Sequence

from r1jax.train import metrics as metrics_lib

# Stage subdirectories searched for a metric, in this order, before any other subdirectory.
STAGE_ORDER = ("pretrain", "sft", "grpo", "sft_control")
# Panels drawn when --keys is not given, those that some run logged.
DEFAULT_KEYS = ("loss", "nll", "reward_mean", "accuracy", "format_rate", "kl_ref")


@dataclasses.dataclass
class Run:
  """One run directory: its label, its summary (flattened) and the records of each source
  ('' = the directory's own metrics.jsonl, else a stage subdirectory's name)."""
  path: str
  label: str
  summary: dict
  sources: dict


def _read_summary(path: str) -> dict:
  file = os.path.join(path, metrics_lib.SUMMARY_FILE)
  if not os.path.exists(file):
    return {}
  with open(file) as f:
    return metrics_lib.flatten(json.load(f))


def load_run(path: str, label: Optional[str] = None) -> Run:
  """The run in directory `path` (ValueError if it holds neither summary.json nor metrics)."""
  if not os.path.isdir(path):
    raise ValueError(f"run directory {path!r} does not exist")
  sources = {}
  if os.path.exists(os.path.join(path, metrics_lib.METRICS_FILE)):
    sources[""] = metrics_lib.read_metrics(path)
  subdirs = sorted(n for n in os.listdir(path) if os.path.isfile(
      os.path.join(path, n, metrics_lib.METRICS_FILE)) and not n.endswith(".stale"))
  ordered = [n for n in STAGE_ORDER if n in subdirs] + [n for n in subdirs
                                                        if n not in STAGE_ORDER]
  for name in ordered:
    sources[name] = metrics_lib.read_metrics(os.path.join(path, name))
  summary = _read_summary(path)
  if not sources and not summary:
    raise ValueError(f"{path!r} holds no {metrics_lib.SUMMARY_FILE} and no "
                     f"{metrics_lib.METRICS_FILE} (in itself or a subdirectory)")
  label = label or os.path.basename(os.path.normpath(os.path.abspath(path)))
  return Run(path, label, summary, sources)


def resolve(run: Run, key: str) -> tuple[str, list[tuple]]:
  """(source, (step, value) points) of metric `key` ('name' or 'stage/name') in `run`: the
  directory's own records first (source ''), else the first stage that logged it;
  ('', []) if none did."""
  if "/" in key:
    source, name = key.split("/", 1)
    return source, metrics_lib.curve(run.sources.get(source, []), name)
  for source, records in run.sources.items():
    pts = metrics_lib.curve(records, key)
    if pts:
      return source, pts
  return "", []


def run_curve(run: Run, key: str) -> list[tuple]:
  """(step, value) points of metric `key` in `run` (see resolve); [] if absent."""
  return resolve(run, key)[1]


def _labels(paths: Sequence[str]) -> list[str]:
  """Directory names; where two runs share one, their paths instead."""
  names = [os.path.basename(os.path.normpath(os.path.abspath(p))) for p in paths]
  return [p if names.count(n) > 1 else n for p, n in zip(paths, names)]


def _cell(value) -> str:
  if value is None:
    return "null"
  if isinstance(value, float):
    return f"{value:.4g}" if math.isfinite(value) else str(value)
  return str(value)


def summary_table(runs: Sequence[Run]) -> str:
  """Text table: a column per run, a row per summary key (sorted), blank where missing."""
  keys = sorted({k for r in runs for k in r.summary})
  header = ["key"] + [r.label for r in runs]
  rows = [[k] + [_cell(r.summary[k]) if k in r.summary else "" for r in runs] for k in keys]
  widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
  def line(row):
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(row, widths))).rstrip()
  return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def plot_runs(runs: Sequence[Run], keys: Sequence[str], out_png: Optional[str] = None):
  """One panel per key, one line per run that logged it (labelled by the run); returns the
  matplotlib Figure, saved to out_png if given. ValueError if no run logged a key."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  keys = list(keys)
  if not keys:
    raise ValueError("no metric keys to plot")
  missing = [k for k in keys if not any(run_curve(r, k) for r in runs)]
  if missing:
    raise ValueError(f"no run logged metric(s) {missing}")
  cols = min(len(keys), 3)
  rows = math.ceil(len(keys) / cols)
  fig = Figure(figsize=(5.0 * cols, 3.5 * rows), dpi=100)
  FigureCanvasAgg(fig)
  for i, key in enumerate(keys):
    ax = fig.add_subplot(rows, cols, i + 1)
    for run in runs:
      source, pts = resolve(run, key)
      if pts:  # a stage's curve in a workdir says which stage it is
        ax.plot(*zip(*pts), label=f"{run.label} ({source})" if source and "/" not in key
                else run.label)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
  fig.tight_layout()
  if out_png:
    fig.savefig(out_png, format="png")
  return fig


@dataclasses.dataclass
class Comparison:
  runs: list
  keys: list
  table: str
  figure: object


def compare(paths: Sequence[str], keys: Optional[Sequence[str]] = None,
            out_png: Optional[str] = "compare.png") -> Comparison:
  """Loads the runs in `paths`, draws `keys` (default: DEFAULT_KEYS that some run logged)
  into out_png (None: not saved) and builds the summary table."""
  if not paths:
    raise ValueError("compare needs at least one run directory")
  runs = [load_run(p, label) for p, label in zip(paths, _labels(paths))]
  if keys is None:
    keys = [k for k in DEFAULT_KEYS if any(run_curve(r, k) for r in runs)]
  figure = plot_runs(runs, keys, out_png) if keys else None
  return Comparison(runs, list(keys), summary_table(runs), figure)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m r1jax.compare", description=__doc__.split(
      "\n")[0])
  parser.add_argument("dirs", nargs="+", help="run directories or pipeline workdirs")
  parser.add_argument("--out", default="compare.png", help="the figure's path (PNG)")
  parser.add_argument("--keys", default=None,
                      help="comma-separated metrics, one panel each (default: "
                           f"{','.join(DEFAULT_KEYS)}, those logged)")
  args = parser.parse_args(argv)
  keys = [k for k in args.keys.split(",") if k] if args.keys else None
  try:
    result = compare(args.dirs, keys, args.out)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(result.table)
  if result.figure is not None:
    print(f"\ncurves of {', '.join(result.keys)}: {args.out}")
  else:
    print("\nno curves: none of the runs logged any of " + ", ".join(DEFAULT_KEYS))
  return 0


if __name__ == "__main__":
  sys.exit(main())

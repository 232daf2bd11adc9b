"""Runs the embedded default pipeline for several seeds and aggregates the accuracies.

  python experiments/r1_tiny/run_seeds.py --seeds=0,1,2 --workdir=workdir/r1_tiny_seeds

Each seed is a separate `python -m r1jax.main` run (resumable on its own); the aggregate
goes to <workdir>/seeds.json and is printed as a table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds to run.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/r1_tiny_seeds", "Parent workdir.")
_CONFIG = flags.DEFINE_string("config", "configs/r1_tiny.py", "Config file.")
_EXTRA = flags.DEFINE_list("override", [], "Extra --config.x=y overrides (without --config.).")

KEYS = ("accuracy_before_grpo", "accuracy_after_grpo", "accuracy_sft_control", "grpo_lift",
        "grpo_minus_control", "wall_time_s", "grpo_time_s", "sft_time_s")


def main(argv):
  del argv
  rows = []
  for seed in _SEEDS.value:
    workdir = os.path.join(_WORKDIR.value, f"seed{seed}")
    summary_path = os.path.join(workdir, "summary.json")
    if not os.path.exists(summary_path):
      cmd = [sys.executable, "-m", "r1jax.main", f"--config={_CONFIG.value}:seed={seed}",
             f"--workdir={workdir}"] + [f"--config.{o}" for o in _EXTRA.value]
      print(" ".join(cmd), flush=True)
      subprocess.run(cmd, check=True)
    with open(summary_path) as f:
      summary = json.load(f)
    rows.append({"seed": int(seed), **{k: summary.get(k) for k in KEYS},
                 "grpo_time_split_s": summary.get("grpo_time_split_s")})
  agg = {k: sum(r[k] for r in rows) / len(rows) for k in KEYS if all(r[k] is not None for r in rows)}
  out = {"runs": rows, "mean": agg}
  with open(os.path.join(_WORKDIR.value, "seeds.json"), "w") as f:
    json.dump(out, f, indent=2)
  print(f"{'seed':>4} {'before':>7} {'after':>7} {'control':>8} {'wall_s':>7}")
  for r in rows:
    print(f"{r['seed']:>4} {r['accuracy_before_grpo']:7.3f} {r['accuracy_after_grpo']:7.3f} "
          f"{r['accuracy_sft_control']:8.3f} {r['wall_time_s']:7.0f}")
  print(f"mean {agg['accuracy_before_grpo']:7.3f} {agg['accuracy_after_grpo']:7.3f} "
        f"{agg['accuracy_sft_control']:8.3f} {agg['wall_time_s']:7.0f}")


if __name__ == "__main__":
  app.run(main)

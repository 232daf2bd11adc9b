"""Run one benchmark script at two commits, interleaved, and keep both JSON results side by side.

Why: on a shared machine the speed of the same code drifts by several times over an hour, so
a before/after figure is only worth reporting when both sides ran in one sitting. This checks
out each commit into a temporary git worktree, runs `<script> --out <json> <args>` there
alternately (before, after, before, after, ...) for --rounds rounds, and writes every
round's JSON under one file.

    python experiments/ab_commits.py --before=<rev> [--after=HEAD] \
        --script=experiments/bench_sampler.py --out=experiments/results/ab.json -- --no_hf

The script must accept --out; arguments after `--` go to it unchanged at both commits.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str:
  return subprocess.run(["git", "-C", REPO, *args], check=True, capture_output=True,
                        text=True).stdout.strip()


def main(argv: list[str]) -> None:
  if "--" in argv:
    split = argv.index("--")
    argv, script_args = argv[:split], argv[split + 1:]
  else:
    script_args = []
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--before", required=True)
  ap.add_argument("--after", default="HEAD")
  ap.add_argument("--script", required=True, help="path relative to the repository root")
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--out", required=True)
  args = ap.parse_args(argv)
  if args.rounds < 1:
    ap.error("--rounds must be at least 1")

  revs = {"before": _git("rev-parse", args.before), "after": _git("rev-parse", args.after)}
  results: dict = {"script": args.script, "script_args": script_args, "commits": revs,
                   "rounds": []}
  with tempfile.TemporaryDirectory(prefix="ab_commits_") as tmp:
    trees = {}
    for side, rev in revs.items():
      trees[side] = os.path.join(tmp, side)
      _git("worktree", "add", "--detach", trees[side], rev)
    try:
      for r in range(args.rounds):
        round_results = {}
        for side in ("before", "after"):
          out = os.path.join(tmp, f"{side}_{r}.json")
          script = os.path.join(trees[side], args.script)
          if not os.path.exists(script):
            raise SystemExit(f"{args.script} does not exist at {side} ({revs[side][:10]})")
          env = dict(os.environ, PYTHONPATH=trees[side])
          print(f"round {r + 1}/{args.rounds}: {side} ({revs[side][:10]})", flush=True)
          t0 = time.time()
          subprocess.run([sys.executable, script, "--out", out, *script_args], cwd=trees[side],
                         env=env, check=True)
          with open(out) as f:
            round_results[side] = json.load(f)
          round_results[side + "_wall_s"] = round(time.time() - t0, 1)
        results["rounds"].append(round_results)
    finally:
      for tree in trees.values():
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", tree],
                       capture_output=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main(sys.argv[1:])

"""Throughput and latency of the verifier: sandboxed executions/s and math verifications/s.

Run (from the repository root):

    python experiments/bench_verify.py --out experiments/results/bench_verify.json

Measures (1) a trivial program through `sandbox.run_python` from `--workers` threads over as many
fork servers, and (2) `math.is_equivalent` on a fixed mix of typical gold/answer pairs (integers,
decimals, fractions, LaTeX, expressions, tuples, hedges) whose numbers change on every call, so
no cache answers for it, and (3) the same on answers that need math-verify's LaTeX parser (the
slow path). Targets on a 2-core machine: >= 150 runs/s and
>= 300 verifications/s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

from r1jax.verify import math as math_lib
from r1jax.verify import sandbox

# Templates of typical (gold, answer) pairs; {a}, {b} are filled with fresh integers per call so
# no parse cache ever sees the same answer twice (golds repeat only per template, as a GRPO group
# shares one gold). 8 of 14 take the exact fast path, 6 the symbolic path.
TEMPLATES = [
    ('{a}', '{a}'), ('{a}', '{b}'), ('\\frac{{{a}}}{{{b}}}', '{a}/{b}'), ('{a}.5', '{c}/2'),
    ('{a}000', '{a},000'), ('{a}', 'x = {a}'), ('{a}', '{a} or {b}'), ('{a}\\%', '{a}'),
    ('{a}\\sqrt{{2}}', '\\sqrt{{{d}}}'), ('\\frac{{\\pi}}{{{a}}}', '\\pi/{a}'),
    ('({a}, {b})', '({a},{b})'), ('x^2 + {a}', '{a} + x^2'), ('{a}x', 'x \\cdot {a}'),
    ('\\frac{{{a}}}{{{b}}}', '\\dfrac{{{a}}}{{{b}}}'),
]


# Answers only math-verify's LaTeX parser handles (sets, half-open intervals, matrices, cube
# roots): the slow path, reported separately.
LATEX_TEMPLATES = [
    ('\\{{{a}, {b}\\}}', '\\{{{b}, {a}\\}}'), ('[{a}, {b})', '[{a},{b})'),
    ('\\begin{{pmatrix}}{a}&{b}\\end{{pmatrix}}', '\\begin{{bmatrix}}{a}&{b}\\end{{bmatrix}}'),
    ('\\sqrt[3]{{{a}}}', '{a}^{{1/3}}'),
]


def typical_pair(i: int, templates=None) -> tuple[str, str]:
  templates = templates or TEMPLATES
  gold_t, answer_t = templates[i % len(templates)]
  a, b = 3 + abs(i), 7 + 3 * abs(i)  # distinct for every i, so no cache ever repeats a pair
  fields = {'a': a, 'b': b, 'c': 2 * a + 1, 'd': 2 * a * a}
  return gold_t.format(**fields), answer_t.format(**fields)


def _percentile(values: list[float], q: float) -> float:
  ordered = sorted(values)
  return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_sandbox(workers: int, seconds: float) -> dict:
  pool = sandbox.SandboxPool(workers)
  pool.run('print(1)', '', sandbox.Limits())  # start the servers outside the timed window
  for _ in range(workers):
    pool.run('print(1)', '', sandbox.Limits())
  latencies: list[float] = []
  lock = threading.Lock()
  stop = time.monotonic() + seconds
  failures = [0]

  def loop():
    while time.monotonic() < stop:
      t0 = time.monotonic()
      result = pool.run('print(sum(range(10)))', '', sandbox.Limits(timeout_s=5.0))
      dt = time.monotonic() - t0
      with lock:
        latencies.append(dt)
        failures[0] += result.stdout != '45\n'

  start = time.monotonic()
  threads = [threading.Thread(target=loop) for _ in range(workers)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  elapsed = time.monotonic() - start
  pool.close()
  return {
      'workers': workers, 'runs': len(latencies), 'seconds': elapsed,
      'runs_per_s': len(latencies) / elapsed, 'failures': failures[0],
      'p50_ms': 1e3 * statistics.median(latencies), 'p99_ms': 1e3 * _percentile(latencies, 0.99),
  }


def bench_math(seconds: float, templates) -> dict:
  for i in range(len(templates)):  # start the guard processes outside the timed window
    math_lib.is_equivalent(*typical_pair(-1 - i, templates))
  latencies: list[float] = []
  stop = time.monotonic() + seconds
  start = time.monotonic()
  i = 0
  while time.monotonic() < stop:
    gold, answer = typical_pair(i, templates)
    i += 1
    t0 = time.monotonic()
    math_lib.is_equivalent(gold, answer)
    latencies.append(time.monotonic() - t0)
  elapsed = time.monotonic() - start
  return {
      'verifications': len(latencies), 'seconds': elapsed,
      'verifications_per_s': len(latencies) / elapsed,
      'p50_ms': 1e3 * statistics.median(latencies), 'p99_ms': 1e3 * _percentile(latencies, 0.99),
      'templates': len(templates), 'distinct_answers': True,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='experiments/results/bench_verify.json')
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--seconds', type=float, default=5.0)
  args = parser.parse_args()
  results = {
      'sandbox': bench_sandbox(args.workers, args.seconds),
      'math': bench_math(args.seconds, TEMPLATES),
      'math_latex_parser_only': bench_math(args.seconds, LATEX_TEMPLATES),
      'cpus': os.cpu_count(),
  }
  print(json.dumps(results, indent=2))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()

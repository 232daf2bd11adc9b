"""Verifies batches of completions in separate worker processes, overlapping the RL loop.

API:

    pool = VerifierPool(reward_fn, num_workers=2, item_timeout_s=10.0)
    future = pool.submit(batch)      # concurrent.futures.Future -> list[float]
    scores = pool.map(batch)         # blocking
    pool.stats()                     # Counter of outcome reasons ('ok', 'timeout', 'error:...')
    pool.compute_seconds()           # workers' seconds spent on finished items, summed
    pool.close()                     # or use it as a context manager

A batch is a sequence of dicts, each {'prompt': str, 'completion': str, **task_fields};
item i scores reward_fn(prompt, completion, **task_fields). reward_fn must be picklable (a
module-level function, or functools.partial of one, e.g. rewards.make_reward_fn(...)).

Guarantees: `submit`/`map` never raise because of an item. A malformed item, an exception in
the reward, a non-finite reward, a worker that misses the per-item deadline (measured from the
moment a worker takes the item) or a worker that dies all score 0.0, are counted in stats()
under their reason and logged. A late or stuck worker (even one stuck in native code, where no
Python signal handler runs) is SIGKILLed with its process group and replaced by a fresh one.
Workers run `python -m r1jax.verify.pool`, so nothing of the caller (JAX threads, the __main__
module) is forked or re-imported; inside a worker, symbolic math runs in-process because the
pool's deadline already bounds it.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import math
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time

from r1jax.verify import frames

_LOG = logging.getLogger(__name__)
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_LOG_FIRST = 20  # per reason, then every 100th


def _write(fd: int, obj) -> None:
  frames.write_blob(fd, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _read(fd: int):
  blob = frames.read_blob_or_none(fd)
  if blob is None:
    raise EOFError
  return pickle.loads(blob)


# ----------------------------------------------------------------------------- worker side


def _score_one(reward_fn, item) -> tuple[float, str]:
  if not isinstance(item, dict):
    return 0.0, 'bad_item:not_a_dict'
  fields = dict(item)
  prompt, completion = fields.pop('prompt', None), fields.pop('completion', None)
  if not isinstance(prompt, str) or not isinstance(completion, str):
    return 0.0, 'bad_item:prompt_or_completion'
  try:
    value = float(reward_fn(prompt, completion, **fields))
  except Exception as e:  # any failure of the reward is a 0 with a reason, never a crash
    return 0.0, f'error:{type(e).__name__}'
  if not math.isfinite(value):
    return 0.0, 'error:non_finite'
  return value, 'ok'


def worker_main(in_fd: int = 0, out_fd: int = 1) -> None:
  """Loop of a worker process: first frame is the reward fn, then (key, item) ->
  (key, score, reason, seconds the item took)."""
  out_fd = os.dup(out_fd)
  os.dup2(2, 1)  # stray prints from reward code go to stderr, not into the protocol
  from r1jax.verify import math as math_lib
  math_lib.run_symbolic_in_process(True)
  try:
    from r1jax.verify import symbolic
    symbolic.symbolic_equal('x+1', '1+x')  # warm the parser before reporting ready
  except Exception:  # pylint: disable=broad-except
    pass
  reward_fn = _read(in_fd)
  _write(out_fd, 'ready')
  while True:
    try:
      key, item = _read(in_fd)
    except EOFError:
      return
    t0 = time.perf_counter()
    value, reason = _score_one(reward_fn, item)
    _write(out_fd, (key, value, reason, time.perf_counter() - t0))


# ----------------------------------------------------------------------------- parent side


@dataclasses.dataclass
class _Job:
  future: concurrent.futures.Future
  scores: list
  left: int


class _Worker:

  def __init__(self, reward_blob: bytes):
    # The caller's import path, so reward functions from its modules unpickle in the worker.
    path = os.pathsep.join(p for p in sys.path if isinstance(p, str) and p)
    env = dict(os.environ, R1JAX_SANDBOX_SERVERS='1', PYTHONPATH=path)
    self.proc = subprocess.Popen(
        [sys.executable, '-m', 'r1jax.verify.pool'], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, cwd=_REPO_ROOT, env=env, start_new_session=True)
    self.in_fd = self.proc.stdin.fileno()
    self.out_fd = self.proc.stdout.fileno()
    try:
      frames.write_blob(self.in_fd, reward_blob)
    except OSError:  # died at start-up: its stdout reaches EOF and the dispatcher replaces it
      pass
    self.ready = False
    self.task = None  # (job, index, deadline)
    self.failed = None  # reason, when the current item could not even be sent

  def kill(self):
    try:
      os.killpg(self.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    self.proc.wait()
    self.proc.stdin.close()
    self.proc.stdout.close()


class VerifierPool:
  """See the module docstring."""

  def __init__(self, reward_fn, *, num_workers: int = 2, item_timeout_s: float = 10.0):
    if num_workers < 1:
      raise ValueError(f'num_workers must be >= 1, got {num_workers}')
    if not item_timeout_s > 0:
      raise ValueError(f'item_timeout_s must be > 0, got {item_timeout_s}')
    try:
      self._reward_blob = pickle.dumps(reward_fn, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
      raise ValueError(f'reward_fn must be picklable (module-level or a partial): {e}') from e
    self._timeout = float(item_timeout_s)
    self._lock = threading.Lock()
    self._pending: collections.deque = collections.deque()
    self._stats: collections.Counter = collections.Counter()
    self._compute_s = 0.0
    self._workers = [_Worker(self._reward_blob) for _ in range(num_workers)]
    self._wake_r, self._wake_w = os.pipe()
    self._closed = False
    self._start_failures = 0
    self._thread = threading.Thread(target=self._loop, name='VerifierPool', daemon=True)
    self._thread.start()

  # -- public API

  def submit(self, batch) -> concurrent.futures.Future:
    """Queues a batch; the future resolves to one float per item, in order."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    items = list(batch)
    if not items:
      future.set_result([])
      return future
    job = _Job(future, [0.0] * len(items), len(items))
    with self._lock:
      if self._closed:
        raise RuntimeError('VerifierPool is closed')
      self._pending.extend((job, i, item) for i, item in enumerate(items))
    os.write(self._wake_w, b'x')
    return future

  def map(self, batch) -> list[float]:
    return self.submit(batch).result()

  def stats(self) -> collections.Counter:
    with self._lock:
      return collections.Counter(self._stats)

  def compute_seconds(self) -> float:
    """Seconds the workers spent on finished items, summed over workers (as each measured
    it; an item that timed out counts its deadline, one whose worker died nothing)."""
    with self._lock:
      return self._compute_s

  def close(self):
    with self._lock:
      if self._closed:
        return
      self._closed = True
    os.write(self._wake_w, b'x')
    self._thread.join()
    for worker in self._workers:
      worker.kill()
    os.close(self._wake_r)
    os.close(self._wake_w)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # -- dispatcher thread

  def _finish(self, job: _Job, index: int, value: float, reason: str, seconds: float = 0.0):
    job.scores[index] = value
    with self._lock:
      self._compute_s += seconds
      self._stats[reason] += 1
      count = self._stats[reason]
    if reason != 'ok' and (count <= _LOG_FIRST or count % 100 == 0):
      _LOG.warning('verifier item scored 0 (%s; %d so far)', reason, count)
    job.left -= 1
    if job.left == 0:
      job.future.set_result(job.scores)

  def _replace(self, k: int):
    self._workers[k].kill()
    self._workers[k] = _Worker(self._reward_blob)

  def _loop(self):
    try:
      self._dispatch()
    except Exception as e:  # pylint: disable=broad-except
      _LOG.error('VerifierPool dispatcher stopped: %r', e)
      with self._lock:
        self._closed = True
        pending = list(self._pending)
        self._pending.clear()
      busy = [w.task for w in self._workers if w.task is not None]
      for job, index, _ in pending + busy:
        if not job.future.done():
          job.future.set_exception(RuntimeError(f'VerifierPool failed: {e!r}'))

  def _dispatch(self):
    while True:
      with self._lock:
        if self._closed:
          pending = list(self._pending)
          self._pending.clear()
          break
        for worker in self._workers:
          if worker.ready and worker.task is None and self._pending:
            job, index, item = self._pending.popleft()
            worker.task = (job, index, time.monotonic() + self._timeout)
            try:
              _write(worker.in_fd, ((index, id(job)), item))
            except (OSError, pickle.PicklingError, TypeError, AttributeError) as e:
              worker.task = (job, index, 0.0)  # handled below as a failure
              worker.failed = f'bad_item:{type(e).__name__}'
      now = time.monotonic()
      deadlines = [w.task[2] for w in self._workers if w.task is not None]
      wait = max(0.0, min(deadlines) - now) if deadlines else None
      fds = [self._wake_r] + [w.out_fd for w in self._workers]
      readable = select.select(fds, [], [], wait)[0]
      if self._wake_r in readable:
        os.read(self._wake_r, 4096)
      for k, worker in enumerate(self._workers):
        failed = worker.failed
        if failed is not None:
          worker.failed = None
          job, index, _ = worker.task
          worker.task = None
          self._finish(job, index, 0.0, failed)
          continue
        if worker.out_fd in readable:
          try:
            message = _read(worker.out_fd)
          except (EOFError, OSError, pickle.UnpicklingError):
            message = None
          if message == 'ready':
            worker.ready = True
            self._start_failures = 0
            continue
          if message is None:  # the worker died
            if not worker.ready:
              self._start_failures += 1
              if self._start_failures > 3:
                raise RuntimeError('verifier workers keep failing to start')
            if worker.task is not None:
              job, index, _ = worker.task
              self._finish(job, index, 0.0, 'worker_died')
            self._replace(k)
            continue
          (index, _), value, reason, seconds = message
          job, task_index, _ = worker.task
          worker.task = None
          self._finish(job, task_index, value, reason, seconds)
        elif worker.task is not None and time.monotonic() >= worker.task[2]:
          job, index, _ = worker.task
          self._finish(job, index, 0.0, 'timeout', self._timeout)
          self._replace(k)
    for job, index, _ in pending:
      if not job.future.done():
        job.future.set_exception(RuntimeError('VerifierPool closed before the item ran'))


if __name__ == '__main__':
  worker_main()

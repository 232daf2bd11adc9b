"""Runs untrusted Python (model-written programs) in an isolated, resource-limited sandbox.

API:

    run_python(code, *, stdin='', timeout_s=5.0, memory_mb=512, max_output_bytes=1 << 20)
        -> ExecResult(stdout, stderr, exit_code, timed_out, truncated, signal, wall_s)

Design (a fork server, so a run costs a few milliseconds instead of a fresh interpreter):

* Each server is one long-lived `bwrap` (bubblewrap) sandbox with new pid, net, ipc, uts (and
  cgroup where possible) namespaces; a new user namespace as well when the host is not root. Its
  mount namespace shows only read-only binds of /usr, /lib*, /bin, /etc/ld.so.cache and the Python
  installation, with every site-packages / dist-packages directory in them covered by an empty
  read-only tmpfs, a fresh /dev and /proc, and a tmpfs /tmp. The environment is cleared. It runs
  the source of `_sandbox_server.py`, passed as `python -I -S -c <source>` (so no mount shows where
  the checkout lives), which joins a new, empty session keyring, pre-imports the standard library
  and serves one request at a time.
* Per request the server forks a child that enters new mount, pid and SysV IPC namespaces with
  its own size-limited tmpfs /tmp and its own IPC limits (shared memory capped at memory_mb in
  all, see _sandbox_server._limit_sysv_ipc; where they cannot be written, the filter refuses
  shmget/msgget/semget instead). Its pid 1 forks the runner, which switches to a
  non-root uid (one per process and server slot, see sandbox_uid, when the host is root), enters a
  new user namespace (uid 65534 inside), drops all capabilities, sets no_new_privs and rlimits
  (address space, CPU, file size, open files, processes, no core dumps), joins a new, empty session
  keyring, installs a seccomp filter, and then exec()s the source with its own
  stdin/stdout/stderr pipes.
* The seccomp filter (classic BPF, x86_64 and aarch64; elsewhere set-up fails rather than run
  unfiltered) refuses: the kernel keyring calls (keyctl, add_key, request_key), memfd_create and
  memfd_secret, io_uring, unshare/setns/mount and the new mount API, clone() with namespace flags
  (clone3 reports ENOSYS so the C library falls back to clone), bpf, perf_event_open,
  userfaultfd, and socket()/socketpair() of any family but AF_UNIX, AF_INET, AF_INET6 and
  AF_NETLINK (AF_VSOCK and its kind are not scoped by the network namespace). It is inherited by
  every process of the run.
* The server reads stdout and stderr concurrently (select) with byte caps, feeds stdin, and at the
  wall-clock deadline SIGKILLs the request's pid 1: the kernel then kills every process in that pid
  namespace, including setsid/double-forked daemons. Its exit also does so after a normal run, and
  the run's IPC namespace (with every segment, queue and semaphore in it) goes with it.
* The host talks to each server over pipes and kills the whole bwrap process tree if the server
  itself stops answering.

Protects against: infinite loops and sleeps (wall clock + RLIMIT_CPU), fork bombs (RLIMIT_NPROC on
a non-root uid), memory bombs (RLIMIT_AS per process; SysV shared memory capped per run; memfd
refused; no new mounts), huge output (byte caps, the program is killed), disk fill (tmpfs size and
inode limits, RLIMIT_FSIZE), writes outside /tmp (read-only binds), reading host files outside the
bound system directories (/root, /home, /work, ... are not mounted) and the host environment
(cleared), host and cross-run kernel keys (a fresh session keyring per server and per run, and no
keyring calls at all for the program), network access (no interfaces but a private loopback;
socket families outside the network namespace refused, io_uring refused), signalling or ptracing
host processes and other requests (separate pid namespaces, different uid), daemonised survivors
(pid namespace teardown), leftovers between requests (fresh tmpfs and IPC namespace per request).

Memory: bounded are each process's address space (RLIMIT_AS: heap, stacks, every mapping,
attached shared memory included), files (tmpfs /tmp size, RLIMIT_FSIZE), and SysV shared memory
of the whole run (memory_mb in all, even when no process maps it). NOT bounded: the sum over a
run's processes (up to memory_mb x nproc, plus the shared-memory cap, when a program forks many
memory-hungry children: there is no cgroup memory limit; cgroup v2 is not assumed), and kernel
memory a program causes (pipe and socket buffers, page tables, POSIX message queues within
RLIMIT_MSGQUEUE).

Does NOT protect against: kernel exploits (the filter narrows, but does not close, the kernel
surface; namespaces share the host kernel), reading the world-readable system files that are
bound in (/usr, the Python install), the paths of those directories (e.g. where Python is
installed, visible in /proc/self/mountinfo), CPU-time side channels, or aggregate memory (above).
Processes of concurrent requests in different server slots compete for the same CPUs. When the
host user is not root, untrusted code runs under that user's host uid (inside its own user
namespace), so RLIMIT_NPROC counts all of that user's processes. It is a research-grade sandbox,
not a security boundary for adversaries who target the kernel.

Programs see the standard library only (site-packages and dist-packages directories are hidden,
not only left off sys.path), a run's own request (source, stdin, limits) and the server's source;
expected outputs are never sent in (see r1jax.verify.code). /dev/shm is not writable for them, so
POSIX semaphores (multiprocessing's locks and queues) are unavailable; threads, fork and
subprocess work.

Where bubblewrap or namespaces are unavailable, `run_python` raises SandboxUnavailableError unless
the caller passes `allow_unsafe=True` (or sets R1JAX_ALLOW_UNSAFE_EXEC=1), which runs the code in a
plain subprocess with rlimits and a process-group kill only: no isolation at all.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import queue
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

_SERVER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), '_sandbox_server.py')
_BASE_UID = 200_000  # see sandbox_uid
_SLOTS_PER_PROCESS = 64


def sandbox_uid(slot: int) -> int:
  """Host uid of server slot `slot` of this process (when the host is root).

  Every (process, slot) gets its own unprivileged uid, so RLIMIT_NPROC of one run never counts
  the processes of a concurrent run, and leftovers are easy to find by uid.
  """
  if not 0 <= slot < _SLOTS_PER_PROCESS:
    raise ValueError(f'slot must be in [0, {_SLOTS_PER_PROCESS}), got {slot}')
  return _BASE_UID + (os.getpid() % 4096) * _SLOTS_PER_PROCESS + slot
_HOST_GRACE_S = 10.0  # extra seconds the host waits for a server before killing it


class SandboxUnavailableError(RuntimeError):
  """Isolation cannot be set up on this machine and unsafe execution was not requested."""


@dataclasses.dataclass(frozen=True)
class ExecResult:
  """What a sandboxed run produced. exit_code is negative (-signal) when killed by a signal."""
  stdout: str
  stderr: str
  exit_code: int
  timed_out: bool
  truncated: bool = False
  signal: int | None = None
  wall_s: float = 0.0
  stdout_bytes: bytes = b''

  @property
  def ok(self) -> bool:
    return self.exit_code == 0 and not self.timed_out and not self.truncated


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-run resource limits. See run_python for the meaning of each field."""
  timeout_s: float = 5.0
  memory_mb: int = 512
  max_output_bytes: int = 1 << 20
  cpu_s: int | None = None  # default: ceil(timeout_s) + 1
  file_mb: int = 16
  tmp_mb: int = 32
  nofile: int = 64
  nproc: int = 32

  def validate(self):
    if not self.timeout_s > 0:
      raise ValueError(f'timeout_s must be > 0, got {self.timeout_s}')
    for name in ('memory_mb', 'max_output_bytes', 'file_mb', 'tmp_mb', 'nofile', 'nproc'):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f'{name} must be a positive int, got {value!r}')
    if self.memory_mb < 64:
      raise ValueError(f'memory_mb must be >= 64 (the interpreter needs it), got {self.memory_mb}')


def _bind_args() -> list[str]:
  args = []
  for path in ('/usr', '/lib', '/lib64', '/lib32', '/bin', '/sbin'):
    if os.path.islink(path):
      args += ['--symlink', os.readlink(path), path]
    elif os.path.isdir(path):
      args += ['--ro-bind', path, path]
  args += ['--ro-bind-try', '/etc/ld.so.cache', '/etc/ld.so.cache']
  prefix = os.path.realpath(sys.base_prefix)
  if not prefix.startswith('/usr/'):
    parts = prefix.strip('/').split('/')
    for i in range(1, len(parts)):  # parents bwrap would otherwise create with mode 0700
      args += ['--perms', '0755', '--dir', '/' + '/'.join(parts[:i])]
    args += ['--ro-bind', prefix, prefix]
  for packages in _site_packages_dirs():
    args += ['--tmpfs', packages, '--remount-ro', packages]
  return args


def _site_packages_dirs() -> list[str]:
  """Third-party package directories inside the bound directories, hidden by empty mounts.

  `python -I -S` keeps them off sys.path, but a program could put them back; hiding them keeps
  the promise that programs see the standard library only.
  """
  prefixes = {os.path.realpath(sys.base_prefix), '/usr', '/usr/local'}
  found = set()
  for prefix in prefixes:
    for pattern in ('lib*/python3*/site-packages', 'lib*/python3*/dist-packages',
                    'lib/python3/dist-packages'):
      found.update(os.path.realpath(p) for p in glob.glob(os.path.join(prefix, pattern)))
  return sorted(p for p in found if os.path.isdir(p))


def bwrap_command(python: str | None = None) -> list[str]:
  """The command line of one sandbox server (exposed for tests and debugging)."""
  bwrap = shutil.which('bwrap')
  if bwrap is None:
    raise SandboxUnavailableError(
        'bubblewrap (bwrap) is not installed: `apt-get install bubblewrap`, or pass '
        'allow_unsafe=True to run untrusted code WITHOUT isolation.')
  python = python or os.path.realpath(sys.executable)
  caps = []
  # CAP_SETFCAP: without root on the host, the runner's user namespace maps the server's uid 0,
  # which the kernel (>= 5.12) allows only to holders of CAP_SETFCAP.
  for cap in ('CAP_SYS_ADMIN', 'CAP_SETUID', 'CAP_SETGID', 'CAP_SETFCAP'):
    caps += ['--cap-add', cap]
  user = [] if os.geteuid() == 0 else ['--unshare-user', '--uid', '0', '--gid', '0']
  return [
      bwrap, *user, '--unshare-pid', '--unshare-net', '--unshare-ipc', '--unshare-uts',
      '--unshare-cgroup-try', '--die-with-parent', '--new-session', '--clearenv',
      '--setenv', 'PATH', '/usr/bin:/bin', '--setenv', 'LANG', 'C.UTF-8',
      '--setenv', 'HOME', '/tmp', '--setenv', 'PYTHONDONTWRITEBYTECODE', '1',
      *_bind_args(), '--tmpfs', '/tmp', '--proc', '/proc', '--dev', '/dev',
      '--hostname', 'sandbox', '--chdir', '/tmp', *caps,
      python, '-I', '-S', '-c', _server_source(),
  ]


@functools.lru_cache(maxsize=1)
def _server_source() -> str:
  # Passed as `-c` text rather than bound in as a file, so no mount shows the checkout's path.
  with open(_SERVER_PATH, encoding='utf-8') as f:
    return f.read()


class _Server:
  """One bwrap fork server, used by one caller at a time."""

  def __init__(self, slot: int):
    self.slot = slot
    self.proc = None

  def start(self):
    self.proc = subprocess.Popen(
        bwrap_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True, close_fds=True)
    line = self._read(6, time.monotonic() + 30.0)
    if line != b'READY\n':
      err = self._kill_and_collect_stderr()
      raise SandboxUnavailableError(f'sandbox server failed to start: {err.strip()!r}')

  def _kill_and_collect_stderr(self) -> str:
    self.close()
    try:
      return self.proc.stderr.read().decode('utf-8', 'replace')[-2000:]
    except (OSError, ValueError):
      return ''

  def close(self):
    if self.proc is not None and self.proc.poll() is None:
      try:
        os.killpg(self.proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      self.proc.wait()

  def _read(self, n: int, deadline: float) -> bytes:
    fd = self.proc.stdout.fileno()
    buf = b''
    while len(buf) < n:
      left = deadline - time.monotonic()
      if left <= 0 or not select.select([fd], [], [], left)[0]:
        raise TimeoutError('sandbox server did not answer in time')
      chunk = os.read(fd, n - len(buf))
      if not chunk:
        raise EOFError('sandbox server exited')
      buf += chunk
    return buf

  def run(self, code: bytes, stdin: bytes, req: dict) -> tuple[dict, bytes, bytes]:
    if self.proc is None or self.proc.poll() is not None:
      self.start()
    req = dict(req, code_len=len(code), stdin_len=len(stdin))
    blob = json.dumps(req).encode()
    try:
      self.proc.stdin.write(struct.pack('>I', len(blob)) + blob + code + stdin)
      self.proc.stdin.flush()
      deadline = time.monotonic() + req['timeout_s'] + _HOST_GRACE_S
      (size,) = struct.unpack('>I', self._read(4, deadline))
      header = json.loads(self._read(size, deadline))
      out = self._read(header.get('stdout_len', 0), deadline)
      err = self._read(header.get('stderr_len', 0), deadline)
    except (OSError, EOFError, TimeoutError, ValueError) as e:
      self.close()
      raise RuntimeError(f'sandbox server failed: {e!r}') from e
    return header, out, err


class SandboxPool:
  """A fixed set of fork servers shared by threads; `run` blocks until a server is free."""

  def __init__(self, num_servers: int = 2):
    if not 1 <= num_servers <= _SLOTS_PER_PROCESS:
      raise ValueError(f'num_servers must be in [1, {_SLOTS_PER_PROCESS}], got {num_servers}')
    self._idle: queue.Queue[_Server] = queue.Queue()
    self._all = [_Server(slot) for slot in range(num_servers)]
    for server in self._all:
      self._idle.put(server)

  def run(self, code: str, stdin: str | bytes, limits: Limits) -> ExecResult:
    limits.validate()
    server = self._idle.get()
    try:
      req = {
          'timeout_s': float(limits.timeout_s),
          'memory_mb': limits.memory_mb,
          'max_output_bytes': limits.max_output_bytes,
          'cpu_s': limits.cpu_s or int(limits.timeout_s) + 1,
          'file_mb': limits.file_mb,
          'tmp_mb': limits.tmp_mb,
          'nofile': limits.nofile,
          'nproc': limits.nproc,
          'uid': sandbox_uid(server.slot) if os.geteuid() == 0 else 0,
      }
      stdin_b = stdin.encode('utf-8') if isinstance(stdin, str) else bytes(stdin)
      header, out, err = server.run(code.encode('utf-8', 'surrogatepass'), stdin_b, req)
    finally:
      self._idle.put(server)
    if 'server_error' in header:
      raise RuntimeError(f'sandbox server error: {header["server_error"]}')
    if header.get('setup_error'):
      raise SandboxUnavailableError(f'sandbox set-up failed: {header["setup_error"]}')
    if header['exit_code'] == 126 and err.startswith(b'sandbox setup failed'):
      raise SandboxUnavailableError(err.decode('utf-8', 'replace').strip())
    return ExecResult(
        stdout=out.decode('utf-8', 'replace'), stderr=err.decode('utf-8', 'replace'),
        exit_code=header['exit_code'], timed_out=header['timed_out'],
        truncated=header['truncated'], signal=header['signal'], wall_s=header['wall_s'],
        stdout_bytes=out)

  def close(self):
    for server in self._all:
      server.close()


_DEFAULT_POOL: SandboxPool | None = None
_DEFAULT_LOCK = threading.Lock()


def default_pool() -> SandboxPool:
  """The process-wide pool (R1JAX_SANDBOX_SERVERS servers, default 2), started on first use."""
  global _DEFAULT_POOL
  with _DEFAULT_LOCK:
    if _DEFAULT_POOL is None:
      _DEFAULT_POOL = SandboxPool(int(os.environ.get('R1JAX_SANDBOX_SERVERS', '2')))
    return _DEFAULT_POOL


_UNSAFE_PRELUDE = """
import resource, sys
for kind, soft, hard in ((resource.RLIMIT_AS, {mem}, {mem}), (resource.RLIMIT_CPU, {cpu}, {cpu} + 1),
                         (resource.RLIMIT_FSIZE, {fsize}, {fsize})):
  resource.setrlimit(kind, (soft, hard))
source = sys.argv.pop(1)
exec(compile(source, 'solution.py', 'exec'), {{'__name__': '__main__'}})
"""


def _unsafe_run(code: str, stdin: str | bytes, limits: Limits) -> ExecResult:
  """No isolation: a plain subprocess with rlimits, killed by process group at the deadline."""
  mb = 1 << 20
  prelude = _UNSAFE_PRELUDE.format(mem=limits.memory_mb * mb, fsize=limits.file_mb * mb,
                                   cpu=limits.cpu_s or int(limits.timeout_s) + 1)
  stdin_b = stdin.encode('utf-8') if isinstance(stdin, str) else bytes(stdin)
  start = time.monotonic()
  proc = subprocess.Popen([sys.executable, '-I', '-c', prelude, code], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                          env={'PATH': '/usr/bin:/bin'})
  timed_out = False
  try:
    out, err = proc.communicate(stdin_b, timeout=limits.timeout_s)
  except subprocess.TimeoutExpired:
    timed_out = True
    os.killpg(proc.pid, signal.SIGKILL)
    try:  # a setsid() escapee may still hold the pipes: do not wait for it
      out, err = proc.communicate(timeout=2.0)
    except subprocess.TimeoutExpired:
      proc.stdout.close(), proc.stderr.close()
      proc.wait()
      out, err = b'', b''
  cap = limits.max_output_bytes
  truncated = len(out) > cap or len(err) > cap
  out, err = out[:cap], err[:cap]
  code_ = proc.returncode
  return ExecResult(out.decode('utf-8', 'replace'), err.decode('utf-8', 'replace'), code_,
                    timed_out, truncated, -code_ if code_ < 0 else None,
                    time.monotonic() - start, out)


def run_python(code: str, *, stdin: str | bytes = '', timeout_s: float = 5.0,
               memory_mb: int = 512, max_output_bytes: int = 1 << 20,
               allow_unsafe: bool = False, pool: SandboxPool | None = None,
               **limit_overrides) -> ExecResult:
  """Runs `code` as a Python program (as if `python solution.py < stdin`) in the sandbox.

  Args:
    code: the program source.
    stdin: bytes or text fed to its standard input.
    timeout_s: wall-clock limit; at expiry every process of the run is killed.
    memory_mb: address-space limit (RLIMIT_AS) of each process, and the cap on the run's
      SysV shared memory in all (see the module docstring for what is not bounded).
    max_output_bytes: cap on each of stdout and stderr; exceeding it kills the run
      (truncated=True).
    allow_unsafe: if isolation is unavailable, run without it instead of raising.
    pool: a SandboxPool (default: the process-wide one).
    **limit_overrides: other Limits fields (cpu_s, file_mb, tmp_mb, nofile, nproc).

  Raises:
    SandboxUnavailableError: isolation is unavailable and allow_unsafe is False.
    ValueError: a limit is invalid, or code is not a str.
  """
  if not isinstance(code, str):
    raise ValueError(f'code must be a str, got {type(code).__name__}')
  limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes,
                  **limit_overrides)
  limits.validate()
  unsafe = allow_unsafe or os.environ.get('R1JAX_ALLOW_UNSAFE_EXEC') == '1'
  try:
    return (pool or default_pool()).run(code, stdin, limits)
  except SandboxUnavailableError:
    if not unsafe:
      raise
  return _unsafe_run(code, stdin, limits)

"""Adversarial programs: each must earn no credit from code.score and leave the host unharmed.

Every case is scored against tests that only the attack succeeding could pass (expected values
the program cannot know, or output it could print only after escaping). After each case the host
is checked: no process of a sandbox uid survives, host files are untouched, this process lives.
"""
from __future__ import annotations

import ctypes
import os
import secrets
import socket
import threading
import time

import pytest

from r1jax.verify import code as code_lib
from r1jax.verify import sandbox

pytestmark = pytest.mark.skipif(
    __import__('shutil').which('bwrap') is None, reason='bubblewrap is not installed')

TOKEN = secrets.token_hex(8)
TOKEN_INT = secrets.randbelow(10**12) + 10**11
HOST_TMP = f'/tmp/r1jax_host_{TOKEN}'
HOST_SECRET_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), f'.secret_{TOKEN}')
SECRET_ENV = 'R1JAX_TEST_SECRET'
EXPECT_PASS = [{'stdin': '', 'expected_stdout': 'PASS'}]
SECRET_FN = [{'fn': 'f', 'args': [], 'expected': TOKEN},
             {'fn': 'f', 'args': [1], 'expected': TOKEN_INT}]
T = 1.5  # seconds per sandboxed run in this file
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# (keyctl, add_key) system call numbers, written out here rather than taken from the server.
KEYCTL, ADD_KEY = {'x86_64': (250, 248), 'aarch64': (219, 217)}.get(os.uname().machine, (-1, -1))


def _sandbox_uid_processes() -> list[int]:
  found = []
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/status') as f:
        for line in f:
          if line.startswith('Uid:'):
            uid = int(line.split()[1])
            if sandbox.sandbox_uid(0) <= uid <= sandbox.sandbox_uid(63):
              found.append(int(entry))
            break
    except OSError:
      continue
  return found


# (id, program, tests). Programs print PASS / return the secret only if the attack worked.
CASES = [
    ('infinite_loop_catching_baseexception',
     'while True:\n  try:\n    pass\n  except BaseException:\n    pass', EXPECT_PASS),
    ('ignore_sigalrm_sigterm_sigint',
     'import signal\nfor s in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGXCPU):\n'
     '  signal.signal(s, signal.SIG_IGN)\nwhile True: pass', EXPECT_PASS),
    ('sleep_forever', 'import time\ntime.sleep(10**6)\nprint("PASS")', EXPECT_PASS),
    ('fork_bomb',
     'import os\nwhile True:\n  try:\n    os.fork()\n  except OSError:\n    pass', EXPECT_PASS),
    ('setsid_double_fork_survivor',
     'import os, time\nif os.fork() == 0:\n  os.setsid()\n  if os.fork() == 0:\n'
     '    time.sleep(30)\n    print("PASS", flush=True)\n  os._exit(0)\n', EXPECT_PASS),
    ('thread_left_running',
     'import threading, time\ndef late():\n  time.sleep(0.3)\n  print("PASS", flush=True)\n'
     'threading.Thread(target=late).start()\nprint("FAIL")', EXPECT_PASS),
    ('memory_bomb_one_shot', 'x = bytearray(50 * 1024**3)\nprint("PASS")', EXPECT_PASS),
    ('memory_bomb_growing',
     'chunks = []\nwhile True:\n  chunks.append(bytearray(50 * 1024**2))', EXPECT_PASS),
    ('memory_bomb_in_forked_children',
     'import os\nfor _ in range(64):\n  try:\n    if os.fork() == 0:\n'
     '      x = bytearray(400 * 1024**2)\n      import time; time.sleep(30)\n'
     '  except OSError:\n    pass\nimport time\ntime.sleep(30)', EXPECT_PASS),
    ('huge_output', 'import sys\nwhile True:\n  sys.stdout.write("PASS" * 100000)', EXPECT_PASS),
    ('huge_stderr_then_pass',
     'import sys\nsys.stderr.write("x" * (1 << 24))\nprint("PASS")', EXPECT_PASS),
    ('invalid_utf8_output', 'import sys\nsys.stdout.buffer.write(b"\\xffPA\\xfeSS")', EXPECT_PASS),
    ('disk_fill',
     'n = 0\ntry:\n  with open("/tmp/fill", "wb") as f:\n    while True:\n'
     '      f.write(b"0" * (1 << 20)); f.flush(); n += 1\nexcept BaseException:\n  pass\n'
     'print("PASS" if n > 256 else "FAIL")', EXPECT_PASS),
    ('write_outside_sandbox',  # /tmp is the private tmpfs: writable, but not the host's /tmp
     f'open({HOST_TMP!r}, "w").write("x")\nok = 0\nfor p in ("/etc/r1jax_pwned", "/usr/r1jax_pwned", '
     f'{os.path.dirname(HOST_SECRET_FILE) + "/pwned"!r}):\n'
     '  try:\n    open(p, "w").write("x"); ok += 1\n  except OSError:\n    pass\n'
     'print("PASS" if ok else "FAIL")', EXPECT_PASS),
    ('read_host_file', f'print(open({HOST_SECRET_FILE!r}).read())',
     [{'stdin': '', 'expected_stdout': TOKEN}]),
    ('read_shadow_and_root_home',
     'import os\nout = []\nfor p in ("/etc/shadow", "/root/.bash_history", "/root/.ssh/id_rsa"):\n'
     '  try:\n    out.append(open(p).read())\n  except OSError:\n    pass\n'
     'print("PASS" if out else "FAIL")', EXPECT_PASS),
    ('environment_secret', f'import os\nprint(os.environ.get({SECRET_ENV!r}, "missing"))',
     [{'stdin': '', 'expected_stdout': TOKEN}]),
    ('dns_lookup', 'import socket\nsocket.gethostbyname("example.com")\nprint("PASS")',
     EXPECT_PASS),
    ('outside_connect', 'import socket\nsocket.create_connection(("1.1.1.1", 53), timeout=1)\n'
     'print("PASS")', EXPECT_PASS),
    ('kill_parent_and_everyone',
     'import os, signal\nfor pid in (os.getppid(), 1, -1, ' + str(os.getpid()) + '):\n'
     '  try:\n    os.kill(pid, signal.SIGKILL)\n  except OSError:\n    pass\nprint("FAIL")',
     EXPECT_PASS),
    ('sys_exit_zero_before_tests', 'import sys\nsys.exit(0)\ndef f(*a): return 0', SECRET_FN),
    ('os_exit_zero_before_tests', 'import os\nos._exit(0)', SECRET_FN),
    ('raise_systemexit_in_function', 'def f(*a):\n  raise SystemExit(0)', SECRET_FN),
    ('abort_in_function', 'import os\ndef f(*a):\n  os.abort()', SECRET_FN),
    ('ctypes_segfault', 'import ctypes\ndef f(*a):\n  ctypes.string_at(0)', SECRET_FN),
    ('rigged_eq_object',
     'class A:\n  def __eq__(self, o): return True\n  def __ne__(self, o): return False\n'
     '  def __bool__(self): return True\n  __hash__ = object.__hash__\ndef f(*a): return A()',
     SECRET_FN),
    ('subclassed_int',
     'class I(int):\n  def __eq__(self, o): return True\n  __hash__ = int.__hash__\n'
     'def f(*a): return I(0)', SECRET_FN),
    ('subclassed_str',
     'class S(str):\n  def __eq__(self, o): return True\n  __hash__ = str.__hash__\n'
     'def f(*a): return S("x")', SECRET_FN),
    ('subclassed_list',
     'class L(list):\n  def __eq__(self, o): return True\ndef f(*a): return L()', SECRET_FN),
    ('patched_builtins_and_json',
     'import builtins, json\nbuiltins.type = lambda x: int\nbuiltins.isinstance = lambda *a: True\n'
     'json.dumps = lambda *a, **k: "7"\ndef f(*a): return object()', SECRET_FN),
    ('patched_harness_objects_via_frames',
     'import sys, gc\ndef f(*a):\n  fr = sys._getframe(1)\n  g = fr.f_globals\n'
     '  g["_plain"] = lambda x, depth=0: 7\n  for i in range(5):\n'
     '    g["_emit"](i, "ok", 7)\n  return 7', SECRET_FN),
    ('atexit_prints_pass',
     'import atexit, sys\natexit.register(lambda: print("PASS"))\nsys.exit(1)', EXPECT_PASS),
    ('frame_walk_to_expected',
     'import gc, sys\ndef f(*a):\n  for o in gc.get_objects():\n'
     '    if isinstance(o, dict) and "expected" in o:\n      return o["expected"]\n'
     '  fr = sys._getframe()\n  while fr:\n    for v in list(fr.f_locals.values()) + '
     'list(fr.f_globals.values()):\n      if isinstance(v, list) and v and isinstance(v[0], dict)'
     ' and "expected" in v[0]:\n        return v[0]["expected"]\n    fr = fr.f_back\n'
     '  return None', SECRET_FN),
    ('deep_recursion',
     'import sys\nsys.setrecursionlimit(10**7)\ndef r(n): return r(n + 1) + 1\nr(0)\n'
     'print("PASS")', EXPECT_PASS),
    ('print_pass_then_crash', 'print("PASS")\nraise RuntimeError("late crash")', EXPECT_PASS),
    ('prefix_only_output', 'print("PA")', EXPECT_PASS),
    ('setuid_root_escalation', 'import os\nos.setuid(0)\nprint("PASS")', EXPECT_PASS),
    ('ptrace_parent',
     'import ctypes, os\nlibc = ctypes.CDLL(None)\n'
     'print("PASS" if libc.ptrace(16, os.getppid(), 0, 0) == 0 else "FAIL")', EXPECT_PASS),
    ('forged_record_nested_past_the_recursion_limit',
     'import os, sys\ndef f(*a):\n  g = sys._getframe(1).f_globals\n'
     '  line = g["_NONCE"] + " 0 ok " + "[" * 200000 + "]" * 200000 + "\\n"\n'
     '  os.write(g["_emit_fd"], line.encode())\n  os._exit(0)', SECRET_FN),
    ('forged_record_with_odd_index_digits',
     'import os, sys\ndef f(*a):\n  g = sys._getframe(1).f_globals\n'
     '  for i in ("\\u00b2", "9" * 5000, "0" * 3 + "1"):\n'
     '    os.write(g["_emit_fd"], (g["_NONCE"] + " " + i + " ok 7\\n").encode())\n'
     '  os._exit(0)', SECRET_FN),
    # Kernel state that namespaces do not cover, and memory outside RLIMIT_AS (memory_mb=256).
    ('session_keyring_reachable',  # KEYCTL_GET_KEYRING_ID of KEY_SPEC_SESSION_KEYRING
     f'import ctypes\nlibc = ctypes.CDLL(None)\n'
     f'print("PASS" if libc.syscall({KEYCTL}, 0, -3, 0) > 0 else "FAIL")', EXPECT_PASS),
    ('sysv_shm_beyond_memory_limit',
     'import ctypes\nlibc = ctypes.CDLL(None)\nlibc.shmat.restype = ctypes.c_void_p\nheld = 0\n'
     'for _ in range(8):\n  sid = libc.shmget(0, 48 << 20, 0o1600)\n  if sid < 0: break\n'
     '  addr = libc.shmat(sid, None, 0)\n  if addr in (None, 2**64 - 1): break\n'
     '  ctypes.memset(addr, 1, 48 << 20)\n  libc.shmdt(ctypes.c_void_p(addr))\n  held += 48\n'
     'print("PASS" if held > 300 else "FAIL")', EXPECT_PASS),
    ('memfd_beyond_memory_limit',
     'import os\nfds = []\ntry:\n  for _ in range(40):\n    fd = os.memfd_create("m")\n'
     '    os.ftruncate(fd, 10 << 20)\n    os.write(fd, b"x" * (10 << 20))\n    fds.append(fd)\n'
     'except OSError:\n  pass\nprint("PASS" if len(fds) * 10 > 300 else "FAIL")', EXPECT_PASS),
    ('nested_user_namespace_for_a_private_tmpfs',
     'import ctypes\nlibc = ctypes.CDLL(None)\n'
     'print("PASS" if libc.unshare(0x10000000 | 0x20000) == 0 else "FAIL")', EXPECT_PASS),
    ('vsock_socket_created',  # creation only: never connect or send over vsock
     'import socket\ns = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\nprint("PASS")',
     EXPECT_PASS),
    ('io_uring_instance_created',  # io_uring makes sockets without the socket() call
     'import ctypes\nlibc = ctypes.CDLL(None)\nparams = ctypes.create_string_buffer(120)\n'
     'print("PASS" if libc.syscall(425, 4, params) >= 0 else "FAIL")', EXPECT_PASS),
    ('checkout_path_in_mountinfo',
     f'print("PASS" if {REPO_ROOT!r} in open("/proc/self/mountinfo").read() else "FAIL")',
     EXPECT_PASS),
    ('third_party_packages_readable',
     'import os, sys\nd = os.path.join(sys.base_prefix, "lib", "python%d.%d" % sys.version_info[:2],'
     ' "site-packages")\nprint("PASS" if os.listdir(d) else "FAIL")', EXPECT_PASS),
]


@pytest.fixture(scope='module', autouse=True)
def _host_secrets():
  with open(HOST_SECRET_FILE, 'w') as f:
    f.write(TOKEN)
  os.environ[SECRET_ENV] = TOKEN
  yield
  os.environ.pop(SECRET_ENV, None)
  os.remove(HOST_SECRET_FILE)


def test_there_are_at_least_thirty_attacks():
  assert len(CASES) >= 30
  assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize('name,program,tests', CASES, ids=[c[0] for c in CASES])
def test_attack_earns_nothing_and_host_is_unharmed(name, program, tests):
  start = time.monotonic()
  result = code_lib.score(program, tests, timeout_s=T, memory_mb=256)
  elapsed = time.monotonic() - start
  assert result.passed == 0 and result.reward == 0.0, (name, result.details)
  assert elapsed < 10 * T, f'{name} took {elapsed:.1f}s'
  # The host: no survivor of a sandbox uid, no file written, this process alive, sandbox usable.
  deadline = time.monotonic() + 2.0
  while _sandbox_uid_processes() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert _sandbox_uid_processes() == []
  for path in (HOST_TMP, '/etc/r1jax_pwned', '/usr/r1jax_pwned',
               os.path.join(os.path.dirname(HOST_SECRET_FILE), 'pwned')):
    assert not os.path.exists(path), path
  assert sandbox.run_python('print(6 * 7)', timeout_s=5).stdout == '42\n'


def test_control_programs_do_earn_credit():
  """The harness is not simply failing everything: honest programs pass the same test shapes."""
  assert code_lib.score('print("PASS")', EXPECT_PASS).reward == 1.0
  honest = f'def f(*a):\n  return {TOKEN!r} if not a else {TOKEN_INT}'
  assert code_lib.score(honest, SECRET_FN).reward == 1.0


def test_loopback_listener_on_host_gets_no_connection():
  listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  listener.bind(('127.0.0.1', 0))
  listener.listen(1)
  listener.settimeout(0.1)
  port = listener.getsockname()[1]
  program = (f'import socket\ns = socket.create_connection(("127.0.0.1", {port}), timeout=1)\n'
             's.sendall(b"hello")\nprint("PASS")')
  result = code_lib.score(program, EXPECT_PASS, timeout_s=T)
  assert result.reward == 0.0
  with pytest.raises(socket.timeout):
    listener.accept()
  listener.close()


def test_port_bound_inside_sandbox_is_not_reachable_from_host():
  probe = socket.socket()
  probe.bind(('127.0.0.1', 0))
  port = probe.getsockname()[1]
  probe.close()
  program = (f'import socket\ns = socket.socket()\ns.bind(("0.0.0.0", {port}))\ns.listen(1)\n'
             's.settimeout(1.0)\nc, _ = s.accept()\nprint("PASS")')
  outcome = {}
  runner = threading.Thread(
      target=lambda: outcome.update(r=code_lib.score(program, EXPECT_PASS, timeout_s=2.0)))
  runner.start()
  refused = 0
  for _ in range(10):
    time.sleep(0.1)
    try:
      socket.create_connection(('127.0.0.1', port), timeout=0.2).close()
    except OSError:
      refused += 1
  runner.join()
  assert refused == 10
  assert outcome['r'].reward == 0.0


def test_untrusted_code_runs_as_non_root_in_fresh_namespaces():
  program = ('import os, socket\n'
             'print(os.getuid(), os.getpid(), sorted(n for _, n in socket.if_nameindex()))\n'
             'print(sorted(os.listdir("/")))\n'
             'print(open("/proc/self/status").read().split("CapEff:")[1].split()[0])')
  result = sandbox.run_python(program, timeout_s=5)
  uid_pid, root_listing, cap_eff = result.stdout.strip().split('\n')
  assert uid_pid == "65534 2 ['lo']"
  assert 'work' not in root_listing and 'home' not in root_listing
  assert int(cap_eff, 16) == 0


def test_tmp_is_private_per_run():
  sandbox.run_python('open("/tmp/left_behind", "w").write("x")', timeout_s=5)
  result = sandbox.run_python('import os\nprint(os.path.exists("/tmp/left_behind"))',
                              timeout_s=5)
  assert result.stdout == 'False\n'


def _keyctl(*args) -> int:
  libc = ctypes.CDLL(None, use_errno=True)
  libc.syscall.restype = ctypes.c_long
  return libc.syscall(ctypes.c_long(KEYCTL), *[ctypes.c_long(a) if isinstance(a, int) else a
                                               for a in args])


@pytest.mark.skipif(KEYCTL < 0, reason='no keyctl numbers for this architecture')
def test_host_session_keyring_is_out_of_reach():
  """A key in the host's session keyring: the sandbox can neither read, revoke nor add to it."""
  if _keyctl(0, -3, 0) <= 0:  # KEYCTL_GET_KEYRING_ID: give this process a session keyring
    assert _keyctl(1, None) > 0
  libc = ctypes.CDLL(None, use_errno=True)
  libc.syscall.restype = ctypes.c_long
  description = f'r1jax_test_{TOKEN}'.encode()
  key = libc.syscall(ctypes.c_long(ADD_KEY), b'user', description, TOKEN.encode(),
                     ctypes.c_long(len(TOKEN)), ctypes.c_long(-3))
  assert key > 0
  pool = sandbox.SandboxPool(1)  # a server started after the key exists
  try:
    program = (
        'import ctypes\nlibc = ctypes.CDLL(None)\nlibc.syscall.restype = ctypes.c_long\n'
        'buf = ctypes.create_string_buffer(64)\n'
        f'found = libc.syscall({KEYCTL}, 10, -3, b"user", {description!r}, 0)\n'  # SEARCH
        f'n = libc.syscall({KEYCTL}, 11, {key}, buf, 64)\n'  # READ by the host's serial
        f'libc.syscall({KEYCTL}, 3, {key})\n'  # REVOKE
        f'libc.syscall({ADD_KEY}, b"user", b"planted_{TOKEN}", b"x", 1, -3)\n'
        'print(found, buf.raw[:max(n, 0)].decode(errors="replace"))')
    result = pool.run(program, '', sandbox.Limits(timeout_s=5))
    assert result.exit_code == 0, result.stderr
    assert TOKEN not in result.stdout
    buf = ctypes.create_string_buffer(64)
    assert _keyctl(11, key, buf, 64) == len(TOKEN) and buf.raw[:len(TOKEN)] == TOKEN.encode()
    assert _keyctl(10, -3, b'user', f'planted_{TOKEN}'.encode(), 0) < 0  # nothing was added
  finally:
    pool.close()
    _keyctl(9, key, -3)  # KEYCTL_UNLINK


def test_sysv_ipc_objects_do_not_outlive_their_run():
  """A segment and a queue made by one run are gone for the next run on the same server."""
  key = secrets.randbelow(2**30) + 1
  make = ('import ctypes\nlibc = ctypes.CDLL(None)\nlibc.shmat.restype = ctypes.c_void_p\n'
          f'sid = libc.shmget({key}, 4096, 0o1666)\naddr = libc.shmat(sid, None, 0)\n'
          f'ctypes.memmove(addr, {TOKEN!r}.encode(), {len(TOKEN)})\n'
          f'qid = libc.msgget({key}, 0o1666)\nmsg = ctypes.create_string_buffer(8 + {len(TOKEN)})\n'
          f'ctypes.memmove(ctypes.addressof(msg), (1).to_bytes(8, "little") + {TOKEN!r}.encode(), '
          f'8 + {len(TOKEN)})\nprint(sid >= 0, qid >= 0, libc.msgsnd(qid, msg, {len(TOKEN)}, 0))')
  look = ('import ctypes\nlibc = ctypes.CDLL(None)\n'
          f'print(libc.shmget({key}, 0, 0) >= 0 or libc.msgget({key}, 0) >= 0)')
  pool = sandbox.SandboxPool(1)
  try:
    made = pool.run(make, '', sandbox.Limits(timeout_s=5))
    assert made.stdout == 'True True 0\n', made.stderr  # the run itself may use SysV IPC
    assert pool.run(look, '', sandbox.Limits(timeout_s=5)).stdout == 'False\n'
  finally:
    pool.close()


def test_filter_keeps_what_honest_programs_use():
  """Threads (clone3 falls back to clone), fork, subprocess, loopback and unix sockets work."""
  program = ('import os, socket, subprocess, sys, threading\nout = []\n'
             't = threading.Thread(target=out.append, args=("thread",))\nt.start(); t.join()\n'
             'pid = os.fork()\nif pid == 0:\n  os._exit(7)\nout.append(os.waitpid(pid, 0)[1] >> 8)\n'
             'out.append(subprocess.run([sys.executable, "-c", "print(5)"], capture_output=True)'
             '.stdout.strip().decode())\n'
             'a, b = socket.socketpair()\na.sendall(b"u"); out.append(b.recv(1).decode())\n'
             's = socket.socket(socket.AF_INET)\n'
             's.bind(("127.0.0.1", 0)); s.listen(1)\n'
             'c = socket.create_connection(s.getsockname()); c.sendall(b"i")\n'
             'out.append(s.accept()[0].recv(1).decode())\nprint(out)')
  result = sandbox.run_python(program, timeout_s=10)
  assert result.stdout == "['thread', 7, '5', 'u', 'i']\n", result.stderr

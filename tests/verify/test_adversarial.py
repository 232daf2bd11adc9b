"""Adversarial programs: each must earn no credit from code.score and leave the host unharmed.

Every case is scored against tests that only the attack succeeding could pass (expected values
the program cannot know, or output it could print only after escaping). After each case the host
is checked: no process of a sandbox uid survives, host files are untouched, this process lives.
"""
from __future__ import annotations

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

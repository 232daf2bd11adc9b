#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine and runs it, on both
# JAX lines the project supports:
#   - the machine's python3 (Python 3.11 -> JAX 0.10.2) in .venv, pinned by tests/constraints.txt;
#   - Python 3.12 (JAX 0.12) in .venv312, pinned by tests/constraints-py312.txt, where the
#     machine has a python3.12 (on PATH, or under pyenv); where it has none this half is
#     skipped with a message, and only the first line is tested.
# Usage (from the repository root): bash tests/run_tests.sh [extra pytest args]
# PY312=none skips the Python 3.12 half; PY312=/path/to/python3.12 chooses the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v bwrap >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq bubblewrap >/dev/null
fi

install_venv() {  # install_venv PYTHON VENV CONSTRAINTS
  [ -x "$2/bin/python" ] || "$1" -m venv "$2"
  "$2/bin/python" -m pip install -q --upgrade pip
  "$2/bin/python" -m pip install -q -c "$3" -e '.[test,tfds,parity,tpu]'
}

run_suite() {  # run_suite VENV [pytest args]: pytest's exit code; 5 (no test collected) fails
  local venv=$1; shift
  set +e
  "$venv/bin/python" -m pytest -n 2 --dist loadfile -q tests "$@"
  local rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then echo "pytest collected no tests"; return 1; fi
  return "$rc"
}

is_py312() {  # a runnable Python 3.12 (a pyenv shim for an inactive version is not)
  "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1
}

find_py312() {
  if [ -n "${PY312:-}" ]; then [ "$PY312" = none ] || echo "$PY312"; return; fi
  local p
  for p in "$(command -v python3.12 2>/dev/null)" \
           "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    [ -n "$p" ] && is_py312 "$p" && { echo "$p"; return; }
  done
}

install_venv "${PYTHON:-python3}" .venv tests/constraints.txt
echo "== test suite on $(.venv/bin/python --version) / jax $(.venv/bin/python -c 'import jax; print(jax.__version__)')"
run_suite .venv "$@"

PY312_BIN=$(find_py312 || true)
if [ -z "$PY312_BIN" ]; then
  echo "== no Python 3.12 on this machine: the JAX 0.12 line is not tested here"
  exit 0
fi
install_venv "$PY312_BIN" .venv312 tests/constraints-py312.txt
echo "== test suite on $(.venv312/bin/python --version) / jax $(.venv312/bin/python -c 'import jax; print(jax.__version__)')"
run_suite .venv312 "$@"

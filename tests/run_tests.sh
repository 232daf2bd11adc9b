#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine and runs it.
# Usage (from the repository root): bash tests/run_tests.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v bwrap >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq bubblewrap >/dev/null
fi
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c tests/constraints.txt -e '.[test,tfds,parity]'
set +e
.venv/bin/python -m pytest -n 2 --dist loadfile -q tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi
exit "$rc"

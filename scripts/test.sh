#!/usr/bin/env bash
# The README's test command: sets up .venv (runtime + test requirements) and runs the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_config.py -x`.
# Two pytest-xdist workers by default (one per core of the 2-core machines the suite is sized for;
# most of a test's time is XLA compiling, one thread), each taking whole test files so a module's
# fixtures are built once; pass `-n N` (`-n 0`: no workers, one process) to choose.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh test
workers=(-n 2 --dist loadfile)
for arg in "$@"; do
  case "$arg" in -n|-n[0-9]*|--numprocesses|--numprocesses=*) workers=() ;; esac
done
exec python -m pytest "${workers[@]}" "$@"

#!/usr/bin/env bash
# The README's test command: sets up .venv (runtime + test requirements) and runs the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_config.py -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh test
exec python -m pytest "$@"

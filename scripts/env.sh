#!/usr/bin/env bash
# Creates or reuses .venv and installs what is missing (re-installs only when a requirements file
# changed). Sourced by scripts/test.sh and scripts/demo.sh. Usage: source scripts/env.sh [test]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLM_JAX_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
reqs=("$ROOT/requirements.txt")
if [ "${1:-}" = "test" ]; then reqs+=("$ROOT/requirements-test.txt"); fi
stamp="$VENV/.installed-$(cat "${reqs[@]}" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  args=()
  for r in "${reqs[@]}"; do args+=(-r "$r"); done
  "$VENV/bin/pip" install -q "${args[@]}"
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

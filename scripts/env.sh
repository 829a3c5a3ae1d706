#!/usr/bin/env bash
# Creates or reuses the venv (.venv, or $VLM_JAX_VENV), installs what is missing (re-installs only
# when a requirements file or pyproject.toml changed) and the project itself (`pip install -e .`,
# which gives the vlm-jax-* commands). Sourced by scripts/test.sh and scripts/demo.sh; sourcing it
# from your shell enters the environment without changing your shell's options:
#     source scripts/env.sh [test]      (or: bash scripts/env.sh, then source .venv/bin/activate)
_vlm_jax_setup() (
  set -euo pipefail
  ROOT="$1"; VENV="$2"; PY="${PYTHON:-python3}"
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
  fi
  reqs=("$ROOT/requirements.txt")
  if [ "${3:-}" = "test" ]; then reqs+=("$ROOT/requirements-test.txt"); fi
  stamp="$VENV/.installed-$(cat "${reqs[@]}" "$ROOT/pyproject.toml" | sha1sum | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    args=()
    for r in "${reqs[@]}"; do args+=(-r "$r"); done
    "$VENV/bin/pip" install -q "${args[@]}"
    # the package itself, editable: `python -m vlm_jax.*` and `vlm-jax-*` work from any directory
    # (compat mode: a plain path entry, so PYTHONPATH below decides which checkout is imported)
    "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$ROOT" \
      --config-settings editable_mode=compat 2>/dev/null \
      || "$VENV/bin/pip" install -q --no-deps -e "$ROOT" --config-settings editable_mode=compat
    touch "$stamp"
  fi
)
_VLM_JAX_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_VLM_JAX_VENV="${VLM_JAX_VENV:-$_VLM_JAX_ROOT/.venv}"
if _vlm_jax_setup "$_VLM_JAX_ROOT" "$_VLM_JAX_VENV" "${1:-}"; then
  export PATH="$_VLM_JAX_VENV/bin:$PATH"
  export VIRTUAL_ENV="$_VLM_JAX_VENV"
  export PYTHONPATH="$_VLM_JAX_ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout first
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  unset -f _vlm_jax_setup
else
  echo "scripts/env.sh: setting up $_VLM_JAX_VENV failed" >&2
  unset -f _vlm_jax_setup
  return 1 2>/dev/null || exit 1
fi

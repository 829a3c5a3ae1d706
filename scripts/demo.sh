#!/usr/bin/env bash
# The README's main command: the CPU demo of the full staged curriculum, from a fresh clone.
#  1. sets up .venv (runtime requirements only; no torch);
#  2. builds the synthetic datasets and the tiny base model (the project's own short SFT
#     pre-training), skipping what already exists;
#  3. runs perception (GRPO) -> textual reasoning (SFT) -> visual reasoning (SFT), evaluating before
#     and after each stage; prints the report table and writes plots to workdirs/demo/plots.
# Rerunning resumes / reuses. Extra arguments are config overrides, e.g. --config.stages.0.steps=5
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export JAX_PLATFORMS=cpu
start=$(date +%s)
python -m vlm_jax.demo_setup --out artifacts/tiny_base   # data: the default data directory
python -m vlm_jax.train --config configs/demo_cpu.py --workdir workdirs/demo "$@"
echo "demo finished in $(( $(date +%s) - start )) s; report: workdirs/demo/report.md, plots: workdirs/demo/plots/"

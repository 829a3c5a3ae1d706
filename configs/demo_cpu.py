"""Demo: the three-stage capability curriculum on the grid world (`vlm_jax.data.synthetic.grid`)
with the tiny Qwen2.5-VL base that `python -m vlm_jax.demo_setup` pre-trains, on CPU.

Stages: perception (GRPO, per-cell reward, vision trained) -> textual reasoning (cross-entropy,
vision frozen) -> visual reasoning (cross-entropy, all trained). Each stage ends with an evaluation
of all three capabilities (512 fixed items each), so the report is a matrix capability x stage.
The stage settings live in `vlm_jax.experiment` (shared with `scripts/reproduce_paper.py`).

Run:
  python -m vlm_jax.train --config configs/demo_cpu.py --workdir workdirs/demo [--config.seed=N]

The merged baseline (the same data and total steps in one GRPO stage that mixes all of it, each
dataset weighted by its share of the examples the staged run draws; `--config.stages.0.objective=sft`
for the SFT variant):
  python -m vlm_jax.train --config configs/demo_cpu.py:merged --workdir workdirs/demo_merged
"""

from vlm_jax.config import Config
from vlm_jax.config.recipes import apply_variants
from vlm_jax.experiment import staged


def _recipe() -> Config:
    """The staged demo run, project form (GRPO perception, cross-entropy reasoning)."""
    return staged(form="project")


def get_config(arg: str = "") -> Config:
    """The staged demo; `arg`: `merged` for the merged baseline (`vlm_jax.config.recipes`)."""
    return apply_variants(_recipe(), arg)

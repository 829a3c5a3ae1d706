"""Merged baseline for the CPU demo: the same data and the same total steps as
`configs/demo_cpu.py`, in one stage that mixes all of it.

Derived from demo_cpu.py, so tuning the demo retunes the baseline: total steps = the sum of the demo's
stage steps; each dataset's mixing weight = its share of the examples the staged run draws from it
(stage steps * batch size * its weight within the stage). One stage has one objective: this uses
GRPO on everything (the paper's merged baseline), with the demo's perception GRPO and optimizer
settings; try `--config.stages.0.objective=sft` for the SFT variant.

Run:
  python -m vlm_jax.train --config configs/merged_cpu.py --workdir workdirs/demo_merged
"""

import dataclasses
import os

from vlm_jax.config import Config, DatasetSpec, EvalConfig, StageConfig, load_config

_STAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_cpu.py")


def _mixed_datasets(stages: tuple[StageConfig, ...]) -> tuple[DatasetSpec, ...]:
    """One spec per (name, split), weighted by the examples the staged run takes from it."""
    weights: dict[tuple[str, str], float] = {}
    for stage in stages:
        total = sum(d.weight for d in stage.datasets)
        for d in stage.datasets:
            share = stage.steps * stage.batch_size * d.weight / total
            weights[(d.name, d.split)] = weights.get((d.name, d.split), 0.0) + share
    return tuple(DatasetSpec(name=n, split=s, weight=w) for (n, s), w in weights.items())


def _merged_eval(stages: tuple[StageConfig, ...]) -> EvalConfig:
    """All the staged run's evaluation sets, once each, with the first stage's cadence and sizes."""
    specs = {(d.name, d.split): d for stage in stages for d in stage.eval.datasets}
    return dataclasses.replace(stages[0].eval, datasets=tuple(specs.values()))


def get_config() -> Config:
    """One mixed stage over the demo's data, as many steps as the three demo stages together."""
    staged = load_config(_STAGED)
    template = next(s for s in staged.stages if s.objective == "grpo")
    batch_sizes = {s.batch_size for s in staged.stages}
    if len(batch_sizes) != 1:
        raise ValueError(f"merged baseline needs one batch size across demo stages, got {batch_sizes}")
    merged = dataclasses.replace(
        template,
        name="merged",
        capability="mixed",
        objective="grpo",
        datasets=_mixed_datasets(staged.stages),
        steps=sum(s.steps for s in staged.stages),
        order="shuffle",
        trainable=("vision", "merger", "language_model"),
        eval=_merged_eval(staged.stages),
    )
    return dataclasses.replace(staged, stages=(merged,))

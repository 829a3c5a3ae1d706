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

import os

from vlm_jax.config import Config, load_config, merged_baseline

_STAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_cpu.py")


def get_config() -> Config:
    """One mixed stage over the demo's data, as many steps as the three demo stages together."""
    return merged_baseline(load_config(_STAGED))

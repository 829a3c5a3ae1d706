"""Merged baseline of the Qwen3-VL-8B recipe (the paper's 64.67): the same data and the same total
steps (930) as `qwen3_vl_8b_tpu.py`, in one GRPO stage that mixes all of it (each dataset weighted
by the examples the staged run draws from it; `vlm_jax.config.merged_baseline`). CPU smoke run:
`qwen3_vl_8b_merged_smoke_cpu.py`.

Run:
  python -m vlm_jax.train --config configs/qwen3_vl_8b_merged_tpu.py --workdir gs://BUCKET/runs/merged_qwen3_8b \\
      --distributed=auto
"""

import os

from vlm_jax.config import Config, load_config, merged_baseline

_STAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3_vl_8b_tpu.py")


def get_config() -> Config:
    return merged_baseline(load_config(_STAGED))

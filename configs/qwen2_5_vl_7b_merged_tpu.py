"""The paper's merged baseline for Qwen2.5-VL-7B: one GRPO stage over the three stages' data mixed
(weights by the examples the staged run draws from each), as many steps as the staged recipe.
Settings otherwise those of `configs/qwen2_5_vl_7b_tpu.py` (mesh, precision, remat, micro-batches).

  python -m vlm_jax.train --config configs/qwen2_5_vl_7b_merged_tpu.py --workdir gs://BUCKET/runs/merged_7b \\
      --distributed=auto
"""

import os

from vlm_jax.config import load_config, merged_baseline

_STAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen2_5_vl_7b_tpu.py")


def get_config():
    return merged_baseline(load_config(_STAGED))

"""CPU smoke variant of `qwen2_5_vl_3b_merged_tpu.py`: its code path (precision policy, remat, micro-batches,
chunked scoring and sampling) on the tiny model and the demo's data, 2 steps per stage
(`vlm_jax.config.smoke_variant`). Build the tiny model and data first (`bash scripts/demo.sh`).

  python -m vlm_jax.train --config configs/qwen2_5_vl_3b_merged_smoke_cpu.py --workdir workdirs/smoke_3b_merged
"""

import os

from vlm_jax.config import load_config, smoke_variant

_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen2_5_vl_3b_merged_tpu.py")


def get_config():
    return smoke_variant(load_config(_RECIPE))

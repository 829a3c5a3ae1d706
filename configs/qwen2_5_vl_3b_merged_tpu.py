"""The merged baseline for Qwen2.5-VL-3B (see `configs/qwen2_5_vl_7b_merged_tpu.py`), with the 3B
recipe's settings (`configs/qwen2_5_vl_3b_tpu.py`)."""

import os

from vlm_jax.config import load_config, merged_baseline

_STAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen2_5_vl_3b_tpu.py")


def get_config():
    return merged_baseline(load_config(_STAGED))

"""CPU smoke run of `configs/qwen3_vl_8b_tpu.py`: the same stages, objectives, trainable modules, losses and
rewards, precision policy, remat and micro-batching on the tiny Qwen3-VL and the demo's synthetic data,
2 steps per stage (`vlm_jax.config.smoke_variant`).

Build the tiny model and the data first (offline):
  python scripts/build_tiny_model.py --family qwen3_vl --out artifacts/tiny_qwen3
  python -m vlm_jax.demo_setup   # or bash scripts/demo.sh: the demo's synthetic data
Run:
  python -m vlm_jax.train --config configs/qwen3_vl_8b_smoke_cpu.py --workdir workdirs/smoke_qwen3_8b
"""

import os

from vlm_jax.config import Config, load_config, smoke_variant

_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3_vl_8b_tpu.py")


def get_config() -> Config:
    return smoke_variant(load_config(_RECIPE), model_path="artifacts/tiny_qwen3")

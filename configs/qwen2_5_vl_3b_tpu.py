"""Paper recipe (staged perception-first GRPO) for Qwen2.5-VL-3B-Instruct on a v5e-8 / v6e-8 slice.

The 7B recipe's stages, data and hyper-parameters (`configs/qwen2_5_vl_7b_tpu.py`), with the 3B
checkpoint, FSDP over the 8 chips and micro-batches of 8 completions (one per chip). Reference
log-probs are scored 16 completions at a time and the sampler runs 64 prompts per call, so the KV
cache fits a 16 GiB chip; the KL reference waits in host memory between its uses
(`grpo.offload_reference`), so the update runs beside the state alone. Check the fit on this
machine first:

  python scripts/plan_memory.py --config configs/qwen2_5_vl_3b_tpu.py --topology v5e:2x4 \\
      --model_config configs/hf/Qwen2.5-VL-3B-Instruct

The merged baseline with these settings: `--config configs/qwen2_5_vl_3b_tpu.py:merged`; CPU smoke
runs `:smoke` and `:merged,smoke` (see `configs/qwen2_5_vl_7b_tpu.py`).
"""

import dataclasses
import os

from vlm_jax.config import Config, MeshConfig, load_config
from vlm_jax.config.recipes import apply_variants

_7B = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen2_5_vl_7b_tpu.py")


def _recipe() -> Config:
    cfg = load_config(_7B)
    stages = tuple(
        dataclasses.replace(s, micro_batch_size=8,
                            grpo=dataclasses.replace(s.grpo, score_chunk=16, rollout_chunk=64,
                                                     offload_reference=True,
                                                     # sampling in the training (FSDP) layout: the 7B's
                                                     # 4 does not divide the 3B's 2 KV heads, and tensor
                                                     # 2 does not fit v5e-8 (16.80 / 20.48 GiB per chip,
                                                     # text / image stages; docs/scale.md)
                                                     rollout_tensor=0))
        for s in cfg.stages
    )
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, path="artifacts/Qwen2.5-VL-3B-Instruct"),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        stages=stages,
    )


def get_config(arg: str = "") -> Config:
    """The recipe; `arg`: its variants, comma-separated (`merged`, `smoke`: `vlm_jax.config.recipes`)."""
    return apply_variants(_recipe(), arg)

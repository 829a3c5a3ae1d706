"""Staged perception-first GRPO for Qwen3-VL-2B-Instruct on ONE TPU chip (e.g. a Colab v6e-1).

The paper's stages, order, losses and optimizer (`qwen3_vl_8b_tpu.py`), with the per-step sizes cut
to one chip: 8 prompts x 5 samples per rollout step (the paper: 512), mini-batches of 2 prompts
(= 10 completions; 4 updates per rollout as in the paper), responses of 1024 tokens (2048), at most
1,003,520 pixels per image (~980 vision tokens at patch 16 and merge 2). The step counts stay
90 / 375 / 465, so each stage sees 64x fewer prompts than the paper's; raise `steps` to match the
paper's examples instead of its updates.

Sizing arithmetic (bf16, 2.13B parameters; NOT yet checked by `scripts/plan_memory.py`): parameters
4.3 GB, AdamW moments 8.5 GB, the frozen KL reference 4.3 GB, gradients 4.3 GB = 21.4 GB before
activations; rollout KV cache (28 layers x 8 kv heads x 128 x 2 x 2 bytes = 115 KB per token):
prompts 8 x 2048 -> 1.9 GB, generated 40 x 1024 -> 4.7 GB. That leaves a 32 GB chip little room for
the update's activations: expect to need per-layer remat and micro-batches. A 16 GB v5e chip does
not hold the AdamW state of a 2B model. As for every bf16 recipe here, an lr-1e-6 update is below
bf16 resolution for most weights until a compensated / fp32-master precision policy is used.
CPU smoke run: `qwen3_vl_2b_smoke_cpu.py`.

Run:
  python -m vlm_jax.train --config configs/qwen3_vl_2b_tpu_chip.py --workdir workdirs/staged_qwen3_2b
"""

import dataclasses
import os

from vlm_jax.config import Config, MeshConfig, ModelConfig, load_config

_STAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3_vl_8b_tpu.py")
_PROMPTS, _GROUP, _MINI_PROMPTS, _RESPONSE = 8, 5, 2, 1024


def get_config() -> Config:
    cfg = load_config(_STAGED)

    def chip(stage):
        grpo = dataclasses.replace(stage.grpo, num_samples=_GROUP, max_new_tokens=_RESPONSE,
                                   mini_batch_size=_MINI_PROMPTS * _GROUP)
        ev = dataclasses.replace(stage.eval, max_new_tokens=_RESPONSE, batch_size=8)
        return dataclasses.replace(stage, batch_size=_PROMPTS, grpo=grpo, eval=ev)

    return dataclasses.replace(
        cfg,
        model=ModelConfig(path="artifacts/Qwen3-VL-2B-Instruct", dtype="bfloat16"),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        data=dataclasses.replace(cfg.data, max_pixels_per_image=1_003_520),
        stages=tuple(chip(s) for s in cfg.stages),
    )

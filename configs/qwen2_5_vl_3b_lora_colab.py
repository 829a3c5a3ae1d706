"""Staged perception-first GRPO for Qwen2.5-VL-3B-Instruct on ONE TPU chip (Colab v5e-1 or v6e-1) with
LoRA: the 3B recipe's stages, losses and data (`qwen2_5_vl_3b_tpu.py`), each stage training fresh
rank-16 adapters (alpha 32) over a frozen bf16 base and merging them at its end.

Adapters: perception on the language model, the vision blocks and the merger (vision LoRA during RL:
the sampler decodes with the adapters applied); textual reasoning on the language model; visual
reasoning on all three. The KL reference is the base with the adapters off (no second copy).

Per-step sizes cut to one chip: 4 prompts x 4 samples per rollout, mini-batches of 8 completions
(2 updates per rollout), micro-batches of 2, prompts up to 1024 tokens, responses of 512, at most
100,352 pixels per image (128 vision tokens after the 2x2 merge; the patch bucket for a batch is 2,048
patches). Per-layer remat, reference log-probs 4 completions at a time. lr 2e-5 (LoRA), constant.

Memory per chip, from the TPU compiler (planner, 2026-12-03, perception stage; docs/scale.md,
the LoRA rows): the GRPO update needs 12.05 GiB of v5e-1's 16 (bf16 base 6.99 GiB, 414
rank-16 adapters 0.15 GiB + AdamW moments 0.31 GiB, temporaries 4.59 GiB), 11.89 of v6e-1's 32. With micro-batches of 4 and
200,704 px per image it did not fit v5e-1 (17.97 GiB of temporaries); at those larger sizes scoring
took 9.70 GiB and sampling 11.43 GiB. Re-check with:
  python scripts/plan_memory.py --config configs/qwen2_5_vl_3b_lora_colab.py --topology v5e:1x1 \\
      --model_config configs/hf/Qwen2.5-VL-3B-Instruct --stages perception

Run (notebooks/colab_tpu.ipynb does this on Colab):
  python -m vlm_jax.train --config configs/qwen2_5_vl_3b_lora_colab.py --workdir workdirs/lora_3b \\
      --config.model.path=PATH/TO/Qwen2.5-VL-3B-Instruct
"""

import dataclasses
import os

from vlm_jax.config import LoraConfig, MeshConfig, load_config

_3B = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen2_5_vl_3b_tpu.py")
_PROMPTS, _GROUP, _MINI, _MICRO, _PROMPT_LEN, _RESPONSE = 4, 4, 8, 2, 1024, 512
_TARGETS = {
    "perception": ("language", "vision", "merger"),
    "textual_reasoning": ("language",),
    "visual_reasoning": ("language", "vision", "merger"),
}


def get_config():
    cfg = load_config(_3B)

    def chip(stage):
        grpo = dataclasses.replace(stage.grpo, num_samples=_GROUP, max_new_tokens=_RESPONSE, mini_batch_size=_MINI,
                                   score_chunk=2 * _MICRO, rollout_chunk=0)
        ev = dataclasses.replace(stage.eval, max_new_tokens=_RESPONSE, batch_size=8)
        return dataclasses.replace(
            stage, batch_size=_PROMPTS, grpo=grpo, eval=ev, remat="full", micro_batch_size=_MICRO,
            lora=LoraConfig(rank=16, alpha=32.0, targets=_TARGETS[stage.name]),
            optimizer=dataclasses.replace(stage.optimizer, lr=2e-5),
        )

    return dataclasses.replace(
        cfg,
        # every stage trains adapters, so the base may be stored bf16 (the adapters are fp32)
        model=dataclasses.replace(cfg.model, dtype="bfloat16", compute_dtype="bfloat16"),
        mesh=MeshConfig(data=1, fsdp=1, tensor=1),
        data=dataclasses.replace(cfg.data, max_prompt_len=_PROMPT_LEN, length_buckets=(256, 512, _PROMPT_LEN),
                                 min_pixels_per_image=50_176, max_pixels_per_image=100_352),
        stages=tuple(chip(s) for s in cfg.stages),
    )

"""The CPU demo's three-stage curriculum (`configs/demo_cpu.py`) with LoRA adapters in every stage.

Each stage trains fresh adapters (rank 8, alpha 16) over a frozen base and merges them at its end:
perception (GRPO) adapts the language model, the vision blocks and the merger (vision LoRA during RL:
the sampler decodes with the adapters applied); textual reasoning (SFT) the language model only;
visual reasoning (SFT) all three. Same data, steps, batch sizes and evaluations as the demo; the
learning rate is 10x the full fine-tune's (3e-3), as usual for LoRA. The KL reference of the
perception stage is the base with the adapters off.

The GRPO stage keeps `grpo.share_prompt` off (the default is on): the same loss and gradients up to
fp32 round-off, and this high-learning-rate run is sensitive to round-off.

Run (after `bash scripts/demo.sh` or `python -m vlm_jax.demo_setup --out artifacts/tiny_base`):
  python -m vlm_jax.train --config configs/demo_cpu_lora.py --workdir workdirs/demo_lora
"""

import dataclasses
import os

from vlm_jax.config import Config, LoraConfig, load_config

_STAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_cpu.py")
_TARGETS = {
    "perception": ("language", "vision", "merger"),
    "textual_reasoning": ("language",),
    "visual_reasoning": ("language", "vision", "merger"),
}


def get_config() -> Config:
    """The demo's stages, each training LoRA adapters (rank 8) instead of full weights."""
    staged = load_config(_STAGED)
    stages = tuple(
        dataclasses.replace(
            st,
            lora=LoraConfig(rank=8, alpha=16.0, targets=_TARGETS[st.name]),
            optimizer=dataclasses.replace(st.optimizer, lr=10 * st.optimizer.lr),
            grpo=dataclasses.replace(st.grpo, share_prompt=False),
        )
        for st in staged.stages
    )
    return dataclasses.replace(staged, stages=stages)

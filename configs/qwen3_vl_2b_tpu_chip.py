"""Staged perception-first GRPO for Qwen3-VL-2B-Instruct sized toward ONE TPU chip (a Colab v6e-1); see
the planner result below: it does not fit yet.

The paper's stages, order, losses and optimizer (`qwen3_vl_8b_tpu.py`), with the per-step sizes cut
to one chip: 8 prompts x 5 samples per rollout step (the paper: 512), mini-batches of 2 prompts
(= 10 completions; 4 updates per rollout as in the paper), responses of 1024 tokens (2048), at most
1,003,520 pixels per image (~980 vision tokens at patch 16 and merge 2). The step counts stay
90 / 375 / 465, so each stage sees 64x fewer prompts than the paper's; raise `steps` to match the
paper's examples instead of its updates.

Memory: fp32 parameters and AdamW moments with bf16 compute (as every recipe here: an lr-1e-6
update is lost in bf16 storage), per-layer remat ("full"), micro-batches of 5 completions and
reference scoring 10 completions at a time.

NOT YET FITTING (planner, 2026-12-01, first stage): on v6e:1x1 (31.2 GiB usable) optimizer init
needs 31.7 GiB of temporaries (fp32 parameters 7.9 GiB + AdamW moments 15.9 GiB), the GRPO update
107.6 GiB, scoring 42.0 GiB, sampling 42.1 GiB. The update / score / sample sizes are dominated by
the vision tower: the patch bucket for 8 images of up to 1,003,520 px is 32,768 patches and vision
attention is one dense [heads, P, P] block over it (segment mask), which no option here chunks yet.
Before a one-chip run: segment-local (per image) vision attention, fewer pixels per image, and a
smaller optimizer state (or a 2-chip slice). Re-check with:
  python scripts/plan_memory.py --config configs/qwen3_vl_2b_tpu_chip.py --topology v6e:1x1 \
      --model_config configs/hf/Qwen3-VL-2B-Instruct
CPU smoke run: `--config configs/qwen3_vl_2b_tpu_chip.py:smoke`.

Run:
  python -m vlm_jax.train --config configs/qwen3_vl_2b_tpu_chip.py --workdir workdirs/staged_qwen3_2b
"""

import dataclasses
import os

from vlm_jax.config import Config, MeshConfig, load_config
from vlm_jax.config.recipes import apply_variants

_STAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3_vl_8b_tpu.py")
_PROMPTS, _GROUP, _MINI_PROMPTS, _RESPONSE, _MICRO = 8, 5, 2, 1024, 5


def _recipe() -> Config:
    cfg = load_config(_STAGED)

    def chip(stage):
        grpo = dataclasses.replace(stage.grpo, num_samples=_GROUP, max_new_tokens=_RESPONSE,
                                   mini_batch_size=_MINI_PROMPTS * _GROUP, score_chunk=2 * _MICRO)
        ev = dataclasses.replace(stage.eval, max_new_tokens=_RESPONSE, batch_size=8)
        return dataclasses.replace(stage, batch_size=_PROMPTS, grpo=grpo, eval=ev, remat="full",
                                   micro_batch_size=_MICRO)

    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, path="artifacts/Qwen3-VL-2B-Instruct"),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        data=dataclasses.replace(cfg.data, max_pixels_per_image=1_003_520),
        stages=tuple(chip(s) for s in cfg.stages),
    )


def get_config(arg: str = "") -> Config:
    """The recipe; `arg`: its variants, comma-separated (`merged`, `smoke`: `vlm_jax.config.recipes`)."""
    return apply_variants(_recipe(), arg, smoke_model="artifacts/tiny_qwen3")

"""Paper recipe (staged perception-first GRPO) for Qwen3-VL-8B-Instruct on a TPU slice, the paper's
main model (staged 65.77 vs merged 64.67 vs base 62.19, 8-benchmark average).

The paper runs one recipe for both model families, so this is `qwen2_5_vl_7b_tpu.py` (every value
documented there: GRPO stages of 90 / 375 / 465 steps, 512 prompts x 5, mini-batch 128 prompts,
lr 1e-6, k3 KL 1e-2, clip 0.2 / 0.3, dual clip 3, prompt and response 2048 tokens, 262,144 to
4,194,304 pixels, vision frozen in stage 2; fp32 storage, bf16 compute) with the Qwen3-VL-8B
checkpoint. Qwen3-VL's patch is 16
px (28 for Qwen2.5-VL's 14 px patches x merge 2 becomes 32), so the same pixel bounds give
(14/16)^2 = 0.77 x as many vision tokens. Rollouts are sampled in the 7B's decoding layout
(`grpo.rollout_tensor=4`: each chip decodes its own rows with 2 of the 8 KV heads and a quarter of
the MLP; planned for v5p-64 in docs/scale.md):

  python scripts/plan_memory.py --config configs/qwen3_vl_8b_tpu.py --topology v5p:4x4x4 \\
      --model_config configs/hf/Qwen3-VL-8B-Instruct --programs generate

The merged baseline (the paper's 64.67: the same data and
930 steps in one GRPO stage) is the config argument `:merged`, the CPU smoke run of this file
`:smoke` (`:merged,smoke` for the baseline's).

Run (every host of the slice runs the same command):
  python -m vlm_jax.train --config configs/qwen3_vl_8b_tpu.py --workdir gs://BUCKET/runs/staged_qwen3_8b \\
      --distributed=auto
  python -m vlm_jax.train --config configs/qwen3_vl_8b_tpu.py:merged --workdir gs://BUCKET/runs/merged_qwen3_8b \\
      --distributed=auto
"""

import dataclasses
import os

from vlm_jax.config import Config, load_config
from vlm_jax.config.recipes import apply_variants

_PAPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen2_5_vl_7b_tpu.py")


def _recipe() -> Config:
    """Perception (90) -> textual reasoning (375) -> visual reasoning (465), all GRPO."""
    cfg = load_config(_PAPER)
    # the 7B's stages unchanged, its decoding layout included: rollouts sampled on a (data 16, fsdp 1,
    # tensor 4) mesh (`grpo.rollout_tensor=4` divides the 8 KV heads; planned in docs/scale.md)
    # fp32 parameters and AdamW moments, bf16 compute, as the 7B recipe
    model = dataclasses.replace(cfg.model, path="artifacts/Qwen3-VL-8B-Instruct")
    return dataclasses.replace(cfg, model=model)


def get_config(arg: str = "") -> Config:
    """The recipe; `arg`: its variants, comma-separated (`merged`, `smoke`: `vlm_jax.config.recipes`)."""
    return apply_variants(_recipe(), arg, smoke_model="artifacts/tiny_qwen3")

"""Paper recipe (staged perception-first GRPO) for Qwen2.5-VL-7B-Instruct on a TPU slice.

Values from the public recipe (UCSC-VLAA/VLM-CapCurriculum on EasyR1; see
shared/reference/paper-recipe.md): three GRPO stages of 90 / 375 / 465 steps, 512 prompts per rollout
step x group of 5, mini-batch of 128 prompts (= 640 completions, 4 updates per rollout), lr 1e-6
constant, wd 1e-2, no warmup, k3 KL at 1e-2, clip 0.2 / 0.3, dual clip 3, prompt and response 2048
tokens, 262,144 to 4,194,304 pixels per image, vision tower frozen in stage 2 (text only), reward
0.9 * accuracy + 0.1 * format.

Nothing is downloaded at run time: put the Hugging Face checkpoint at `model.path` and the data files
in place first (the dataset file names below are placeholders for your local copies; override them
with `--config.stages.N.datasets='[{"name": "PATH"}]'`). Parameters are sharded FSDP over every chip.

Memory (checked by the TPU compiler on a CPU machine, see docs/scale.md):
  python scripts/plan_memory.py --config configs/qwen2_5_vl_7b_tpu.py --topology v5p:4x4x4 \
      --model_config configs/hf/Qwen2.5-VL-7B-Instruct
fp32 parameters and moments with bf16 compute, decoder/vision remat, gradients accumulated over
micro-batches of 64 completions (one per chip of a v5p-64), reference log-probs scored 640 at a time,
rollouts sampled on a (data 16, fsdp 1, tensor 4) decoding mesh (`grpo.rollout_tensor=4`: the text
stage's sampler 17.69 GiB per chip instead of 77.34 in the FSDP layout).

Run (every host of the slice runs the same command):
  python -m vlm_jax.train --config configs/qwen2_5_vl_7b_tpu.py --workdir gs://BUCKET/runs/staged_7b \\
      --distributed=auto
Capability + difficulty curriculum (easy -> hard by pass rate, within each stage):
  ... --config.stages.0.order=easy_to_hard --config.stages.0.order_key=pass_rate  (same for 1 and 2)

Variants as config arguments (`vlm_jax.config.recipes`):
  --config configs/qwen2_5_vl_7b_tpu.py:merged        the paper's merged baseline: one GRPO stage over
                                                      the three stages' data mixed (each dataset
                                                      weighted by the examples the staged run draws
                                                      from it), as many steps; settings otherwise these
  --config configs/qwen2_5_vl_7b_tpu.py:smoke         this recipe's code path on CPU (tiny model, the
                                                      demo's data, 2 steps per stage; build them first
                                                      with `bash scripts/demo.sh`)
  --config configs/qwen2_5_vl_7b_tpu.py:merged,smoke  the merged baseline's smoke run
"""

from vlm_jax.config import (CheckpointConfig, Config, DataConfig, DatasetSpec, EvalConfig,
                            GRPOConfig, LoggingConfig, MeshConfig, ModelConfig, OptimizerConfig,
                            StageConfig)
from vlm_jax.config.recipes import apply_variants

_PROMPTS_PER_STEP = 512
_GROUP = 5
_MINI_BATCH_PROMPTS = 128
_MAX_LEN = 2048
_MICRO = 64  # completions per micro-batch: one per chip of a v5p-64

# Benchmarks of the paper's evaluation (greedy), as local files.
_EVAL = EvalConfig(
    datasets=tuple(DatasetSpec(name=f"eval/{name}.parquet", split="test") for name in (
        "mathvista_mini", "mathvision_mini", "mathverse_mini", "wemath", "a_okvqa", "realworldqa",
        "mmstar", "pope")),
    every=0,
    max_examples=5000,
    max_new_tokens=_MAX_LEN,
    batch_size=64,
)

_GRPO = GRPOConfig(
    num_samples=_GROUP,
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    max_new_tokens=_MAX_LEN,
    advantage="grpo",
    reward_scaling="group",
    clip_low=0.2,
    clip_high=0.3,
    clip_c=3.0,
    ratio_level="token",
    kl_coef=1e-2,
    kl_estimator="k3",
    loss_agg="token_mean",
    mu=1,
    mini_batch_size=_MINI_BATCH_PROMPTS * _GROUP,
    score_chunk=_MINI_BATCH_PROMPTS * _GROUP,
    # sample on a (data 16, fsdp 1, tensor 4) decoding mesh: the policy resharded once per rollout, so
    # no decode step gathers FSDP-sharded weights (4 = the model's KV heads; planned in docs/scale.md)
    rollout_tensor=4,
    # shuffled mini-batches (640 of 2,560 completions): a micro-batch may name as many prompts as
    # completions, so sharing them saves little; the planner's figures (docs/scale.md) are without it
    share_prompt=False,
)

_OPTIMIZER = OptimizerConfig(name="adamw", lr=1e-6, weight_decay=1e-2, b1=0.9, b2=0.999, eps=1e-8,
                             schedule="constant", warmup_steps=0, max_grad_norm=1.0)


def _stage(name: str, datasets: tuple[DatasetSpec, ...], steps: int,
           trainable: tuple[str, ...]) -> StageConfig:
    """One GRPO capability stage with the recipe's shared settings."""
    return StageConfig(
        name=name,
        capability=name,  # type: ignore[arg-type]  # stage names are the capability names
        objective="grpo",
        datasets=datasets,
        steps=steps,
        batch_size=_PROMPTS_PER_STEP,
        order="shuffle",
        optimizer=_OPTIMIZER,
        reset_optimizer=True,
        trainable=trainable,
        grpo=_GRPO,
        reward=(("auto", 0.9), ("format", 0.1)),
        eval=_EVAL,
        remat="full",
        micro_batch_size=_MICRO,
    )


def _recipe() -> Config:
    """Perception (90) -> textual reasoning (375) -> visual reasoning (465), all GRPO."""
    return Config(
        # fp32 parameters and AdamW moments, bf16 compute (an lr 1e-6 update is lost in bf16 storage)
        model=ModelConfig(path="artifacts/Qwen2.5-VL-7B-Instruct", dtype="float32", compute_dtype="bfloat16",
                          scan_layers=True),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        data=DataConfig(max_prompt_len=_MAX_LEN,
                        length_buckets=(256, 512, 1024, 2048), min_pixels_per_image=262_144,
                        max_pixels_per_image=4_194_304, strict=False),
        stages=(
            # DOCCI-caption multiple-choice questions kept by the perception-sensitive filter.
            _stage("perception", (DatasetSpec(name="perception_docci_filtered.parquet"),), 90,
                   ("vision", "merger", "language_model")),
            # ORZ-Math-13k, text only: the whole vision side (tower + merger) is frozen.
            _stage("textual_reasoning", (DatasetSpec(name="orz_math_13k.parquet"),), 375,
                   ("language_model",)),
            # CLEVR-Math + GeoQA170K + MathPUMA + ArxivQA, concatenated as in the recipe.
            _stage("visual_reasoning", (DatasetSpec(name="visual_reasoning.parquet"),), 465,
                   ("vision", "merger", "language_model")),
        ),
        seed=0,
        checkpoint=CheckpointConfig(every=50, keep=3, async_save=True),
        logging=LoggingConfig(every=1, tensorboard=True, progress=True),
    )


def get_config(arg: str = "") -> Config:
    """The recipe; `arg`: its variants, comma-separated (`merged`, `smoke`: `vlm_jax.config.recipes`)."""
    return apply_variants(_recipe(), arg)

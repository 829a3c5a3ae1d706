"""Recipe transforms: variants of a recipe that its config file's `get_config(arg)` offers as
arguments (`--config configs/qwen2_5_vl_7b_tpu.py:merged,smoke`), instead of a file per variant.

- `merged`: the paper's merged baseline of a staged recipe (`merged_baseline`);
- `smoke`: the recipe cut to CPU size on the tiny model and the demo's data (`smoke_variant`).

`apply_variants(cfg, arg, ...)` applies the comma-separated words of `arg` in order.
"""

from __future__ import annotations

import dataclasses

from vlm_jax.config.parse import ConfigError, _require
from vlm_jax.config.schema import CheckpointConfig, Config, DataConfig, LoggingConfig, MeshConfig
from vlm_jax.config.stage import MODULES, DatasetSpec, EvalConfig


def merged_baseline(staged: Config) -> Config:
    """The paper's merged baseline of a staged config: one GRPO stage (the first GRPO stage's
    settings; for a run without GRPO stages, one cross-entropy stage with the first stage's) over
    all the stages' data, each dataset weighted by the examples the staged run draws from it (stage
    steps * batch size * its weight within the stage), as many steps as all stages together, every
    module trained, every stage's evaluation sets."""
    grpo_stages = [s for s in staged.stages if s.objective == "grpo"]
    template = grpo_stages[0] if grpo_stages else staged.stages[0]
    batch_sizes = {s.batch_size for s in staged.stages}
    _require(len(batch_sizes) == 1, "stages",
             f"the merged baseline needs one batch size across stages, got {sorted(batch_sizes)}")
    weights: dict[tuple[str, str], float] = {}
    for stage in staged.stages:
        total = sum(d.weight for d in stage.datasets)
        for d in stage.datasets:
            share = stage.steps * stage.batch_size * d.weight / total
            weights[(d.name, d.split)] = weights.get((d.name, d.split), 0.0) + share
    evals = {(d.name, d.split): d for stage in staged.stages for d in stage.eval.datasets}
    merged = dataclasses.replace(
        template,
        name="merged",
        capability="mixed",
        datasets=tuple(DatasetSpec(name=n, split=s, weight=w) for (n, s), w in weights.items()),
        steps=sum(s.steps for s in staged.stages),
        order="shuffle",
        trainable=MODULES,
        eval=dataclasses.replace(template.eval, datasets=tuple(evals.values())),
    )
    return dataclasses.replace(staged, stages=(merged,))


def smoke_variant(recipe: Config, *, model_path: str = "artifacts/tiny_base",
                  data_dir: str = "") -> Config:
    """A TPU recipe cut to CPU size on the tiny model and the demo's synthetic data: the same
    objectives, trainable modules, precision policy, remat, micro-batching, chunked scoring and
    chunked sampling (scaled to 4 prompts x 2 samples), 2 steps per stage, short sequences. It runs
    the recipe's code path after `bash scripts/demo.sh` (or `python -m vlm_jax.demo_setup`) built
    the tiny model and data. A decoding layout (`grpo.rollout_tensor`) becomes 1 (the reshard to a
    decoding mesh of whole-weight copies, valid for any device count and the tiny model's heads)."""
    synthetic = {"perception": "synthetic_perception", "textual_reasoning": "synthetic_textual_reasoning",
                 "visual_reasoning": "synthetic_visual_reasoning"}
    stages = []
    for s in recipe.stages:
        names = [synthetic[s.name]] if s.name in synthetic else list(synthetic.values())
        g = s.grpo
        stages.append(dataclasses.replace(
            s,
            datasets=tuple(DatasetSpec(name=n) for n in names),
            steps=2,
            batch_size=4,
            micro_batch_size=2 if s.micro_batch_size else 0,
            grpo=dataclasses.replace(g, num_samples=2, max_new_tokens=16, mini_batch_size=4 if g.mini_batch_size else 0,
                                     score_chunk=4 if g.score_chunk else 0,
                                     rollout_chunk=2 if g.rollout_chunk else 0,
                                     rollout_tensor=1 if g.rollout_tensor else 0),
            eval=EvalConfig(),
        ))
    return dataclasses.replace(
        recipe,
        model=dataclasses.replace(recipe.model, path=model_path, compute_dtype="float32",
                                  attention_chunk=32, logits_chunk=16),
        mesh=MeshConfig(data=-1, fsdp=1, tensor=1),
        data=DataConfig(data_dir=data_dir, max_prompt_len=256, length_buckets=(64, 128, 256),
                        min_pixels_per_image=28 * 28 * 4, max_pixels_per_image=112 * 112),
        stages=tuple(stages),
        checkpoint=CheckpointConfig(every=100, keep=1),
        logging=LoggingConfig(every=1, tensorboard=False, progress=False),
    )


VARIANTS = ("merged", "smoke")


def apply_variants(cfg: Config, arg: str, *, smoke_model: str = "artifacts/tiny_base") -> Config:
    """`cfg` with the comma-separated variants of a config argument applied in order: `merged`
    (`merged_baseline`), `smoke` (`smoke_variant` on the tiny model `smoke_model`); "" is `cfg`.
    An unknown word is a ConfigError listing the valid ones."""
    for word in (w.strip() for w in arg.split(",") if w.strip()):
        if word == "merged":
            cfg = merged_baseline(cfg)
        elif word == "smoke":
            cfg = smoke_variant(cfg, model_path=smoke_model)
        else:
            raise ConfigError(f"unknown config argument {word!r}; valid: {', '.join(VARIANTS)} "
                              f"(comma-separated, applied in order)")
    return cfg

"""The three-stage curriculum on the general synthetic datasets (`vlm_jax.data.synthetic`: counting,
colours, positions, sizes, reading, grounding; arithmetic; charts), on CPU, with the tiny model.

Stages: perception (GRPO, vision trained) -> textual reasoning (SFT, vision frozen) -> visual
reasoning (SFT, all trained). Sizes are placeholders for a laptop CPU; the tests use it as a
template. The demo itself runs on the grid world (`configs/demo_cpu.py`). Needs the synthetic
datasets (`vlm_jax.data.build_synthetic(data_dir)`) and a model:

  python -m vlm_jax.train --config configs/synthetic_cpu.py --workdir workdirs/synthetic \
      --config.model.path=MODEL_DIR --config.stages.0.steps=2 --config.stages.1.steps=2 --config.stages.2.steps=2
"""

from vlm_jax.config import (CheckpointConfig, Config, DataConfig, DatasetSpec, EvalConfig,
                            GRPOConfig, LoggingConfig, MeshConfig, ModelConfig, OptimizerConfig,
                            StageConfig)

_BATCH = 8
_MAX_NEW_TOKENS = 48


def _stage(capability: str, objective: str, steps: int, trainable: tuple[str, ...], **kwargs) -> StageConfig:
    """A stage on its capability's synthetic dataset, evaluated on that dataset's validation split
    (all 64 rows) at stage start/end and every 10 steps."""
    dataset = f"synthetic_{capability}"
    return StageConfig(
        name=capability, capability=capability, objective=objective, datasets=(DatasetSpec(name=dataset),),
        steps=steps, batch_size=_BATCH, optimizer=OptimizerConfig(lr=3e-4, warmup_steps=2), trainable=trainable,
        eval=EvalConfig(datasets=(DatasetSpec(name=dataset, split="validation"),), every=10, max_examples=64,
                        max_new_tokens=_MAX_NEW_TOKENS, batch_size=_BATCH),
        **kwargs,
    )


def get_config() -> Config:
    """The staged demo run."""
    perception = _stage("perception", "grpo", 30, ("vision", "merger", "language_model"),
                        grpo=GRPOConfig(num_samples=4, max_new_tokens=_MAX_NEW_TOKENS))
    textual = _stage("textual_reasoning", "sft", 20, ("language_model",))
    visual = _stage("visual_reasoning", "sft", 20, ("vision", "merger", "language_model"))
    return Config(
        model=ModelConfig(path="artifacts/tiny_base", dtype="float32"),
        mesh=MeshConfig(data=-1, fsdp=1, tensor=1),
        data=DataConfig(max_prompt_len=256,  # data_dir: the default data directory (vlm_jax.paths)
                        length_buckets=(64, 128, 256), min_pixels_per_image=28 * 28 * 4,
                        max_pixels_per_image=112 * 112),
        stages=(perception, textual, visual),
        seed=0,
        checkpoint=CheckpointConfig(every=10, keep=2),
        logging=LoggingConfig(every=1),
    )

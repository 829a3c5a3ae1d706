"""Base pre-training of the tiny demo model: short cross-entropy on synthetic reference solutions
(perception, textual and visual reasoning mixed), so the base answers some perception questions right
and many wrong. Run by `python -m vlm_jax.demo_setup` (which sets model.path and data.data_dir):

  python -m vlm_jax.train --config configs/pretrain_tiny.py --workdir workdirs/pretrain_tiny \
      --config.model.path=artifacts/tiny_base_init
"""

from vlm_jax.config import (CheckpointConfig, Config, DataConfig, DatasetSpec, LoggingConfig,
                            MeshConfig, ModelConfig, OptimizerConfig, SFTConfig, StageConfig)


def get_config() -> Config:
    pretrain = StageConfig(
        name="pretrain",
        capability="mixed",
        objective="sft",
        datasets=(DatasetSpec(name="synthetic_perception", weight=2.0),
                  DatasetSpec(name="synthetic_textual_reasoning", weight=1.0),
                  DatasetSpec(name="synthetic_visual_reasoning", weight=1.0)),
        steps=300,
        batch_size=16,
        optimizer=OptimizerConfig(lr=2e-3, weight_decay=0.0, warmup_steps=20, schedule="cosine"),
        sft=SFTConfig(target="solution", normalize="token"),
    )
    return Config(
        model=ModelConfig(path="artifacts/tiny_base_init", dtype="float32"),
        mesh=MeshConfig(data=1, fsdp=1, tensor=1),
        data=DataConfig(data_dir="artifacts/data", max_prompt_len=128,
                        length_buckets=(192,), min_pixels_per_image=28 * 28 * 4,
                        max_pixels_per_image=112 * 112),
        stages=(pretrain,),
        checkpoint=CheckpointConfig(every=100, keep=1),
        logging=LoggingConfig(every=10),
    )

"""Base pre-training of the tiny demo model, two short cross-entropy stages, so the base answers some
perception questions right and many wrong. Run by `python -m vlm_jax.demo_setup` (which sets
model.path and data.data_dir):

  python -m vlm_jax.train --config configs/pretrain_tiny.py --workdir workdirs/pretrain_tiny \
      --config.model.path=artifacts/tiny_base_init

1. `see`: 10 steps of perception questions with the short answer as the target. A random-init
   vision tower learns slowly when the answer is 2 tokens of a 25-token solution; the answer alone
   concentrates the gradient on what the image shows. Its length sets how well the base perceives
   (measured on the demo's colour set, greedy / sampled accuracy: no `see` stage 27% / 19% - chance;
   10 steps 83% / 52%; 20 steps 100% / 79%): 10 leaves room for the perception stage to improve.
2. `instruct`: perception, textual and visual reasoning mixed, reference solutions
   (`<think>...</think> \\boxed{...}`) as targets: the response format and the reasoning templates.
"""

from vlm_jax.config import (CheckpointConfig, Config, DataConfig, DatasetSpec, LoggingConfig,
                            MeshConfig, ModelConfig, OptimizerConfig, SFTConfig, StageConfig)


def get_config() -> Config:
    see = StageConfig(
        name="see",
        capability="perception",
        objective="sft",
        datasets=(DatasetSpec(name="synthetic_perception"),),
        steps=10,
        batch_size=32,
        optimizer=OptimizerConfig(lr=1e-3, weight_decay=0.0, warmup_steps=2),
        sft=SFTConfig(target="answer", normalize="token"),
    )
    instruct = StageConfig(
        name="instruct",
        capability="mixed",
        objective="sft",
        datasets=(DatasetSpec(name="synthetic_perception", weight=2.0),
                  DatasetSpec(name="synthetic_textual_reasoning", weight=1.0),
                  DatasetSpec(name="synthetic_visual_reasoning", weight=1.0)),
        steps=200,
        batch_size=16,
        optimizer=OptimizerConfig(lr=2e-3, weight_decay=0.0, warmup_steps=20, schedule="cosine"),
        sft=SFTConfig(target="solution", normalize="token"),
    )
    return Config(
        model=ModelConfig(path="artifacts/tiny_base_init", dtype="float32"),
        mesh=MeshConfig(data=1, fsdp=1, tensor=1),
        data=DataConfig(max_prompt_len=128,  # data_dir: the default data directory (vlm_jax.paths)
                        length_buckets=(192,), min_pixels_per_image=28 * 28 * 4,
                        max_pixels_per_image=112 * 112),
        stages=(see, instruct),
        checkpoint=CheckpointConfig(every=100, keep=1),
        logging=LoggingConfig(every=10),
    )

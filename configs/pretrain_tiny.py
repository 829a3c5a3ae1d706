"""Base pre-training of the tiny demo model on the grid world (`vlm_jax.data.synthetic.grid`): one
short cross-entropy stage over reference solutions of all three capabilities, so the base knows
the response format and has some of every skill, far from all of it. Run by
`python -m vlm_jax.demo_setup` (which sets model.path and data.data_dir):

  python -m vlm_jax.train --config configs/pretrain_tiny.py --workdir workdirs/pretrain_tiny \
      --config.model.path=artifacts/tiny_base_init

The step count sets how much headroom each stage of the demo has; it was chosen by
`python scripts/pilot_grid.py base` (the base's accuracy per capability against pre-training
steps). Reading all nine cells is learned abruptly: greedy perception 4% after 300 steps, 37% after
400, 86% after 420 (sampled at T=1: 56%), 94% after 450; textual and visual reasoning stay near the
best constant guess (~15%) throughout, so their stages have all the headroom.
"""

from vlm_jax.config import (CheckpointConfig, Config, DataConfig, DatasetSpec, LoggingConfig,
                            MeshConfig, ModelConfig, OptimizerConfig, SFTConfig, StageConfig)
from vlm_jax.data.synthetic.grid import LENGTH_BUCKETS, MAX_PROMPT_LEN

STEPS = 420


def get_config() -> Config:
    instruct = StageConfig(
        name="instruct",
        capability="mixed",
        objective="sft",
        datasets=(DatasetSpec(name="grid_perception", weight=2.0),
                  DatasetSpec(name="grid_textual_reasoning", weight=1.0),
                  DatasetSpec(name="grid_visual_reasoning", weight=1.0)),
        steps=STEPS,
        batch_size=16,
        optimizer=OptimizerConfig(lr=2e-3, weight_decay=0.0, warmup_steps=10, schedule="cosine"),
        sft=SFTConfig(target="solution", normalize="token"),
    )
    return Config(
        model=ModelConfig(path="artifacts/tiny_base_init", dtype="float32"),
        mesh=MeshConfig(data=-1, fsdp=1, tensor=1),  # every device: one on a CPU, batch rows split on several
        data=DataConfig(max_prompt_len=MAX_PROMPT_LEN,  # data_dir: the default data directory (vlm_jax.paths)
                        length_buckets=LENGTH_BUCKETS, min_pixels_per_image=28 * 28 * 4,
                        max_pixels_per_image=112 * 112),
        stages=(instruct,),
        checkpoint=CheckpointConfig(every=0, keep=1),
        logging=LoggingConfig(every=10),
    )

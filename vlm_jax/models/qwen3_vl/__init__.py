"""Qwen3-VL family (dense 2B / 4B / 8B / 32B): what the registry in `vlm_jax.models` needs.

Same family interface as `qwen2_5_vl`: `MODEL_TYPES`, `ARCHITECTURES`, `parse_config(raw, source)`,
`build(cfg, dtype, rngs, options)`, `ModelOptions` (shared), `prepare_inputs(batch, cfg,
num_patches=None)`, `vision_input_specs(cfg, batch, num_patches)` (`num_patches` is
the per-row patch budget), `ModelInputs`, `tensor_map(paths, cfg)`.
"""

from vlm_jax.models.common.inputs import ModelInputs
from vlm_jax.models.qwen3_vl.config import PRESETS, Qwen3VLConfig, from_hf_dict
from vlm_jax.models.qwen3_vl.inputs import VisionInputs, prepare_inputs, vision_input_specs
from vlm_jax.models.qwen3_vl.model import ModelOptions, Qwen3VL
from vlm_jax.models.qwen3_vl.params import tensor_map

MODEL_TYPES = ("qwen3_vl",)
parse_config = from_hf_dict  # (raw config dict, source name) -> typed config
ARCHITECTURES = ("Qwen3VLForConditionalGeneration",)


def build(cfg: Qwen3VLConfig, dtype, rngs, options: ModelOptions = ModelOptions()) -> Qwen3VL:
    return Qwen3VL(cfg, dtype=dtype, rngs=rngs, options=options)


__all__ = ["MODEL_TYPES", "ARCHITECTURES", "PRESETS", "parse_config", "build", "prepare_inputs",
           "tensor_map", "VisionInputs", "ModelInputs", "ModelOptions", "vision_input_specs", "Qwen3VL",
           "Qwen3VLConfig"]

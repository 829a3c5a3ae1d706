"""Qwen2.5-VL family: what the registry in `vlm_jax.models` needs from a model folder.

A family module exposes `MODEL_TYPES`, `ARCHITECTURES` (written on save), `parse_config(raw, source)`,
`build(cfg, dtype, rngs)`, `prepare_inputs(batch, cfg, num_patches=None)` and `tensor_map(param_paths)`.
"""

from vlm_jax.models.qwen2_5_vl.config import ConfigParseError, Qwen25VLConfig, from_hf_dict
from vlm_jax.models.qwen2_5_vl.inputs import (
    ModelInputs,
    VisionInputs,
    prepare_inputs,
    rope_index,
    vision_input_specs,
)
from vlm_jax.models.qwen2_5_vl.model import KVCache, ModelOptions, Qwen25VL
from vlm_jax.models.qwen2_5_vl.params import tensor_map

MODEL_TYPES = ("qwen2_5_vl",)
parse_config = from_hf_dict  # (raw config dict, source name) -> typed config
ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration",)


def build(cfg: Qwen25VLConfig, dtype, rngs, options: ModelOptions = ModelOptions()) -> Qwen25VL:
    return Qwen25VL(cfg, dtype=dtype, rngs=rngs, options=options)


__all__ = ["MODEL_TYPES", "ARCHITECTURES", "parse_config", "build", "prepare_inputs", "vision_input_specs",
           "tensor_map", "ModelInputs", "VisionInputs", "KVCache", "ModelOptions", "Qwen25VL", "Qwen25VLConfig",
           "ConfigParseError", "rope_index"]

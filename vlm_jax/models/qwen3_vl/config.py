"""Qwen3-VL configuration: parse a Hugging Face `config.json` (transformers-5 nested layout, legacy
`rope_scaling` or v5 `rope_parameters`), plus the hub shapes of the dense sizes (`PRESETS`).

Defaults are transformers' class defaults (`configuration_qwen3_vl.py`), so a file that leaves a field
out means here what it means there (e.g. `head_dim` 128, not hidden / heads).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from vlm_jax.models.common import config as common
from vlm_jax.models.common.config import ConfigParseError, TextSizes, VisionSizes, VLConfig


@dataclasses.dataclass(frozen=True)
class VisionConfig(VisionSizes):
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 3584
    in_channels: int = 3
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @property
    def grid_side(self) -> int:
        """Side of the square learned position-embedding grid."""
        return int(self.num_position_embeddings**0.5)


@dataclasses.dataclass(frozen=True)
class TextConfig(TextSizes):
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, ...] = (24, 20, 20)
    attention_bias: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 128_000


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig(VLConfig):
    text: TextConfig
    vision: VisionConfig

    @property
    def num_deepstack(self) -> int:
        """DeepStack features injected into the decoder (after layers 0 .. n-1)."""
        return len(self.vision.deepstack_visual_indexes)


_REQUIRED_TEXT = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def from_hf_dict(raw: Mapping[str, Any], source: str = "config.json") -> Qwen3VLConfig:
    """Typed config from a HF Qwen3-VL config dict (nested `text_config`; top-level text fields are
    accepted too, nested values win)."""
    text, vis = common.split_text_vision(raw, source, _REQUIRED_TEXT)
    theta, section = common.rope_parameters(text, source, default_theta=5_000_000.0,
                                            default_section=(24, 20, 20))  # transformers' fallback
    if len(section) != 3:
        raise ConfigParseError(f"{source}: mrope_section must have 3 entries, got {list(section)}")
    kw = common.fields_of(TextConfig, text, skip=("rope_theta", "mrope_section"))
    kw.setdefault("num_key_value_heads", text["num_attention_heads"])
    text_cfg = TextConfig(**kw, rope_theta=theta, mrope_section=section)
    vis_theta = (vis.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    vision_cfg = VisionConfig(
        **common.fields_of(VisionConfig, vis, skip=("rope_theta", "deepstack_visual_indexes")),
        deepstack_visual_indexes=tuple(int(i) for i in vis.get("deepstack_visual_indexes", (8, 16, 24))),
        rope_theta=float(vis_theta),
    )
    bad = [i for i in vision_cfg.deepstack_visual_indexes if not 0 <= i < vision_cfg.depth]
    if bad:
        raise ConfigParseError(f"{source}: deepstack_visual_indexes {bad} outside 0..{vision_cfg.depth - 1}")
    if vision_cfg.grid_side**2 != vision_cfg.num_position_embeddings:
        raise ConfigParseError(f"{source}: num_position_embeddings {vision_cfg.num_position_embeddings} is not a square")
    return Qwen3VLConfig(text=text_cfg, vision=vision_cfg, **common.model_fields(raw, text))


def _preset(text: dict, vision: dict, tied: bool) -> dict:
    rope = {"rope_type": "default", "mrope_interleaved": True, "mrope_section": [24, 20, 20]}
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "text_config": {
            "model_type": "qwen3_vl_text", "vocab_size": 151936, "head_dim": 128, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 262144, "rope_scaling": rope, "rope_theta": 5_000_000,
            "attention_bias": False, "hidden_act": "silu", **text,
        },
        "vision_config": {
            "model_type": "qwen3_vl", "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "patch_size": 16,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
            "out_hidden_size": text["hidden_size"], **vision,
        },
        "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "tie_word_embeddings": tied,
    }


_SMALL_VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                     deepstack_visual_indexes=[5, 11, 17])
_LARGE_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                     deepstack_visual_indexes=[8, 16, 24])

# Hub config.json shapes of the dense Qwen3-VL sizes (Instruct and Thinking share them).
PRESETS: dict[str, dict] = {
    "2B": _preset(dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8), _SMALL_VISION, tied=True),
    "4B": _preset(dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                       num_key_value_heads=8), _SMALL_VISION, tied=True),
    "8B": _preset(dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                       num_key_value_heads=8), _LARGE_VISION, tied=False),
    "32B": _preset(dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                        num_key_value_heads=8), _LARGE_VISION, tied=False),
}

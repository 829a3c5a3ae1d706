"""Qwen2.5-VL configuration: parse Hugging Face `config.json` (flat hub layout or transformers-5 nested)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from vlm_jax.models.common.config import ConfigParseError, TextSizes, VisionSizes, VLConfig, fields_of, model_fields
from vlm_jax.models.common.config import rope_parameters, split_text_vision

__all__ = ["ConfigParseError", "Qwen25VLConfig", "TextConfig", "VisionConfig", "from_hf_dict"]


@dataclasses.dataclass(frozen=True)
class VisionConfig(VisionSizes):
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    in_channels: int = 3
    tokens_per_second: int = 2
    hidden_act: str = "silu"
    rope_theta: float = 10000.0


@dataclasses.dataclass(frozen=True)
class TextConfig(TextSizes):
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    hidden_act: str = "silu"
    max_position_embeddings: int = 128_000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig(VLConfig):
    text: TextConfig
    vision: VisionConfig


_REQUIRED_TEXT = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads")


def from_hf_dict(raw: Mapping[str, Any], source: str = "config.json") -> Qwen25VLConfig:
    """Builds the typed config from a HF config dict, flat (hub files) or nested (transformers 5)."""
    text, vis = split_text_vision(raw, source, _REQUIRED_TEXT)
    theta, section = rope_parameters(text, source, default_theta=1_000_000.0)
    text_cfg = TextConfig(**fields_of(TextConfig, text, skip=("rope_theta", "mrope_section")), rope_theta=theta,
                          mrope_section=section)
    if sum(section) * 2 != text_cfg.head_dim:
        raise ConfigParseError(
            f"{source}: 2 * sum(mrope_section)={2 * sum(section)} != head_dim={text_cfg.head_dim}"
        )
    if "embed_dim" in vis and "hidden_size" not in vis:  # Qwen2-VL era name
        vis["hidden_size"] = vis["embed_dim"]
    vis_kwargs = fields_of(VisionConfig, vis, skip=("rope_theta",))
    vis_kwargs["fullatt_block_indexes"] = tuple(vis.get("fullatt_block_indexes", ()))
    vis_kwargs.setdefault("out_hidden_size", text_cfg.hidden_size)
    return Qwen25VLConfig(text=text_cfg, vision=VisionConfig(**vis_kwargs), **model_fields(raw, text))

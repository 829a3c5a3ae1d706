"""Qwen2.5-VL configuration: parse Hugging Face `config.json` (flat hub layout or transformers-5 nested)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class VisionConfig:
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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    hidden_act: str = "silu"
    max_position_embeddings: int = 128_000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False


_TEXT_KEYS = {f.name for f in dataclasses.fields(TextConfig)} - {"rope_theta", "mrope_section"}
_VISION_KEYS = {f.name for f in dataclasses.fields(VisionConfig)} - {"rope_theta"}


class ConfigParseError(ValueError):
    pass


def _rope(text: Mapping[str, Any], source: str) -> tuple[float, tuple[int, ...]]:
    """Reads rope theta and mrope_section from v5 `rope_parameters` or legacy `rope_scaling`/`rope_theta`."""
    params = dict(text.get("rope_parameters") or {})
    legacy = dict(text.get("rope_scaling") or {})
    theta = params.get("rope_theta", text.get("rope_theta", 1_000_000.0))
    section = params.get("mrope_section", legacy.get("mrope_section"))
    if section is None:
        raise ConfigParseError(f"{source}: no mrope_section in rope_parameters or rope_scaling")
    return float(theta), tuple(int(s) for s in section)


def from_hf_dict(raw: Mapping[str, Any], source: str = "config.json") -> Qwen25VLConfig:
    """Builds the typed config from a HF config dict, flat (hub files) or nested (transformers 5)."""
    if "vision_config" not in raw:
        raise ConfigParseError(f"{source}: missing 'vision_config'")
    text = dict(raw["text_config"]) if isinstance(raw.get("text_config"), Mapping) else {}
    # Flat hub layout: text fields live at the top level. Nested values win where both exist.
    for key, value in raw.items():
        if key not in ("text_config", "vision_config"):
            text.setdefault(key, value)
    missing = [
        k
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        )
        if k not in text
    ]
    if missing:
        raise ConfigParseError(f"{source}: text config lacks {missing}")
    theta, section = _rope(text, source)
    text_cfg = TextConfig(
        **{k: text[k] for k in _TEXT_KEYS if k in text}, rope_theta=theta, mrope_section=section
    )
    if sum(section) * 2 != text_cfg.head_dim:
        raise ConfigParseError(
            f"{source}: 2 * sum(mrope_section)={2 * sum(section)} != head_dim={text_cfg.head_dim}"
        )
    vis = dict(raw["vision_config"])
    if "embed_dim" in vis and "hidden_size" not in vis:  # Qwen2-VL era name
        vis["hidden_size"] = vis["embed_dim"]
    vis_kwargs = {k: vis[k] for k in _VISION_KEYS if k in vis}
    vis_kwargs["fullatt_block_indexes"] = tuple(vis.get("fullatt_block_indexes", ()))
    vis_kwargs.setdefault("out_hidden_size", text_cfg.hidden_size)
    vision_cfg = VisionConfig(**vis_kwargs)
    tie = bool(raw.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
    ids = {
        k: int(raw[k])
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        if k in raw
    }
    return Qwen25VLConfig(text=text_cfg, vision=vision_cfg, tie_word_embeddings=tie, **ids)

"""Hugging Face `config.json` parsing both families share: the text / vision split (flat hub layout
or transformers-5 nested), the rotary parameters (v5 `rope_parameters` or legacy `rope_scaling`,
parsed once here), tied embeddings and the special token ids; the typed config's common shape.
A family's `config.py` declares its own text and vision fields and defaults."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

TOKEN_ID_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


class ConfigParseError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class TextSizes:
    """The decoder sizes every family's `config.json` gives (each family's `TextConfig` adds its
    own fields and defaults)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


class VisionSizes:
    """Sizes derived from a vision config's fields (mixed into each family's `VisionConfig`)."""

    hidden_size: int
    num_heads: int
    in_channels: int
    temporal_patch_size: int
    patch_size: int
    spatial_merge_size: int

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
class VLConfig:
    """A vision-language model: its text and vision configs, special token ids, tied embeddings."""

    text: Any  # the family's TextConfig
    vision: Any  # the family's VisionConfig
    # special tokens (hub ids by default): image features go where `image_token_id` stands
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False  # lm_head is the embedding table (no `lm_head.weight`)

    num_deepstack = 0  # DeepStack features injected into the decoder (Qwen3-VL: after layers 0 .. n-1)


def split_text_vision(raw: Mapping[str, Any], source: str, required: tuple[str, ...]) -> tuple[dict, dict]:
    """(text fields, vision fields) of a HF config dict. Text fields live in `text_config`
    (transformers 5) or at the top level (flat hub files); nested values win where both exist."""
    if "vision_config" not in raw:
        raise ConfigParseError(f"{source}: missing 'vision_config'")
    text = dict(raw["text_config"]) if isinstance(raw.get("text_config"), Mapping) else {}
    for key, value in raw.items():
        if key not in ("text_config", "vision_config"):
            text.setdefault(key, value)
    missing = [k for k in required if k not in text]
    if missing:
        raise ConfigParseError(f"{source}: text config lacks {missing}")
    return text, dict(raw["vision_config"])


def rope_parameters(text: Mapping[str, Any], source: str, *, default_theta: float,
                    default_section: tuple[int, ...] | None = None) -> tuple[float, tuple[int, ...]]:
    """(rope theta, mrope_section): from v5 `rope_parameters`, else legacy `rope_scaling` (theta
    also from a plain `rope_theta`), else the family's defaults; no section and no default is an
    error."""
    params = dict(text.get("rope_parameters") or {})
    legacy = dict(text.get("rope_scaling") or {})
    theta = params.get("rope_theta", legacy.get("rope_theta", text.get("rope_theta", default_theta)))
    section = params.get("mrope_section", legacy.get("mrope_section", default_section))
    if section is None:
        raise ConfigParseError(f"{source}: no mrope_section in rope_parameters or rope_scaling")
    return float(theta), tuple(int(s) for s in section)


def model_fields(raw: Mapping[str, Any], text: Mapping[str, Any]) -> dict[str, Any]:
    """`VLConfig`'s own fields: tied embeddings (older configs keep the flag inside `text_config`)
    and the special token ids the file gives."""
    tie = bool(raw.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
    return dict(tie_word_embeddings=tie, **{k: int(raw[k]) for k in TOKEN_ID_KEYS if k in raw})


def fields_of(cls, values: Mapping[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The entries of `values` that are fields of dataclass `cls` (less `skip`), None dropped."""
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    return {k: v for k, v in values.items() if k in names and v is not None}

"""The tiny real-format Qwen2.5-VL directory (`vlm_jax.models.tiny.build_tiny_model` builds it):
its sizes (`TinySpec`), chat template, processor and `config.json` (nested or flat hub layout) and
weight names. The tokenizer, corpus and writers are shared (`vlm_jax.models.common.tiny`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlm_jax.models.common import tiny as common
from vlm_jax.models.common.tiny import ADDED_TOKENS, SPECIAL_TOKENS, token_fields

# The Qwen2-VL / Qwen2.5-VL-Instruct chat template (hub `chat_template.json`), verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinySpec(common.TinySizes):
    """Sizes of the tiny model; the defaults exercise every path (GQA, partial windows, MRoPE)."""

    num_hidden_layers: int = 2
    head_dim: int = 16
    mrope_section: tuple[int, ...] = (2, 3, 3)
    rope_theta: float = 1e6
    vision_depth: int = 2
    patch_size: int = 14
    window_size: int = 56
    fullatt_block_indexes: tuple[int, ...] = (1,)
    tokens_per_second: int = 2

    def __post_init__(self) -> None:
        n_fixed = 256 + len(SPECIAL_TOKENS) + len(ADDED_TOKENS)
        checks = (
            (self.hidden_size == self.num_attention_heads * self.head_dim,
             f"hidden_size ({self.hidden_size}) must equal num_attention_heads "
             f"({self.num_attention_heads}) * head_dim ({self.head_dim})"),
            (self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
             f"num_key_value_heads ({self.num_key_value_heads})"),
            (2 * sum(self.mrope_section) == self.head_dim,
             f"sum(mrope_section) ({sum(self.mrope_section)}) must equal head_dim/2"),
            (self.vision_hidden_size % self.vision_num_heads == 0,
             f"vision_hidden_size ({self.vision_hidden_size}) must be divisible by "
             f"vision_num_heads ({self.vision_num_heads})"),
            (all(0 <= i < self.vision_depth for i in self.fullatt_block_indexes),
             f"fullatt_block_indexes {list(self.fullatt_block_indexes)} out of range for "
             f"vision_depth {self.vision_depth}"),
            (self.vocab_size > n_fixed,
             f"vocab_size ({self.vocab_size}) must exceed 256 bytes + added tokens ({n_fixed})"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TinySpec: {message}")


def preprocessor_config(spec: TinySpec, min_pixels: int, max_pixels: int) -> dict[str, Any]:
    """`preprocessor_config.json` for the Qwen2-VL image processor (hub layout, small bounds)."""
    return common.preprocessor_config(spec, min_pixels, max_pixels, processor_class="Qwen2_5_VLProcessor",
                                      mean=CLIP_MEAN, std=CLIP_STD, pixel_keys=True)


def _vision_fields(spec: TinySpec) -> dict[str, Any]:
    """Vision fields in the hub's key order (the nested layout drops the legacy keys)."""
    return {
        "depth": spec.vision_depth, "hidden_act": "silu", "hidden_size": spec.vision_hidden_size,
        "intermediate_size": spec.vision_intermediate_size, "num_heads": spec.vision_num_heads,
        "in_chans": 3, "out_hidden_size": spec.hidden_size, "patch_size": spec.patch_size,
        "spatial_merge_size": spec.spatial_merge_size, "spatial_patch_size": spec.patch_size,
        "window_size": spec.window_size,
        "fullatt_block_indexes": list(spec.fullatt_block_indexes),
        "tokens_per_second": spec.tokens_per_second,
        "temporal_patch_size": spec.temporal_patch_size,
    }


def _text_fields(spec: TinySpec) -> dict[str, Any]:
    """Qwen2 text fields shared by both layouts (rope and token ids are added per layout)."""
    return {
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads, "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings, "rms_norm_eps": spec.rms_norm_eps,
        "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True,
        "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": spec.num_hidden_layers,
    }


def model_config(spec: TinySpec, ids: Mapping[str, int], *, flat: bool = False) -> dict[str, Any]:
    """`config.json` content: transformers-5 nested layout, or the hub's flat layout."""
    common.check_ids(ids, spec.vocab_size)
    tokens = token_fields(ids)
    head = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl"}
    if flat:
        return {
            **head, **_text_fields(spec), **tokens,
            "rope_theta": spec.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(spec.mrope_section)},
            "tie_word_embeddings": spec.tie_word_embeddings,
            "torch_dtype": "float32",
            "vision_config": _vision_fields(spec),
        }
    text = {
        **_text_fields(spec),
        "model_type": "qwen2_5_vl_text",
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta,
                            "mrope_section": list(spec.mrope_section)},
        "bos_token_id": tokens["bos_token_id"],
        "eos_token_id": tokens["eos_token_id"],
        "pad_token_id": tokens["pad_token_id"],
    }
    vision = {**_vision_fields(spec), "model_type": "qwen2_5_vl_vision", "in_channels": 3}
    vision.pop("in_chans")
    vision.pop("spatial_patch_size")
    top = {k: tokens[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                  "vision_end_token_id")}
    return {**head, "text_config": text, "vision_config": vision, **top,
            "tie_word_embeddings": spec.tie_word_embeddings, "dtype": "float32"}


def _spec_from_config(config: Mapping[str, Any]) -> TinySpec:
    """Recover the sizes from a nested or flat Qwen2.5-VL config dict."""
    text = config.get("text_config") or config
    vision = config["vision_config"]
    rope = text.get("rope_parameters") or text.get("rope_scaling") or config.get("rope_scaling")
    if not rope or "mrope_section" not in rope:
        raise ValueError("config has no mrope_section in rope_parameters/rope_scaling")
    heads = text["num_attention_heads"]
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return TinySpec(
        vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"], num_hidden_layers=text["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=text["num_key_value_heads"],
        head_dim=text["hidden_size"] // heads, mrope_section=tuple(rope["mrope_section"]),
        tie_word_embeddings=bool(tied),
        vision_depth=vision["depth"], vision_hidden_size=vision["hidden_size"],
        vision_intermediate_size=vision["intermediate_size"], vision_num_heads=vision["num_heads"],
        patch_size=vision["patch_size"], temporal_patch_size=vision["temporal_patch_size"],
        spatial_merge_size=vision["spatial_merge_size"], window_size=vision["window_size"],
        fullatt_block_indexes=tuple(vision["fullatt_block_indexes"]),
    )


def weight_shapes(spec: TinySpec) -> dict[str, tuple[int, ...]]:
    """Checkpoint-file weight names and shapes (qwen-vl-port.md section 1, 'Weight names')."""
    v, iv, m2 = spec.vision_hidden_size, spec.vision_intermediate_size, spec.spatial_merge_size**2
    h, i, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    nh, nkv = spec.num_attention_heads, spec.num_key_value_heads
    p, tp = spec.patch_size, spec.temporal_patch_size
    shapes: dict[str, tuple[int, ...]] = {"visual.patch_embed.proj.weight": (v, 3, tp, p, p)}
    for b in range(spec.vision_depth):
        pre = f"visual.blocks.{b}."
        shapes |= {
            pre + "norm1.weight": (v,), pre + "norm2.weight": (v,),
            pre + "attn.qkv.weight": (3 * v, v), pre + "attn.qkv.bias": (3 * v,),
            pre + "attn.proj.weight": (v, v), pre + "attn.proj.bias": (v,),
            pre + "mlp.gate_proj.weight": (iv, v), pre + "mlp.gate_proj.bias": (iv,),
            pre + "mlp.up_proj.weight": (iv, v), pre + "mlp.up_proj.bias": (iv,),
            pre + "mlp.down_proj.weight": (v, iv), pre + "mlp.down_proj.bias": (v,),
        }
    shapes |= {
        "visual.merger.ln_q.weight": (v,),
        "visual.merger.mlp.0.weight": (v * m2, v * m2), "visual.merger.mlp.0.bias": (v * m2,),
        "visual.merger.mlp.2.weight": (h, v * m2), "visual.merger.mlp.2.bias": (h,),
        "model.embed_tokens.weight": (spec.vocab_size, h),
        "model.norm.weight": (h,),
    }
    for j in range(spec.num_hidden_layers):
        pre = f"model.layers.{j}."
        shapes |= {
            pre + "self_attn.q_proj.weight": (nh * hd, h), pre + "self_attn.q_proj.bias": (nh * hd,),
            pre + "self_attn.k_proj.weight": (nkv * hd, h),
            pre + "self_attn.k_proj.bias": (nkv * hd,),
            pre + "self_attn.v_proj.weight": (nkv * hd, h),
            pre + "self_attn.v_proj.bias": (nkv * hd,),
            pre + "self_attn.o_proj.weight": (h, nh * hd),
            pre + "mlp.gate_proj.weight": (i, h), pre + "mlp.up_proj.weight": (i, h),
            pre + "mlp.down_proj.weight": (h, i),
            pre + "input_layernorm.weight": (h,), pre + "post_attention_layernorm.weight": (h,),
        }
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    return shapes


def random_weights(spec: TinySpec, seed: int = 0, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Random float32 weights where EVERY parameter differs from its default init
    (`common.tiny.random_arrays`)."""
    norms = ("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight", "ln_q.weight")
    return common.random_arrays(weight_shapes(spec), spec.hidden_size, seed, scale, norms)


def write_random_weights(out_dir: str | Path, config: Mapping[str, Any] | TinySpec, seed: int = 0,
                         scale: float = 1.0, *, shards: int = 1) -> list[Path]:
    """Write random weights as ``model.safetensors`` (or ``shards`` files plus
    ``model.safetensors.index.json``); return the written weight files."""
    spec = config if isinstance(config, TinySpec) else _spec_from_config(config)
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    return common.save_weights(out_dir, random_weights(spec, seed, scale), shards)


def build_tiny_model(out_dir: str | Path, *, spec: TinySpec | None = None, flat: bool = False,
                     tied: bool | None = None, seed: int = 0, extra_texts: Sequence[str] = (),
                     vocab_size: int | None = None, min_pixels: int = 28 * 28 * 4, max_pixels: int = 28 * 28 * 64,
                     weights: bool = True, weight_scale: float = 1.0, shards: int = 1) -> Path:
    """Write a complete tiny Qwen2.5-VL directory to `out_dir` (`vlm_jax.models.tiny.build_tiny_model`)."""
    spec = TinySpec() if spec is None else spec
    write = lambda out, spec_, _: write_random_weights(out, spec_, seed, weight_scale, shards=shards)  # noqa: E731
    return common.write_model_dir(
        out_dir, spec, tied=tied, vocab_size=vocab_size, shards=shards, chat_template=CHAT_TEMPLATE,
        extra_texts=extra_texts, preprocessor=preprocessor_config(spec, min_pixels, max_pixels),
        model_config=lambda spec_, ids: model_config(spec_, ids, flat=flat), weights=write if weights else None,
    )

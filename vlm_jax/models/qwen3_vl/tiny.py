"""A tiny but real-format Qwen3-VL Hugging Face directory, offline (the Qwen3-VL twin of
`vlm_jax.models.qwen2_5_vl.tiny`; the tokenizer, corpus, writers are `vlm_jax.models.common.tiny`).

    from vlm_jax.models.tiny import build_tiny_model
    path = build_tiny_model("/tmp/tiny_qwen3", family="qwen3_vl")          # Instruct template
    path = build_tiny_model("/tmp/tiny_qwen3t", family="qwen3_vl", thinking=True)

transformers 5 loads it (`AutoTokenizer`, `Qwen2VLImageProcessorPil`, `Qwen3VLForConditionalGeneration`).
The image processor is Qwen2-VL's with patch 16 (resize factor 32) and mean = std = 0.5.

Chat templates: the Qwen3-VL layout (no default system turn, which Qwen2.5-VL adds; images as
`<|vision_start|><|image_pad|><|vision_end|>`). The Thinking variant opens the generation prompt
with `<think>\\n` and, as Qwen3's template, keeps an assistant turn's `<think>...</think>` reasoning
only for turns after the last user message (earlier turns keep their answer only). Written from the
structure of the Qwen3 / Qwen3-VL hub templates; tools and video timestamps are left out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from vlm_jax.models.common import tiny as common

_CONTENT = (
    "{%- macro render(content) -%}{%- if content is string -%}{{- content -}}{%- else -%}"
    "{%- for item in content -%}"
    "{%- if item.type == 'image' or 'image' in item or 'image_url' in item -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif item.type == 'video' or 'video' in item -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in item -%}{{- item.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{%- endmacro -%}"
)

_HEAD = (
    "{%- set image_count = namespace(value=0) -%}{%- set video_count = namespace(value=0) -%}"
    + _CONTENT
    + "{%- if messages[0].role == 'system' -%}"
    "{{- '<|im_start|>system\\n' -}}{{- render(messages[0].content) -}}{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
)

# Qwen3-VL-Instruct
CHAT_TEMPLATE = (
    _HEAD
    + "{%- for message in messages -%}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}{{- render(message.content) -}}{{- '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}{{- render(message.content) -}}{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen3-VL-Thinking
THINKING_CHAT_TEMPLATE = (
    _HEAD
    + "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for message in messages -%}{%- if message.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}{{- render(message.content) -}}{{- '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{%- set content = render(message.content) -%}{%- set reasoning = '' -%}"
    "{%- if message.reasoning_content is string -%}{%- set reasoning = message.reasoning_content -%}"
    "{%- elif '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.index0 > ns.last_query -%}"
    "{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') -}}"
    "{%- else -%}{{- content -}}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}"
)

HALF = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinySpec(common.TinySizes):
    """Sizes of the tiny Qwen3-VL: explicit head_dim (!= hidden / heads), two DeepStack features,
    a learned 8 x 8 position grid."""

    mrope_section: tuple[int, ...] = (6, 5, 5)  # interleaved: head_dim / 2 = 16 frequencies
    num_hidden_layers: int = 3
    head_dim: int = 32
    rope_theta: float = 5e6
    vision_depth: int = 3
    patch_size: int = 16
    num_position_embeddings: int = 64
    deepstack_visual_indexes: tuple[int, ...] = (0, 2)

    def __post_init__(self) -> None:
        checks = (
            (self.num_attention_heads % self.num_key_value_heads == 0,
             "num_attention_heads must be a multiple of num_key_value_heads"),
            (self.head_dim % 2 == 0, "head_dim must be even"),
            (self.vision_hidden_size % self.vision_num_heads == 0,
             "vision_hidden_size must be divisible by vision_num_heads"),
            (all(0 <= i < self.vision_depth for i in self.deepstack_visual_indexes),
             f"deepstack_visual_indexes {list(self.deepstack_visual_indexes)} out of range for "
             f"vision_depth {self.vision_depth}"),
            (int(self.num_position_embeddings**0.5) ** 2 == self.num_position_embeddings,
             "num_position_embeddings must be a square"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TinySpec (qwen3_vl): {message}")


def preprocessor_config(spec: TinySpec, min_pixels: int, max_pixels: int) -> dict[str, Any]:
    """`preprocessor_config.json`: Qwen2-VL image processor, patch 16, mean = std = 0.5."""
    return common.preprocessor_config(spec, min_pixels, max_pixels, processor_class="Qwen3VLProcessor", mean=HALF,
                                      std=HALF, pixel_keys=False)


def model_config(spec: TinySpec, ids: Mapping[str, int]) -> dict[str, Any]:
    """`config.json` in the hub Qwen3-VL layout (nested, legacy `rope_scaling` + `rope_theta`)."""
    common.check_ids(ids, spec.vocab_size)
    tokens = common.token_fields(ids)
    text = {
        "model_type": "qwen3_vl_text", "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads, "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim, "hidden_act": "silu", "rms_norm_eps": spec.rms_norm_eps,
        "max_position_embeddings": spec.max_position_embeddings, "attention_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "rope_scaling": {"rope_type": "default", "mrope_interleaved": True,
                         "mrope_section": list(spec.mrope_section)},
        "rope_theta": spec.rope_theta,
        "bos_token_id": tokens["bos_token_id"], "eos_token_id": tokens["eos_token_id"],
        "pad_token_id": tokens["pad_token_id"],
    }
    vision = {
        "model_type": "qwen3_vl", "depth": spec.vision_depth, "hidden_size": spec.vision_hidden_size,
        "intermediate_size": spec.vision_intermediate_size, "num_heads": spec.vision_num_heads,
        "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "patch_size": spec.patch_size,
        "temporal_patch_size": spec.temporal_patch_size, "spatial_merge_size": spec.spatial_merge_size,
        "out_hidden_size": spec.hidden_size, "num_position_embeddings": spec.num_position_embeddings,
        "deepstack_visual_indexes": list(spec.deepstack_visual_indexes), "initializer_range": 0.02,
    }
    top = {k: tokens[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                  "vision_end_token_id")}
    return {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
            "text_config": text, "vision_config": vision, **top,
            "tie_word_embeddings": spec.tie_word_embeddings, "dtype": "float32"}


def weight_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Checkpoint weight names and file shapes, from this package's own parameter map (the
    transformers-loads test checks them against `Qwen3VLForConditionalGeneration`)."""
    import jax.numpy as jnp
    from flax import nnx

    from vlm_jax.models import _path, abstract_model
    from vlm_jax.models import qwen3_vl as family

    cfg = family.parse_config(dict(config))
    _, state = abstract_model(family, cfg, jnp.float32)
    flat = nnx.to_flat_state(state)
    specs = family.tensor_map([_path(p) for p, _ in flat], cfg)
    out = {}
    for key_path, var in flat:
        spec = specs[_path(key_path)]
        shape = tuple(var.shape)
        if spec.layout == "linear":
            shape = shape[::-1]
        elif spec.layout == "patch":
            shape = spec.file_shape
        out[spec.names[0]] = shape
    return out


def random_weights(config: Mapping[str, Any], seed: int = 0, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Random float32 weights, every parameter away from its default init (`common.tiny.random_arrays`)."""
    norms = ("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight")
    return common.random_arrays(weight_shapes(config), config["text_config"]["hidden_size"], seed, scale, norms)


def write_random_weights(out_dir: Path, config: Mapping[str, Any], seed: int = 0, scale: float = 1.0,
                         shards: int = 1) -> list[Path]:
    """``model.safetensors``, or `shards` files plus ``model.safetensors.index.json``."""
    return common.save_weights(out_dir, random_weights(config, seed, scale), shards)


def build_tiny_model(
    out_dir: str | Path,
    *,
    spec: TinySpec = TinySpec(),
    tied: bool | None = None,
    thinking: bool = False,
    seed: int = 0,
    extra_texts: Sequence[str] = (),
    vocab_size: int | None = None,
    min_pixels: int = 32 * 32 * 4,
    max_pixels: int = 32 * 32 * 64,
    weights: bool = True,
    weight_scale: float = 1.0,
    shards: int = 1,
) -> Path:
    """Write a complete tiny Qwen3-VL directory (`thinking`: the Thinking chat template)."""
    write = lambda out, _, config: write_random_weights(out, config, seed, weight_scale, shards)  # noqa: E731
    return common.write_model_dir(
        out_dir, spec, tied=tied, vocab_size=vocab_size, shards=shards,
        chat_template=THINKING_CHAT_TEMPLATE if thinking else CHAT_TEMPLATE, extra_texts=extra_texts,
        preprocessor=preprocessor_config(spec, min_pixels, max_pixels), model_config=model_config,
        weights=write if weights else None,
    )

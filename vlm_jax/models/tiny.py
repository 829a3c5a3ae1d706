"""Build a tiny but *real-format* Qwen2.5-VL Hugging Face directory, offline.

The directory holds everything a hub checkpoint holds (``tokenizer.json``, ``tokenizer_config.json``
with the Qwen2-VL chat template, ``preprocessor_config.json``, ``config.json``,
``generation_config.json``, safetensors weights), so tests and the CPU demo exercise the same
loading code as a 7B checkpoint, and transformers 5 loads it too (``AutoTokenizer``,
``AutoImageProcessor``, ``Qwen2_5_VLForConditionalGeneration``). Nothing is downloaded: the
byte-level BPE tokenizer is trained here on a deterministic built-in corpus.

Usage::

    from vlm_jax.models.tiny import build_tiny_model
    path = build_tiny_model("/tmp/tiny_qwen")  # nested config, untied, random weights

Image processor note: without torchvision, ``AutoImageProcessor.from_pretrained(path)`` resolves to
the PIL backend (``Qwen2VLImageProcessorPil``); to be explicit, pass ``backend="pil"`` or use
``transformers.Qwen2VLImageProcessorPil.from_pretrained(path)``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Qwen special tokens in the hub order; they take the last ids of the tokenizer.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Non-special added tokens: reasoning markers stay visible after `skip_special_tokens` decoding.
ADDED_TOKENS: tuple[str, ...] = ("<think>", "</think>")

# Qwen2 pre-tokenizer split pattern (transformers/models/qwen2/tokenization_qwen2.py).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

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


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny model; the defaults exercise every path (GQA, partial windows, MRoPE)."""

    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    mrope_section: tuple[int, ...] = (2, 3, 3)
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    vision_depth: int = 2
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_num_heads: int = 2
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
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


# --------------------------------------------------------------------------------------------
# Corpus and tokenizer
# --------------------------------------------------------------------------------------------

_SHAPES = ("circle", "square", "triangle", "rectangle", "star", "hexagon", "diamond", "oval")
_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "gray", "pink")
_POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center",
              "in the top left corner", "in the bottom right corner", "next to the border")
_NAMES = ("Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Leo", "Zoe")
_ITEMS = ("apples", "books", "coins", "pencils", "marbles", "cards", "stickers", "shells")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                 "ten")
_ANIMALS = ("cat", "dog", "bird", "horse", "rabbit", "turtle", "elephant", "giraffe", "monkey",
            "penguin", "dolphin", "butterfly", "squirrel", "tiger", "zebra", "kangaroo")
_OBJECTS = ("table", "chair", "window", "flower", "tree", "house", "bicycle", "umbrella", "bottle",
            "basket", "ladder", "mirror", "lamp", "bridge", "mountain", "river", "cloud", "garden",
            "kitchen", "picture", "triangle", "pyramid", "cylinder", "sphere", "cube", "arrow")
_ADJECTIVES = ("small", "large", "tiny", "huge", "bright", "dark", "striped", "dotted", "shiny",
               "wooden", "metal", "round", "narrow", "wide", "tall", "short", "heavy", "quiet")
_VERBS = ("sits", "stands", "jumps", "sleeps", "walks", "looks", "waits", "rests", "hides",
          "plays", "swims", "climbs", "points", "leans", "floats", "appears")
_PREPOSITIONS = ("above", "below", "beside", "behind", "between", "under", "over", "near",
                 "inside", "outside", "across", "around", "against", "along")
_QUESTIONS = ("Describe the image.", "What colour is the largest shape?", "Count the objects.",
              "Where is the smallest shape?", "Which object is closest to the center?",
              "Explain your reasoning step by step.", "Answer with a single number.",
              "Put the final answer in a box.", "Is the statement true or false?")


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def _perception_line(rng: random.Random) -> str:
    n, shape, colour = rng.randint(1, 9), rng.choice(_SHAPES), rng.choice(_COLOURS)
    pos = rng.choice(_POSITIONS)
    kind = rng.randrange(4)
    if kind == 0:
        return f"There {'is' if n == 1 else 'are'} {n} {colour} {_plural(shape, n)} {pos}."
    if kind == 1:
        return (f"How many {colour} {_plural(shape, 2)} are in the image? "
                f"<think>I count them one by one: {', '.join(str(i) for i in range(1, n + 1))}."
                f"</think> \\boxed{{{n}}}")
    if kind == 2:
        x0, y0 = rng.randrange(0, 200, 4), rng.randrange(0, 200, 4)
        x1, y1 = x0 + rng.randrange(8, 100, 4), y0 + rng.randrange(8, 100, 4)
        return (f"The {colour} {shape} is {pos}, inside the box "
                f"<|box_start|>({x0},{y0}),({x1},{y1})<|box_end|>.")
    other = rng.choice(_COLOURS)
    return f"Which shape is {pos}? The {colour} {shape}, not the {other} one. \\boxed{{{shape}}}"


def _arithmetic_line(rng: random.Random) -> str:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 60), rng.randint(1, 40)
    kind = rng.randrange(3)
    if kind == 0:
        return (f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now? "
                f"<think>{a} + {b} = {a + b}</think> The answer is \\boxed{{{a + b}}}.")
    if kind == 1:
        big, small = max(a, b), min(a, b)
        return (f"{name} had {big} {item} and gave away {small}. How many are left? "
                f"<think>{big} - {small} = {big - small}</think> \\boxed{{{big - small}}}")
    k = rng.randint(2, 9)
    return (f"There are {k} boxes with {b} {item} in each box. How many {item} in total? "
            f"<think>{k} * {b} = {k * b}</think> So the total is \\boxed{{{k * b}}}.")


def _digit_line(rng: random.Random) -> str:
    n = rng.randint(10, 99999)
    digits = ", ".join(str(n))
    words = " ".join(_NUMBER_WORDS[int(d)] for d in str(n))
    return f"The number {n} has the digits {digits}, read as {words}."


def _scene_line(rng: random.Random) -> str:
    adj, animal, verb = rng.choice(_ADJECTIVES), rng.choice(_ANIMALS), rng.choice(_VERBS)
    prep, obj, colour = rng.choice(_PREPOSITIONS), rng.choice(_OBJECTS), rng.choice(_COLOURS)
    question = rng.choice(_QUESTIONS)
    return f"{question} A {adj} {animal} {verb} {prep} the {colour} {obj}."


def builtin_corpus(num_lines: int = 3000) -> list[str]:
    """Deterministic simple English about shapes, colours, objects, counting, positions, digits
    and arithmetic word problems with ``<think>...</think>`` and ``\\boxed{}`` solutions."""
    rng = random.Random(1234)
    makers = (_perception_line, _arithmetic_line, _digit_line, _scene_line)
    lines = [f"{i} is written as {_NUMBER_WORDS[i]}." for i in range(len(_NUMBER_WORDS))]
    lines += [f"A {c} {s}." for c in _COLOURS for s in _SHAPES]
    words = (*_ANIMALS, *_OBJECTS, *_ADJECTIVES, *_VERBS, *_PREPOSITIONS, *_NAMES, *_ITEMS)
    lines += [f"{w.capitalize()}: the word {w} is spelled {'-'.join(w)}." for w in words]
    while len(lines) < num_lines:
        lines.append(makers[len(lines) % len(makers)](rng))
    return lines[:num_lines]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Any:
    """Train a Qwen2-style byte-level BPE (`tokenizers.Tokenizer`) on `texts`.

    The BPE part gets ``vocab_size - 16`` ids (256 bytes + merges); the Qwen special tokens and
    ``<think>``/``</think>`` follow at the end, so every id is ``< vocab_size``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, trainers

    n_added = len(SPECIAL_TOKENS) + len(ADDED_TOKENS)
    if vocab_size <= 256 + n_added:
        raise ValueError(f"vocab_size ({vocab_size}) must exceed 256 bytes + {n_added} added tokens")
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_added,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    # Special/added token strings are matched whole at encode time: keep them out of the merges.
    markers = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS + ADDED_TOKENS))
    tok.train_from_iterator([markers.sub(" ", t) for t in texts], trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return tok


def token_ids(tok: Any) -> dict[str, int]:
    """Ids of the special and added tokens in a trained tokenizer, by token string."""
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + ADDED_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer lacks tokens {missing}")
    return ids


def _tokenizer_config(chat_template: str = CHAT_TEMPLATE) -> dict[str, Any]:
    """`tokenizer_config.json`: roles of the special tokens and the chat template (ids live in
    `tokenizer.json`)."""
    return {
        "tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": False, "errors": "replace",
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "model_max_length": 32768, "chat_template": chat_template,
    }


def write_tokenizer(
    out_dir: Path, texts: Sequence[str], vocab_size: int, chat_template: str = CHAT_TEMPLATE
) -> dict[str, int]:
    """Train and save the tokenizer files (with `chat_template`); return the special/added token ids."""
    tok = train_tokenizer(texts, vocab_size)
    tok.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(chat_template))
    _write_json(out_dir / "chat_template.json", {"chat_template": chat_template})
    return token_ids(tok)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def preprocessor_config(spec: TinySpec, min_pixels: int, max_pixels: int) -> dict[str, Any]:
    """`preprocessor_config.json` for the Qwen2-VL image processor (hub layout, small bounds)."""
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels ({min_pixels}) <= max_pixels ({max_pixels})")
    return {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "do_convert_rgb": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "min_pixels": min_pixels, "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": spec.patch_size, "temporal_patch_size": spec.temporal_patch_size,
        "merge_size": spec.spatial_merge_size,
    }


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


def _token_fields(ids: Mapping[str, int]) -> dict[str, int]:
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
    }


def model_config(spec: TinySpec, ids: Mapping[str, int], *, flat: bool = False) -> dict[str, Any]:
    """`config.json` content: transformers-5 nested layout, or the hub's flat layout."""
    bad = {t: i for t, i in ids.items() if not 0 <= i < spec.vocab_size}
    if bad:
        raise ValueError(f"token ids {bad} fall outside the model vocab ({spec.vocab_size})")
    tokens = _token_fields(ids)
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


def generation_config(ids: Mapping[str, int]) -> dict[str, Any]:
    """`generation_config.json`: stop on ``<|im_end|>`` or ``<|endoftext|>``."""
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": False,
    }


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


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
    """Random float32 weights where EVERY parameter differs from its default init.

    Norm weights ~ 1 + 0.1 N(0,1) and biases ~ 0.1 N(0,1), so a mis-mapped norm or bias changes
    the logits; matrices ~ N(0,1) * scale / sqrt(fan_in) (embeddings use the hidden size), which
    keeps activations and logits O(1) at ``scale=1``.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in sorted(weight_shapes(spec).items()):
        noise = rng.standard_normal(shape)
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight",
                          "ln_q.weight")):
            arr = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            arr = 0.1 * noise
        else:
            fan_in = spec.hidden_size if name.endswith("embed_tokens.weight") else int(
                np.prod(shape[1:]))
            arr = noise * (scale / np.sqrt(fan_in))
        out[name] = arr.astype(np.float32)
    return out


def write_random_weights(
    out_dir: str | Path,
    config: Mapping[str, Any] | TinySpec,
    seed: int = 0,
    scale: float = 1.0,
    *,
    shards: int = 1,
) -> list[Path]:
    """Write random weights as ``model.safetensors`` (or ``shards`` files plus
    ``model.safetensors.index.json``); return the written weight files."""
    from safetensors.numpy import save_file

    spec = config if isinstance(config, TinySpec) else _spec_from_config(config)
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    weights = random_weights(spec, seed, scale)
    metadata = {"format": "pt"}
    if shards == 1:
        path = out / "model.safetensors"
        save_file(weights, str(path), metadata=metadata)
        return [path]
    names = sorted(weights)
    groups = [names[k::shards] for k in range(shards)]
    paths, weight_map = [], {}
    for k, group in enumerate(groups):
        path = out / f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: weights[n] for n in group}, str(path), metadata=metadata)
        weight_map |= {n: path.name for n in group}
        paths.append(path)
    total = sum(a.nbytes for a in weights.values())
    _write_json(out / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return paths


# --------------------------------------------------------------------------------------------
# Top level
# --------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


FAMILIES = ("qwen2_5_vl", "qwen3_vl")


def build_tiny_model(
    out_dir: str | Path,
    *,
    family: str = "qwen2_5_vl",
    spec: TinySpec | None = None,
    flat: bool = False,
    tied: bool | None = None,
    seed: int = 0,
    extra_texts: Sequence[str] = (),
    vocab_size: int | None = None,
    min_pixels: int = 28 * 28 * 4,
    max_pixels: int = 28 * 28 * 64,
    weights: bool = True,
    weight_scale: float = 1.0,
    shards: int = 1,
    thinking: bool = False,
) -> Path:
    """Write a complete tiny Qwen2.5-VL (or, with ``family="qwen3_vl"``, Qwen3-VL: see
    `vlm_jax.models.qwen3_vl.tiny`, whose keyword arguments pass through) directory to `out_dir`
    (overwriting) and return its path.

    `tied` and `vocab_size` override the spec's fields when given. With ``weights=False`` only the
    tokenizer, processor and configs are written (e.g. before a base-training run fills weights).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {list(FAMILIES)}")
    if family == "qwen3_vl":
        from vlm_jax.models.qwen3_vl import tiny as tiny3

        kw = dict(flat=flat, tied=tied, seed=seed, extra_texts=extra_texts, vocab_size=vocab_size,
                  weights=weights, weight_scale=weight_scale, shards=shards, thinking=thinking)
        if flat:
            raise ValueError("Qwen3-VL configs are nested only (flat=True is a Qwen2.5-VL layout)")
        kw.pop("flat")
        if min_pixels != 28 * 28 * 4 or max_pixels != 28 * 28 * 64:
            kw.update(min_pixels=min_pixels, max_pixels=max_pixels)
        return tiny3.build_tiny_model(out_dir, **({"spec": spec} if spec is not None else {}), **kw)
    if thinking:
        raise ValueError("thinking=True is a Qwen3-VL chat template (family='qwen3_vl')")
    spec = TinySpec() if spec is None else spec
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    overrides: dict[str, Any] = {}
    if tied is not None:
        overrides["tie_word_embeddings"] = tied
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    spec = dataclasses.replace(spec, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(out, [*builtin_corpus(), *extra_texts], spec.vocab_size)
    _write_json(out / "preprocessor_config.json", preprocessor_config(spec, min_pixels, max_pixels))
    _write_json(out / "config.json", model_config(spec, ids, flat=flat))
    _write_json(out / "generation_config.json", generation_config(ids))
    if weights:
        write_random_weights(out, spec, seed, weight_scale, shards=shards)
    return out

"""What the tiny real-format model directories of both families share (`vlm_jax.models.tiny`
builds them): the Qwen special tokens, a deterministic built-in corpus, the byte-level BPE
tokenizer trained on it, the processor / generation configs, random weights that differ from every
default init, and the directory writer. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinySizes:
    """The sizes both families' tiny models share, with their common defaults; a family's `TinySpec`
    adds its depth, head size, rotary layout, patch and vision-tower fields."""

    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_num_heads: int = 2
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2


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


def _tokenizer_config(chat_template: str) -> dict[str, Any]:
    """`tokenizer_config.json`: roles of the special tokens and the chat template (ids live in
    `tokenizer.json`)."""
    return {
        "tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": False, "errors": "replace",
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "model_max_length": 32768, "chat_template": chat_template,
    }


def write_tokenizer(out_dir: Path, texts: Sequence[str], vocab_size: int, chat_template: str) -> dict[str, int]:
    """Train and save the tokenizer files (with `chat_template`); return the special/added token ids."""
    tok = train_tokenizer(texts, vocab_size)
    tok.save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json", _tokenizer_config(chat_template))
    write_json(out_dir / "chat_template.json", {"chat_template": chat_template})
    return token_ids(tok)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def preprocessor_config(spec, min_pixels: int, max_pixels: int, *, processor_class: str, mean, std,
                        pixel_keys: bool) -> dict[str, Any]:
    """`preprocessor_config.json` for the Qwen2-VL image processor with small bounds (`pixel_keys`:
    the legacy top-level `min_pixels` / `max_pixels` too)."""
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels ({min_pixels}) <= max_pixels ({max_pixels})")
    pixels = {"min_pixels": min_pixels, "max_pixels": max_pixels} if pixel_keys else {}
    return {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": processor_class,
        "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "do_convert_rgb": True,
        "image_mean": list(mean), "image_std": list(std), **pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": spec.patch_size, "temporal_patch_size": spec.temporal_patch_size,
        "merge_size": spec.spatial_merge_size,
    }


def token_fields(ids: Mapping[str, int]) -> dict[str, int]:
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


def check_ids(ids: Mapping[str, int], vocab_size: int) -> None:
    bad = {t: i for t, i in ids.items() if not 0 <= i < vocab_size}
    if bad:
        raise ValueError(f"token ids {bad} fall outside the model vocab ({vocab_size})")


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


def random_arrays(shapes: Mapping[str, tuple[int, ...]], hidden: int, seed: int, scale: float,
                  norm_suffixes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Random float32 weights where EVERY parameter differs from its default init.

    Norm weights (names ending in `norm_suffixes`) ~ 1 + 0.1 N(0,1) and biases ~ 0.1 N(0,1), so a
    mis-mapped norm or bias changes the logits; matrices ~ N(0,1) * scale / sqrt(fan_in)
    (embeddings use the `hidden` size), which keeps activations and logits O(1) at ``scale=1``.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in sorted(shapes.items()):
        noise = rng.standard_normal(shape)
        if name.endswith(norm_suffixes):
            arr = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            arr = 0.1 * noise
        else:
            fan_in = hidden if name.endswith("embed_tokens.weight") else int(np.prod(shape[1:]))
            arr = noise * (scale / np.sqrt(fan_in))
        out[name] = arr.astype(np.float32)
    return out


def save_weights(out_dir: str | Path, weights: Mapping[str, np.ndarray], shards: int = 1) -> list[Path]:
    """Write `weights` as ``model.safetensors`` (or ``shards`` files plus
    ``model.safetensors.index.json``), replacing earlier weight files; return the written files."""
    from safetensors.numpy import save_file

    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    metadata = {"format": "pt"}
    if shards == 1:
        path = out / "model.safetensors"
        save_file(dict(weights), str(path), metadata=metadata)
        return [path]
    names = sorted(weights)
    paths, weight_map = [], {}
    for k in range(shards):
        group = names[k::shards]
        path = out / f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: weights[n] for n in group}, str(path), metadata=metadata)
        weight_map |= {n: path.name for n in group}
        paths.append(path)
    total = sum(a.nbytes for a in weights.values())
    write_json(out / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return paths


# --------------------------------------------------------------------------------------------
# Top level
# --------------------------------------------------------------------------------------------


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_model_dir(out_dir: str | Path, spec, *, tied: bool | None, vocab_size: int | None, shards: int,
                    chat_template: str, extra_texts: Sequence[str], preprocessor: Mapping[str, Any],
                    model_config: Callable[[Any, Mapping[str, int]], dict], weights: Callable | None) -> Path:
    """A complete tiny model directory at `out_dir` (overwriting): the tokenizer trained on the
    built-in corpus plus `extra_texts` (with `chat_template`), `preprocessor`, `model_config(spec,
    ids)`, the generation config and, unless `weights` is None, `weights(out, spec, config)`.
    `tied` and `vocab_size` override the spec's fields when given."""
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
    ids = write_tokenizer(out, [*builtin_corpus(), *extra_texts], spec.vocab_size, chat_template)
    config = model_config(spec, ids)
    write_json(out / "preprocessor_config.json", preprocessor)
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", generation_config(ids))
    if weights is not None:
        weights(out, spec, config)
    return out

"""Build a tiny but *real-format* Qwen2.5-VL or Qwen3-VL Hugging Face directory, offline.

The directory holds everything a hub checkpoint holds (``tokenizer.json``, ``tokenizer_config.json``
with the chat template, ``preprocessor_config.json``, ``config.json``, ``generation_config.json``,
safetensors weights), so tests and the CPU demo exercise the same loading code as a 7B checkpoint,
and transformers 5 loads it too (``AutoTokenizer``, ``AutoImageProcessor``,
``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration``). Nothing is
downloaded: the byte-level BPE tokenizer is trained here on a deterministic built-in corpus
(`vlm_jax.models.common.tiny`); each family's sizes and files are its `tiny.py`.

Usage::

    from vlm_jax.models.tiny import build_tiny_model
    path = build_tiny_model("/tmp/tiny_qwen")  # nested config, untied, random weights

Image processor note: without torchvision, ``AutoImageProcessor.from_pretrained(path)`` resolves to
the PIL backend (``Qwen2VLImageProcessorPil``); to be explicit, pass ``backend="pil"`` or use
``transformers.Qwen2VLImageProcessorPil.from_pretrained(path)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vlm_jax.models.common.tiny import (  # noqa: F401  (the builder's shared API)
    ADDED_TOKENS,
    SPECIAL_TOKENS,
    builtin_corpus,
    generation_config,
    token_ids,
    train_tokenizer,
)
from vlm_jax.models.qwen2_5_vl import tiny as tiny25
from vlm_jax.models.qwen2_5_vl.tiny import (  # noqa: F401  (Qwen2.5-VL, the default family)
    CHAT_TEMPLATE,
    TinySpec,
    model_config,
    preprocessor_config,
    random_weights,
    weight_shapes,
    write_random_weights,
)
from vlm_jax.models.qwen3_vl import tiny as tiny3

FAMILIES = ("qwen2_5_vl", "qwen3_vl")


def build_tiny_model(
    out_dir: str | Path,
    *,
    family: str = "qwen2_5_vl",
    spec=None,
    flat: bool = False,
    tied: bool | None = None,
    seed: int = 0,
    extra_texts: Sequence[str] = (),
    vocab_size: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    weights: bool = True,
    weight_scale: float = 1.0,
    shards: int = 1,
    thinking: bool = False,
) -> Path:
    """Write a complete tiny Qwen2.5-VL (or, with ``family="qwen3_vl"``, Qwen3-VL) directory to
    `out_dir` (overwriting) and return its path. `spec`: the family's `TinySpec` (default sizes
    when None); `min_pixels` / `max_pixels`: the processor's bounds (None: the family's defaults).

    `tied` and `vocab_size` override the spec's fields when given. With ``weights=False`` only the
    tokenizer, processor and configs are written (e.g. before a base-training run fills weights).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {list(FAMILIES)}")
    kw = dict(tied=tied, seed=seed, extra_texts=extra_texts, vocab_size=vocab_size, weights=weights,
              weight_scale=weight_scale, shards=shards)
    kw |= {k: v for k, v in dict(spec=spec, min_pixels=min_pixels, max_pixels=max_pixels).items() if v is not None}
    if family == "qwen3_vl":
        if flat:
            raise ValueError("Qwen3-VL configs are nested only (flat=True is a Qwen2.5-VL layout)")
        return tiny3.build_tiny_model(out_dir, thinking=thinking, **kw)
    if thinking:
        raise ValueError("thinking=True is a Qwen3-VL chat template (family='qwen3_vl')")
    return tiny25.build_tiny_model(out_dir, flat=flat, **kw)

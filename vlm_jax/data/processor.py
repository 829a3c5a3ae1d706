"""Torch-free stand-in for `transformers.Qwen2_5_VLProcessor`.

In transformers 5.x the composite Qwen2.5-VL processor cannot be built without torchvision (its
video processor needs it), so this wrapper combines the tokenizer (`AutoTokenizer`) and the PIL
image processor (`Qwen2VLImageProcessorPil`) loaded from a model directory, and expands each
``<|image_pad|>`` placeholder to ``t*h*w // merge_size**2`` copies exactly as
`Qwen2_5_VLProcessor.__call__` does. The output dict has the processor's keys, as numpy arrays.

Qwen3-VL directories work the same way: `Qwen3VLProcessor` expands images by the same rule and uses
the same image processor class, configured by the directory's `preprocessor_config.json` (patch 16,
so sides are rounded to multiples of 32, and mean = std = 0.5); patch size, merge size and
normalisation are read from there, never assumed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")


def num_image_tokens(grid_thw: Sequence[int], merge_size: int) -> int:
    """LM placeholder count for one image: ``t*h*w // merge_size**2`` (patch-grid units)."""
    t, h, w = (int(x) for x in grid_thw)
    merge_len = merge_size**2
    if t * h * w % merge_len:
        raise ValueError(f"image grid {(t, h, w)} is not divisible into {merge_size}x{merge_size} "
                         "merge blocks")
    return t * h * w // merge_len


def expand_image_tokens(
    text: str,
    grid_thw_list: Sequence[Sequence[int]],
    merge_size: int,
    image_token: str = IMAGE_TOKEN,
) -> str:
    """Replace the i-th `image_token` in `text` by ``num_image_tokens(grid_thw_list[i])`` copies.

    Raises ValueError when the number of placeholders differs from the number of grids.
    """
    parts = text.split(image_token)
    if len(parts) - 1 != len(grid_thw_list):
        raise ValueError(f"text has {len(parts) - 1} {image_token} placeholders but "
                         f"{len(grid_thw_list)} images")
    out = [parts[0]]
    for grid, rest in zip(grid_thw_list, parts[1:]):
        out.append(image_token * num_image_tokens(grid, merge_size))
        out.append(rest)
    return "".join(out)


def _pad_rows(
    rows: Sequence[Sequence[int]],
    pad_id: int,
    padding_side: str,
    max_length: int | None,
    pad_to_multiple_of: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pad token rows to one length; return (input_ids, attention_mask) as int32 [B, L]."""
    longest = max((len(r) for r in rows), default=0)
    length = longest if max_length is None else max_length
    if max_length is not None:
        for i, r in enumerate(rows):
            if len(r) > max_length:
                raise ValueError(f"row {i}: {len(r)} tokens exceed max_length={max_length}")
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=np.int32)
    for i, r in enumerate(rows):
        sl = slice(length - len(r), length) if padding_side == "left" else slice(0, len(r))
        ids[i, sl] = r
        mask[i, sl] = 1
    return ids, mask


class Processor:
    """Tokenizer + PIL image processor with the Qwen2.5-VL placeholder expansion, no torch."""

    def __init__(self, tokenizer: Any, image_processor: Any) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.merge_size: int = int(image_processor.merge_size)
        self.image_token: str = IMAGE_TOKEN
        self.image_token_id: int = self._token_id(IMAGE_TOKEN)
        self.video_token_id: int = self._token_id(VIDEO_TOKEN)
        self.eos_token_ids: list[int] = [self._token_id(t) for t in EOS_TOKENS]
        pad = tokenizer.pad_token_id
        self.pad_token_id: int = self._token_id("<|endoftext|>") if pad is None else int(pad)
        patch = image_processor.patch_size
        self.patch_dim: int = 3 * int(image_processor.temporal_patch_size) * patch * patch

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Processor:
        """Load the tokenizer and the PIL image processor from an HF model directory (offline), a
        model directory in a bucket (`gs://...`: its small files are fetched, never the weights) or
        a Hugging Face hub id (`vlm_jax.paths.model_dir`)."""
        from transformers import AutoImageProcessor, AutoTokenizer

        from vlm_jax import paths

        path = paths.model_dir(path)
        if paths.is_url(path):
            names = [p.name for p in path.iterdir() if not p.name.endswith(".safetensors")]
            path = paths.local_files(path, names)
        if not (path / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"{path}: no preprocessor_config.json (not a Qwen-VL directory?)")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        image_processor = AutoImageProcessor.from_pretrained(str(path), backend="pil")
        return cls(tokenizer, image_processor)

    def _token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id or \
                self.tokenizer.convert_ids_to_tokens(tid) != token:
            raise ValueError(f"tokenizer has no token {token!r}")
        return int(tid)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render chat messages to a prompt string with the tokenizer's chat template."""
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)

    def __call__(
        self,
        texts: Sequence[str],
        images: Sequence[Sequence[Any] | None] | None = None,
        *,
        padding_side: Literal["left", "right"] = "left",
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Tokenize a batch with per-row images; returns the Qwen2.5-VL processor's outputs.

        `images[i]` lists the images of row i (``None`` or ``[]`` for a text-only row), in the order
        of that row's ``<|image_pad|>`` placeholders. Keys: ``input_ids``, ``attention_mask``,
        ``mm_token_type_ids`` (int32 [B, L]), ``pixel_values`` (float32 [sum t*h*w, 3*tp*p*p],
        empty when there are no images) and ``image_grid_thw`` (int32 [n_images, 3], batch-then-row
        order).
        """
        texts, per_row = self._check_inputs(texts, images, padding_side)
        flat = [img for row in per_row for img in row]
        if flat:
            out = self.image_processor(flat, return_tensors="np")
            pixel_values = np.asarray(out["pixel_values"], dtype=np.float32)
            grids = np.asarray(out["image_grid_thw"], dtype=np.int32).reshape(-1, 3)
        else:
            pixel_values = np.zeros((0, self.patch_dim), dtype=np.float32)
            grids = np.zeros((0, 3), dtype=np.int32)

        expanded, start = [], 0
        for text, row in zip(texts, per_row):
            expanded.append(expand_image_tokens(text, grids[start:start + len(row)].tolist(),
                                                self.merge_size, self.image_token))
            start += len(row)
        rows = self.tokenizer(expanded)["input_ids"]
        input_ids, attention_mask = _pad_rows(rows, self.pad_token_id, padding_side, max_length,
                                              pad_to_multiple_of)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": (input_ids == self.image_token_id).astype(np.int32),
            "pixel_values": pixel_values,
            "image_grid_thw": grids,
        }

    def _check_inputs(
        self,
        texts: Sequence[str],
        images: Sequence[Sequence[Any] | None] | None,
        padding_side: str,
    ) -> tuple[list[str], list[list[Any]]]:
        """Validate the batch layout; return texts and per-row image lists."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, got a single str")
        texts = list(texts)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if images is None:
            per_row: list[list[Any]] = [[] for _ in texts]
        else:
            if len(images) != len(texts):
                raise ValueError(f"images has {len(images)} rows but texts has {len(texts)}")
            per_row = [[] if row is None else list(row) for row in images]
        for i, (text, row) in enumerate(zip(texts, per_row)):
            if not isinstance(text, str):
                raise TypeError(f"row {i}: text must be str, got {type(text).__name__}")
            if VIDEO_TOKEN in text:
                raise ValueError(f"row {i}: {VIDEO_TOKEN} found but videos are not supported")
            n = text.count(self.image_token)
            if n != len(row):
                raise ValueError(
                    f"row {i}: {n} {self.image_token} placeholders but {len(row)} images")
        return texts, per_row

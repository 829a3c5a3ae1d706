"""One data row -> one encoded example: the chat prompt (images in place of each `<image>`
placeholder, the instruction), the SFT target, the image patches, and the reasons a row is skipped
(`Skipped`). `vlm_jax.data.pipeline` batches the examples.
"""

from __future__ import annotations

import dataclasses
import io
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from vlm_jax.data import schema

REASONING_INSTRUCTION = "Think step by step inside <think></think>, then give the final answer in \\boxed{}."
CAPTION_TEMPLATE = "Image description: {caption}"
END_OF_TURN = "<|im_end|>"
MIN_PATCH_BUCKET = 64

PROMPT_TOO_LONG = "prompt_too_long"
SEQUENCE_TOO_LONG = "sequence_too_long"
TOO_MANY_PIXELS = "too_many_pixels"
MISSING_CAPTION = "missing_caption"
MISSING_TARGET = "missing_target"
MISSING_PROMPT = "missing_prompt"
IMAGE_TOKEN_MISMATCH = "image_token_mismatch"
SKIP_REASONS: tuple[str, ...] = (
    PROMPT_TOO_LONG, SEQUENCE_TOO_LONG, TOO_MANY_PIXELS, MISSING_CAPTION, MISSING_TARGET, MISSING_PROMPT,
    IMAGE_TOKEN_MISMATCH, schema.UNREADABLE_IMAGE, schema.IMAGE_COUNT_MISMATCH,
)
HOST_KEYS: tuple[str, ...] = (
    "index", "source", "problem", "answer", "task", "answer_type", "capability", "caption", "solution",
)
TARGET_FIELDS: tuple[str, ...] = ("solution", "answer", "caption")
# What to change when every row is skipped for one reason.
SKIP_HINTS: Mapping[str, str] = {
    PROMPT_TOO_LONG: "raise data.max_prompt_len (and data.length_buckets) or shorten the prompts",
    SEQUENCE_TOO_LONG: "raise the largest data.length_buckets entry or shorten the targets",
    TOO_MANY_PIXELS: "raise data.max_pixels_per_image or use smaller images",
    MISSING_TARGET: "set sft.target to a field the rows have (solution, answer or caption)",
    MISSING_CAPTION: "give the rows a caption or turn sft.caption_as_input off",
    MISSING_PROMPT: "give the rows a non-empty problem",
    schema.UNREADABLE_IMAGE: "check the image paths (--image_dir) and files",
}


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """How one row becomes a token sequence (validated by ``make_dataset``)."""

    prompt_field: str = "problem"
    target_field: str | None = None
    instruction: str = REASONING_INSTRUCTION
    system_prompt: str | None = None
    text_only: bool = False
    max_prompt_len: int = 512
    max_len: int = 512
    max_row_pixels: int | None = None


@dataclasses.dataclass(frozen=True)
class Example:
    """One encoded row: unpadded token arrays, its images' patches, host-side fields."""

    input_ids: np.ndarray  # [n] int32
    mm_token_type_ids: np.ndarray  # [n] int32
    loss_mask: np.ndarray | None  # [n] int32, SFT only
    pixel_values: np.ndarray  # [p, D] float32
    image_grid_thw: np.ndarray  # [k, 3] int32
    host: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A row that cannot be used, carried to the batcher to be counted (or raised)."""

    source: int
    index: int
    reason: str
    detail: str = ""


# --------------------------------------------------------------------------- one row


def user_content(text: str, instruction: str) -> list[dict[str, str]]:
    """Chat content items: an image item per ``<image>``, the text pieces, the instruction."""
    items: list[dict[str, str]] = []
    for k, piece in enumerate(text.split(schema.IMAGE_PLACEHOLDER)):
        if k > 0:
            items.append({"type": "image"})
        if piece.strip():
            items.append({"type": "text", "text": piece.strip()})
    if instruction:
        if items and items[-1]["type"] == "text":
            items[-1] = {"type": "text", "text": f"{items[-1]['text']}\n{instruction}"}
        else:
            items.append({"type": "text", "text": instruction})
    return items


def prompt_inputs(row: Mapping[str, Any], spec: RowSpec) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Chat messages and the images to feed, or raise ``_Unusable``."""
    text = str(row.get(spec.prompt_field, "")).strip()
    if not text:
        raise _Unusable(MISSING_PROMPT, f"empty field {spec.prompt_field!r}")
    images = list(row.get("images", []))
    if schema.count_placeholders(text) != len(images):
        raise _Unusable(schema.IMAGE_COUNT_MISMATCH,
                        f"{schema.count_placeholders(text)} placeholders, {len(images)} images")
    if spec.text_only and images:
        caption = str(row.get("caption", "")).strip()
        if not caption:
            raise _Unusable(MISSING_CAPTION, "text_only needs a caption")
        head, _, tail = text.partition(schema.IMAGE_PLACEHOLDER)
        parts = (head.strip(), CAPTION_TEMPLATE.format(caption=caption),
                 tail.replace(schema.IMAGE_PLACEHOLDER, "").strip())
        text = "\n".join(p for p in parts if p)
        images = []
    messages: list[dict[str, Any]] = []
    if spec.system_prompt is not None:
        messages.append({"role": "system", "content": spec.system_prompt})
    messages.append({"role": "user", "content": user_content(text, spec.instruction)})
    return messages, images


class _Unusable(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _decode(data: bytes, k: int) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except Exception as err:  # noqa: BLE001 - any decoder failure
        raise _Unusable(schema.UNREADABLE_IMAGE, f"image {k}: {err}") from None


def encode_row(row: Mapping[str, Any], processor: Any, spec: RowSpec, *, source: int, index: int) -> Example | Skipped:
    """Tokenize one row (prompt, plus target for SFT); a ``Skipped`` says why it cannot be used."""
    try:
        return _encode(row, processor, spec, source=source, index=index)
    except _Unusable as err:
        return Skipped(source, index, err.reason, err.detail)


def _encode(row: Mapping[str, Any], processor: Any, spec: RowSpec, *, source: int, index: int) -> Example:
    messages, image_bytes = prompt_inputs(row, spec)
    target = ""
    if spec.target_field is not None:
        target = str(row.get(spec.target_field, "")).strip()
        if not target:
            raise _Unusable(MISSING_TARGET, f"empty field {spec.target_field!r}")
    images = [_decode(b, k) for k, b in enumerate(image_bytes)]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    try:
        out = processor([text], [images] if images else None, padding_side="left")
    except ValueError as err:
        raise _Unusable(IMAGE_TOKEN_MISMATCH, str(err)) from None
    ids = np.asarray(out["input_ids"][0], np.int32)[np.asarray(out["attention_mask"][0]) > 0]
    grid = np.asarray(out["image_grid_thw"], np.int32).reshape(-1, 3)
    patches = int(grid.prod(axis=1).sum())
    merge = int(processor.image_processor.merge_size)
    n_image_tokens = int((ids == processor.image_token_id).sum())
    if n_image_tokens != patches // merge**2:
        raise _Unusable(IMAGE_TOKEN_MISMATCH, f"{n_image_tokens} image tokens for {patches // merge**2} features")
    patch = int(processor.image_processor.patch_size)
    if spec.max_row_pixels is not None and patches * patch * patch > spec.max_row_pixels:
        raise _Unusable(TOO_MANY_PIXELS, f"{patches * patch * patch} pixels > {spec.max_row_pixels}")
    if len(ids) > spec.max_prompt_len:
        raise _Unusable(PROMPT_TOO_LONG, f"{len(ids)} tokens > {spec.max_prompt_len}")
    loss_mask = None
    if spec.target_field is not None:
        target_ids = processor.tokenizer(target + END_OF_TURN, add_special_tokens=False)["input_ids"]
        loss_mask = np.concatenate([np.zeros(len(ids), np.int32), np.ones(len(target_ids), np.int32)])
        ids = np.concatenate([ids, np.asarray(target_ids, np.int32)])
        if len(ids) > spec.max_len:
            raise _Unusable(SEQUENCE_TOO_LONG, f"{len(ids)} tokens > {spec.max_len}")
    host = {key: row.get(key, "") for key in HOST_KEYS if key not in ("index", "source")}
    return Example(
        input_ids=ids,
        mm_token_type_ids=(ids == processor.image_token_id).astype(np.int32),
        loss_mask=loss_mask,
        pixel_values=np.asarray(out["pixel_values"], np.float32),
        image_grid_thw=grid,
        host={"index": index, "source": source, **host},
    )


class RowCache:
    """Encoded rows by (source, index), up to ``max_bytes`` of their arrays: a row drawn again (a
    later epoch) is served without reading, decoding and encoding it again. Once the budget is
    spent, further rows are encoded each time they come (no eviction: in shuffled epochs every row
    is as likely to come next as any other). Safe to share between grain's reading threads;
    ``hits`` / ``misses`` count the lookups. One cache serves one list of sources encoded one way:
    several iterators over them (a set evaluated after every stage) may share it; ``bind`` refuses
    a second row spec."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = self.misses = 0
        self.spec: RowSpec | None = None
        self._rows: dict[tuple[int, int], Example | Skipped] = {}
        self._lock = threading.Lock()

    def bind(self, spec: RowSpec) -> None:
        """Ties the cache to the row spec of its rows; a different one raises ``ValueError``."""
        if self.spec is not None and self.spec != spec:
            raise ValueError(f"this row cache holds rows encoded as {self.spec}, not {spec}")
        self.spec = spec

    def get(self, source: int, index: int, encode: Any) -> Example | Skipped:
        """The cached encoding of row ``index`` of ``source``, else ``encode()`` (kept if it fits)."""
        key = (source, index)
        with self._lock:
            found = self._rows.get(key)
            if found is not None:
                self.hits += 1
                return found
            self.misses += 1
        item = encode()
        if self.max_bytes:
            size = _nbytes(item)
            with self._lock:
                if key not in self._rows and self.bytes + size <= self.max_bytes:
                    self._rows[key] = item
                    self.bytes += size
        return item


def _nbytes(item: Example | Skipped) -> int:
    if isinstance(item, Skipped):
        return 64
    arrays = (item.input_ids, item.mm_token_type_ids, item.loss_mask, item.pixel_values, item.image_grid_thw)
    return 512 + sum(a.nbytes for a in arrays if a is not None)

"""The one row schema shared by every data source (synthetic, TFDS, local files).

A row is a flat dict:

==============  =========  ==========================================================
field           type       meaning
==============  =========  ==========================================================
``problem``     str        question text; one ``<image>`` placeholder per image
``answer``      str        ground-truth answer (graded by ``answer_type``)
``images``      list[bytes] encoded images (PNG, JPEG, ...), in placeholder order
``caption``     str        optional dense caption ("" when unknown)
``solution``    str        optional worked solution ("" when unknown)
``pass_rate``   float      optional share of correct samples, -1.0 when unknown
``task``        str        optional generator / benchmark task name
``capability``  str        optional stage: perception / textual_reasoning / ...
``difficulty``  float      optional difficulty level, -1.0 when unknown
``answer_type`` str        optional grader name ("" lets the reward pick its default)
==============  =========  ==========================================================

``validate_row`` says why a row cannot be used (or ``None``); ``normalize_row`` turns a
row from any reader (TFDS gives ``bytes`` for text and ``float32`` scalars, JSON may
give an ``int`` answer) into exactly these python types with defaults filled in.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

IMAGE_PLACEHOLDER = "<image>"

REQUIRED_FIELDS: tuple[str, ...] = ("problem", "answer", "images")
TEXT_FIELDS: tuple[str, ...] = ("problem", "answer", "caption", "solution", "task", "capability", "answer_type")
FLOAT_FIELDS: tuple[str, ...] = ("pass_rate", "difficulty")
OPTIONAL_DEFAULTS: Mapping[str, Any] = {
    "caption": "",
    "solution": "",
    "pass_rate": -1.0,
    "task": "",
    "capability": "",
    "difficulty": -1.0,
    "answer_type": "",
}
FIELDS: tuple[str, ...] = REQUIRED_FIELDS + tuple(OPTIONAL_DEFAULTS)

# Skip reasons (stable strings: they appear in reports and metrics).
MISSING_PROBLEM = "missing_problem"
MISSING_ANSWER = "missing_answer"
BAD_IMAGES = "bad_images_field"
IMAGE_COUNT_MISMATCH = "image_count_mismatch"
UNREADABLE_IMAGE = "unreadable_image"
BAD_FIELD = "bad_field_type"


def _to_text(value: Any) -> str:
    """Text from str / bytes / numpy scalars (TFDS returns bytes without TensorFlow)."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _to_text(value.item())
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"expected text, got a boolean {value!r}")
    if isinstance(value, (str, int, float, np.integer, np.floating)):
        return str(value)
    raise TypeError(f"expected text, got {type(value).__name__}")


def _is_blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    try:
        return not _to_text(value).strip()
    except TypeError:
        return False


def count_placeholders(problem: str) -> int:
    """Number of ``<image>`` placeholders in a problem text."""
    return problem.count(IMAGE_PLACEHOLDER)


def image_is_readable(data: bytes) -> bool:
    """True iff Pillow can fully decode ``data`` (header and pixels)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        return True
    except Exception:  # noqa: BLE001 - any decoder failure means unreadable
        return False


def validate_row(row: Mapping[str, Any], *, check_images: bool = True) -> str | None:
    """Return why ``row`` cannot be used (one of the reason constants), or ``None``.

    Checks, in order: ``problem`` present and non-blank, ``answer`` present and
    non-blank, ``images`` a list of bytes, placeholder count == image count, each
    image decodable by Pillow (skipped with ``check_images=False``), optional fields
    of the right type.
    """
    if _is_blank(row.get("problem")):
        return MISSING_PROBLEM
    if _is_blank(row.get("answer")):
        return MISSING_ANSWER
    images = row.get("images", [])
    if isinstance(images, np.ndarray):
        images = list(images)
    if not isinstance(images, (list, tuple)) or not all(isinstance(b, (bytes, np.bytes_)) for b in images):
        return BAD_IMAGES
    try:
        problem = _to_text(row["problem"])
    except TypeError:
        return BAD_FIELD
    if count_placeholders(problem) != len(images):
        return IMAGE_COUNT_MISMATCH
    if check_images and not all(image_is_readable(bytes(b)) for b in images):
        return UNREADABLE_IMAGE
    try:
        normalize_row(row)
    except (TypeError, ValueError):
        return BAD_FIELD
    return None


def normalize_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``row`` with exactly the schema fields, python types, defaults filled.

    Raises ``KeyError`` for a missing required field and ``TypeError``/``ValueError``
    for a field of the wrong type; unknown fields are dropped.
    """
    missing = [k for k in REQUIRED_FIELDS if k not in row]
    if missing:
        raise KeyError(f"row lacks required field(s) {missing}")
    out: dict[str, Any] = {}
    for key in TEXT_FIELDS:
        value = row.get(key, OPTIONAL_DEFAULTS.get(key))
        out[key] = "" if value is None else _to_text(value)
    for key in FLOAT_FIELDS:
        value = row.get(key)
        out[key] = float(OPTIONAL_DEFAULTS[key]) if value is None or _is_blank_number(value) else float(value)
    out["images"] = [bytes(b) for b in row["images"]]
    return out


def _is_blank_number(value: Any) -> bool:
    return isinstance(value, float) and np.isnan(value)

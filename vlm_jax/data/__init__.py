"""Data for vlm_jax: one row schema, TFDS (ArrayRecord) datasets, local files, grain batches.

Public API (imported lazily, so ``import vlm_jax.data.processor`` stays light):

- ``load(spec, split="train", data_dir=None, *, image_dir=None, strict=False)`` -> source
  (``NAME``, ``NAME[SPLIT]`` or a ``.jsonl``/``.json``/``.parquet`` path; see ``prepare``).
- ``prepare(input_path, name, *, image_dir, data_dir, split, strict)`` -> ``PrepareReport``
  (also ``python -m vlm_jax.data.prepare``).
- ``build_synthetic(data_dir, *, sizes, seed)`` -> the three ``synthetic_*`` datasets.
- ``available_datasets(data_dir)``, ``validate_row(row)``, ``normalize_row(row)``.
- ``make_dataset(sources, processor, *, batch_size, ...)`` -> ``BatchIterator`` of batches.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "IMAGE_PLACEHOLDER": "vlm_jax.data.schema",
    "validate_row": "vlm_jax.data.schema",
    "normalize_row": "vlm_jax.data.schema",
    "build_synthetic": "vlm_jax.data.tfds_builders",
    "available_datasets": "vlm_jax.data.tfds_builders",
    "TfdsSource": "vlm_jax.data.tfds_builders",
    "load": "vlm_jax.data.prepare",
    "prepare": "vlm_jax.data.prepare",
    "PrepareReport": "vlm_jax.data.prepare",
    "BadRowError": "vlm_jax.data.prepare",
    "RowsSource": "vlm_jax.data.prepare",
    "make_dataset": "vlm_jax.data.pipeline",
    "BatchIterator": "vlm_jax.data.pipeline",
    "REASONING_INSTRUCTION": "vlm_jax.data.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlm_jax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

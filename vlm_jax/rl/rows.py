"""Processor-style batch surgery: rows with their images (select, concatenate, the real rows)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

HOST_KEYS = (
    "answer",
    "task",
    "answer_type",
    "capability",
    "problem",
    "index",
    "caption",
    "solution",
    "source",
    "shard",  # the row's data shard among this process's (`data.shards`; absent: one shard)
)


# ------------------------------------------------------------------------------------------------
# processor-style batch surgery (rows with their images)
# ------------------------------------------------------------------------------------------------


def _row_images(batch: Mapping[str, Any], image_token_id: int) -> list[list[int]]:
    """Image indices (into image_grid_thw) owned by each row, from the image-token runs."""
    ids = np.asarray(batch["input_ids"])
    mask = np.asarray(batch.get("attention_mask", np.ones_like(ids))).astype(bool)
    n_images = int(np.asarray(batch.get("num_images", len(batch.get("image_grid_thw", ())))))
    out, k = [], 0
    for b in range(ids.shape[0]):
        is_img = (ids[b] == image_token_id) & mask[b]
        runs = int(np.sum(is_img[1:] & ~is_img[:-1]) + is_img[0]) if len(is_img) else 0
        out.append(list(range(k, k + runs)))
        k += runs
    if k != n_images:
        raise ValueError(f"batch has {k} image-token runs but {n_images} images")
    return out


def select_rows(batch: Mapping[str, Any], rows: Sequence[int], image_token_id: int) -> dict:
    """The sub-batch of `rows` (in that order), with their images, left aligned."""
    owned = _row_images(batch, image_token_id)
    grids = np.asarray(batch.get("image_grid_thw", np.zeros((0, 3)))).reshape(-1, 3)
    sizes = np.prod(grids, axis=-1).astype(int)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    pixels = np.asarray(batch.get("pixel_values", np.zeros((0, 1))))
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    seqs = [ids[r][mask[r].astype(bool)] for r in rows]
    L = max(len(s) for s in seqs)
    new_ids = np.zeros((len(rows), L), np.int32)
    new_mask = np.zeros((len(rows), L), np.int32)
    for i, s in enumerate(seqs):
        new_ids[i, L - len(s) :], new_mask[i, L - len(s) :] = s, 1
    imgs = [j for r in rows for j in owned[r]]
    out = dict(input_ids=new_ids, attention_mask=new_mask)
    if imgs:
        out["image_grid_thw"] = grids[imgs].astype(np.int32)
        out["pixel_values"] = np.concatenate([pixels[offsets[j] : offsets[j + 1]] for j in imgs])
    for key in HOST_KEYS:
        if key in batch:
            out[key] = [batch[key][r] for r in rows]
    return out


def concat_batches(batches: Sequence[Mapping[str, Any]], image_token_id: int) -> dict:
    """Row-wise concatenation of processor-style batches (left aligned to the longest row)."""
    parts = [select_rows(b, range(len(b["input_ids"])), image_token_id) for b in batches]
    L = max(p["input_ids"].shape[1] for p in parts)
    pad = lambda a: np.pad(a, ((0, 0), (L - a.shape[1], 0)))
    out = dict(
        input_ids=np.concatenate([pad(p["input_ids"]) for p in parts]),
        attention_mask=np.concatenate([pad(p["attention_mask"]) for p in parts]),
    )
    with_images = [p for p in parts if "image_grid_thw" in p]
    if with_images:
        out["image_grid_thw"] = np.concatenate([p["image_grid_thw"] for p in with_images])
        out["pixel_values"] = np.concatenate([p["pixel_values"] for p in with_images])
    for key in HOST_KEYS:
        if all(key in p for p in parts):
            out[key] = [v for p in parts for v in p[key]]
    return out


def real_rows(batch: Mapping[str, Any]) -> list[int]:
    """Rows that are real examples (pipeline batches pad a final partial batch with row_mask 0)."""
    n = len(batch["input_ids"])
    if "row_mask" not in batch:
        return list(range(n))
    return [i for i in range(n) if batch["row_mask"][i]]

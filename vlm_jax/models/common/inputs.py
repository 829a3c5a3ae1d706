"""Host-side (numpy) model inputs both families share: the `ModelInputs` container, MRoPE
position ids (transformers' `get_rope_index` for images: the same in Qwen2.5-VL and Qwen3-VL),
the checks of pixels against grids and of image tokens against features, each row's images and its
patch budget. A family adds its own vision layout (`prepare_vision`).

Everything here depends only on token ids and image grid sizes, so it runs on the host once per batch
and hands the jitted model plain arrays of a few bucketed shapes (no retrace per image size).
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping, NamedTuple

import numpy as np

from vlm_jax.shapes import bucket

# Vision patch counts are padded up to one of these sizes (then to multiples of the largest).
PATCH_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class ModelInputs(NamedTuple):
    """Everything the jitted forward needs; all numpy, fixed shapes per bucket."""

    input_ids_BL: np.ndarray  # int32 [B, L]
    attention_mask_BL: np.ndarray  # int32 [B, L]
    positions_3BL: np.ndarray  # int32 [3, B, L] MRoPE (T, H, W) position ids
    vision: Any  # the family's `VisionInputs`, or None


def merge_block_order(h: int, w: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each patch of an h x w patch grid, in merge-block-major order."""
    hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // m, m, w // m, m)
    return (
        hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1),
        wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1),
    )


def check_pixels(pixel_values: np.ndarray, grid_thw: np.ndarray, patch_dim: int) -> int:
    """The number of patches `grid_thw` describes, after checking `pixel_values` against it."""
    n = int(np.prod(grid_thw, axis=-1).sum())
    if pixel_values.shape[0] != n:
        raise ValueError(
            f"pixel_values has {pixel_values.shape[0]} patch rows but image_grid_thw describes {n} patches"
        )
    if pixel_values.shape[-1] != patch_dim:
        raise ValueError(
            f"pixel_values rows have {pixel_values.shape[-1]} values, the vision config "
            f"expects {patch_dim} (3 * temporal_patch_size * patch_size^2)"
        )
    return n


def split_rows(pixel_values: np.ndarray, grid_thw: np.ndarray, images_per_row, merge_unit: int,
               num_patches: int | None):
    """Per row: (its grids [k, 3], its pixel rows), and the per-row patch budget P (default: the
    smallest bucket holding the largest row)."""
    counts = np.asarray(images_per_row, np.int64)
    if counts.sum() != grid_thw.shape[0]:
        raise ValueError(
            f"rows hold {int(counts.sum())} images but image_grid_thw has {grid_thw.shape[0]} rows"
        )
    sizes = np.prod(grid_thw, axis=-1)
    img_start = np.concatenate([[0], np.cumsum(counts)])
    pix_start = np.concatenate([[0], np.cumsum(sizes)])
    rows = []
    for b in range(len(counts)):
        i0, i1 = img_start[b], img_start[b + 1]
        rows.append((grid_thw[i0:i1], pixel_values[pix_start[i0] : pix_start[i1]]))
    largest = max((len(px) for _, px in rows), default=0)
    P = num_patches or bucket(max(largest, 1), PATCH_BUCKETS)
    if P % merge_unit:
        raise ValueError(f"per-row patch budget {P} is not a multiple of the merge unit {merge_unit}")
    for b, (_, px) in enumerate(rows):
        if len(px) > P:
            raise ValueError(
                f"row {b} has {len(px)} image patches, over the per-row patch budget {P} "
                f"(raise data.max_pixels_per_image or use smaller images)"
            )
    return rows, P


def images_per_row(input_ids: np.ndarray, attention_mask: np.ndarray, grid_thw: np.ndarray,
                   image_token_id: int, merge_unit: int) -> np.ndarray:
    """How many of the images (in order) each row holds, from its image-token count (the runs were
    checked against the grids by `rope_index`)."""
    tokens = ((input_ids == image_token_id) & (attention_mask > 0)).sum(1)
    per_image = np.prod(grid_thw, axis=-1) // merge_unit
    bounds = np.concatenate([[0], np.cumsum(per_image)])
    ends = np.cumsum(tokens)
    counts = np.searchsorted(bounds, ends, side="left")
    if not np.all(bounds[counts] == ends):
        raise ValueError("an image's tokens are split over two rows")
    return np.diff(np.concatenate([[0], counts])).astype(np.int64)


def rope_index(
    input_ids: np.ndarray, attention_mask: np.ndarray, grid_thw: np.ndarray | None, cfg
) -> np.ndarray:
    """MRoPE position ids [3, B, L], as transformers' `get_rope_index` for images (padding stays 0)."""
    B, L = input_ids.shape
    m = cfg.vision.spatial_merge_size
    positions = np.zeros((3, B, L), np.int32)
    grids = iter(np.asarray(grid_thw).reshape(-1, 3).tolist()) if grid_thw is not None else iter(())
    n_grids = 0 if grid_thw is None else np.asarray(grid_thw).reshape(-1, 3).shape[0]
    used = 0
    for b in range(B):
        valid = attention_mask[b].astype(bool)
        types = (input_ids[b][valid] == cfg.image_token_id).astype(np.int32)
        chunks, cur = [], 0
        for is_image, group in itertools.groupby(types.tolist()):
            run = len(list(group))
            if not is_image:
                chunks.append(np.broadcast_to(cur + np.arange(run), (3, run)))
                cur += run
                continue
            try:
                t, h, w = next(grids)
            except StopIteration:
                raise ValueError(
                    f"row {b}: more image-token runs than image_grid_thw rows ({n_grids})"
                ) from None
            used += 1
            gh, gw = h // m, w // m
            if run != t * gh * gw:
                raise ValueError(
                    f"Image features and image tokens do not match: row {b} has a run of {run} "
                    f"image tokens but its image grid {t}x{h}x{w} gives {t * gh * gw}"
                )
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            chunks.append(cur + np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]))
            cur += max(gh, gw)
        if chunks:
            positions[:, b, valid] = np.concatenate(chunks, axis=1)
    if used != n_grids:
        raise ValueError(f"image_grid_thw has {n_grids} rows but the tokens contain {used} image runs")
    return positions


def prepare_inputs(
    batch: Mapping[str, Any], cfg, *, prepare_vision, num_patches: int | None = None, with_vision: bool = False,
) -> ModelInputs:
    """Turns a processor-style batch dict (numpy) into `ModelInputs`, the vision inputs laid out by
    the family's `prepare_vision(pixels, grid_thw, cfg, num_patches, images_per_row)`.
    `with_vision`: vision inputs (all padding, `num_patches` per row) even when no row has an image,
    e.g. a process whose rows are all text while other processes' rows of the same batch have images."""
    if "input_ids" not in batch:
        raise ValueError("batch has no 'input_ids'")
    input_ids = np.asarray(batch["input_ids"]).astype(np.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {input_ids.shape}")
    mask = batch.get("attention_mask")
    mask = np.ones_like(input_ids) if mask is None else np.asarray(mask).astype(np.int32)
    grid = batch.get("image_grid_thw")
    grid = None if grid is None or np.asarray(grid).size == 0 else np.asarray(grid).reshape(-1, 3)
    if grid is not None and "num_images" in batch:  # pipeline batches pad grids with zero rows
        grid = grid[: int(np.asarray(batch["num_images"]).sum())]
    if grid is not None and grid.shape[0] == 0:
        grid = None
    n_image_tokens = int(((input_ids == cfg.image_token_id) & (mask > 0)).sum())
    vision = None
    if grid is not None:
        pixels = np.asarray(batch["pixel_values"])
        n = int(np.prod(grid, -1).sum())
        pixels = pixels[:n]
        expected = n // cfg.vision.merge_unit
        if n_image_tokens != expected:
            raise ValueError(
                f"Image features and image tokens do not match: {n_image_tokens} image tokens, "
                f"{expected} merged image features from image_grid_thw"
            )
        positions = rope_index(input_ids, mask, grid, cfg)
        per_row = images_per_row(input_ids, mask, grid, cfg.image_token_id, cfg.vision.merge_unit)
        vision = prepare_vision(pixels, grid, cfg, num_patches, per_row)
    elif n_image_tokens:
        raise ValueError(f"batch has {n_image_tokens} image tokens but no image_grid_thw/pixel_values")
    else:
        positions = rope_index(input_ids, mask, grid, cfg)
        if with_vision:
            if not num_patches:
                raise ValueError("with_vision needs num_patches (the per-row patch budget)")
            vision = prepare_vision(
                np.zeros((0, cfg.vision.patch_dim), np.float32), np.zeros((0, 3), np.int32), cfg, num_patches,
                np.zeros(input_ids.shape[0], np.int64))
    return ModelInputs(input_ids, mask, positions, vision)

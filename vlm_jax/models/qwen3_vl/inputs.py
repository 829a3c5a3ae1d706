"""Host-side (numpy) vision inputs for Qwen3-VL: patches in image order (no windows), per-frame
attention segments, 2-D rope positions and the bilinear taps that resample the learned position
embedding to each image's grid. Token-side inputs (MRoPE positions, checks, bucketing) are shared
(`vlm_jax.models.common.inputs`): for images, Qwen3-VL's `get_rope_index` gives Qwen2.5-VL's positions.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np

from vlm_jax.models.common import inputs as common
from vlm_jax.models.common.inputs import ModelInputs, check_pixels, merge_block_order, split_rows


class VisionInputs(NamedTuple):
    """Vision tower inputs, one row per batch row (its own images, in image order), each padded to
    a per-row patch budget P; padding patches have segment -1 (discarded); a text-only row is all
    padding."""

    patches_BPC: np.ndarray  # float [B, P, C*tp*p*p], merge-block order within each image
    rope_pos_BP2: np.ndarray  # int32 [B, P, 2] (row, col) per patch
    pos_index_BP4: np.ndarray  # int32 [B, P, 4] bilinear taps into the flattened pos_embed table
    pos_weight_BP4: np.ndarray  # float32 [B, P, 4] their weights
    seg_BP: np.ndarray  # int32 [B, P] frame segment id within the row (attention stays inside a frame)
    num_merged_B: np.ndarray  # int32 [B] valid merged tokens per row


def _axis_taps(index: np.ndarray, size: int, side: int, align_corners: bool = True):
    """2 bilinear taps and weights per target index on one axis (transformers'
    `_interpolation_axis_taps_weights`, border padding), computed in float32 as there."""
    f32 = np.float32
    index = index.astype(f32)
    if align_corners:
        src = index * f32(side - 1) / f32(max(size - 1, 1))
    else:
        src = (index + f32(0.5)) * f32(side) / f32(size) - f32(0.5)
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    weights = np.clip(f32(1) - np.abs(src[:, None] - floor[:, None] - offsets.astype(f32)), 0, None)
    return taps, weights.astype(f32)


def pos_embed_taps(h: int, w: int, side: int, merge: int, align_corners: bool = True):
    """(index [h*w, 4], weight [h*w, 4]) resampling a side x side table to an h x w patch grid by
    bilinear interpolation (align_corners=True), patches in merge-block order."""
    rows, cols = merge_block_order(h, w, merge)
    th, wh = _axis_taps(rows, h, side, align_corners)
    tw, ww = _axis_taps(cols, w, side, align_corners)
    index = (th[:, :, None] * side + tw[:, None, :]).reshape(-1, 4)
    weight = (wh[:, :, None] * ww[:, None, :]).reshape(-1, 4)
    return index.astype(np.int32), weight


def prepare_vision(pixel_values: np.ndarray, grid_thw: np.ndarray, cfg, num_patches: int | None = None,
                   images_per_row=None) -> VisionInputs:
    """Each row's images (`images_per_row` [B] of them, in order; default all in one row) padded
    to a per-row budget of `num_patches` patches (default: the smallest bucket holding the largest row)."""
    grid_thw = np.asarray(grid_thw).reshape(-1, 3)
    pixel_values = np.asarray(pixel_values)
    v = cfg.vision
    check_pixels(pixel_values, grid_thw, v.patch_dim)
    if images_per_row is None:
        images_per_row = [grid_thw.shape[0]]
    rows, P = split_rows(pixel_values, grid_thw, images_per_row, v.merge_unit, num_patches)
    B = len(rows)
    patches = np.zeros((B, P, v.patch_dim), np.float32)
    rope = np.zeros((B, P, 2), np.int32)
    index = np.zeros((B, P, 4), np.int32)
    weight = np.zeros((B, P, 4), np.float32)
    seg = np.full((B, P), -1, np.int32)
    merged = np.zeros(B, np.int32)
    for b, (grids, px) in enumerate(rows):
        start, frame = 0, 0
        for t, h, w in grids.astype(np.int64).tolist():
            rows_, cols = merge_block_order(h, w, v.spatial_merge_size)
            i, wt = pos_embed_taps(h, w, v.grid_side, v.spatial_merge_size)
            end = start + t * h * w
            rope[b, start:end] = np.tile(np.stack([rows_, cols], -1), (t, 1))
            index[b, start:end] = np.tile(i, (t, 1))
            weight[b, start:end] = np.tile(wt, (t, 1))
            seg[b, start:end] = np.repeat(np.arange(frame, frame + t), h * w)
            frame += t
            start = end
        patches[b, : len(px)] = px
        merged[b] = len(px) // v.merge_unit
    return VisionInputs(patches, rope, index, weight, seg, merged)


def vision_input_specs(cfg, batch: int, num_patches: int) -> VisionInputs:
    """(shape, numpy dtype) of every `VisionInputs` field for `batch` rows of `num_patches` patches
    each (for abstract inputs, e.g. the memory planner)."""
    B, P = batch, num_patches
    return VisionInputs(
        ((B, P, cfg.vision.patch_dim), np.float32), ((B, P, 2), np.int32), ((B, P, 4), np.int32),
        ((B, P, 4), np.float32), ((B, P), np.int32), ((B,), np.int32),
    )


def prepare_inputs(batch: Mapping[str, Any], cfg, *, num_patches: int | None = None,
                   with_vision: bool = False) -> ModelInputs:
    """A processor-style batch dict (numpy) -> `ModelInputs` (the shared checks and positions,
    this family's vision layout)."""
    return common.prepare_inputs(batch, cfg, prepare_vision=prepare_vision, num_patches=num_patches,
                                 with_vision=with_vision)

"""Host-side (numpy) vision inputs for Qwen3-VL: patches in image order (no windows), per-frame
attention segments, 2-D rope positions and the bilinear taps that resample the learned position
embedding to each image's grid. Token-side inputs (MRoPE positions, checks, bucketing) are
Qwen2.5-VL's: for images Qwen3-VL's `get_rope_index` gives the same positions.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np

from vlm_jax.models.qwen2_5_vl import inputs as q25_inputs
from vlm_jax.models.qwen2_5_vl.inputs import PATCH_BUCKETS, ModelInputs, _merge_block_order
from vlm_jax.shapes import bucket


class VisionInputs(NamedTuple):
    """Vision tower inputs padded to a patch bucket P; padding patches have segment -1 (discarded)."""

    patches_PC: np.ndarray  # float [P, C*tp*p*p], image order (merge-block order within an image)
    rope_pos_P2: np.ndarray  # int32 [P, 2] (row, col) per patch
    pos_index_P4: np.ndarray  # int32 [P, 4] bilinear taps into the flattened pos_embed table
    pos_weight_P4: np.ndarray  # float32 [P, 4] their weights
    seg_P: np.ndarray  # int32 [P] frame segment id (attention stays inside a frame)
    num_merged: np.ndarray  # int32 [] valid merged tokens


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
    rows, cols = _merge_block_order(h, w, merge)
    th, wh = _axis_taps(rows, h, side, align_corners)
    tw, ww = _axis_taps(cols, w, side, align_corners)
    index = (th[:, :, None] * side + tw[:, None, :]).reshape(-1, 4)
    weight = (wh[:, :, None] * ww[:, None, :]).reshape(-1, 4)
    return index.astype(np.int32), weight


def prepare_vision(pixel_values: np.ndarray, grid_thw: np.ndarray, cfg, num_patches: int | None = None) -> VisionInputs:
    grid_thw = np.asarray(grid_thw).reshape(-1, 3)
    v = cfg.vision
    n = int(np.prod(grid_thw, axis=-1).sum())
    if pixel_values.shape[0] != n:
        raise ValueError(
            f"pixel_values has {pixel_values.shape[0]} patch rows but image_grid_thw describes {n} patches"
        )
    if pixel_values.shape[-1] != v.patch_dim:
        raise ValueError(
            f"pixel_values rows have {pixel_values.shape[-1]} values, the vision config "
            f"expects {v.patch_dim} (3 * temporal_patch_size * patch_size^2)"
        )
    P = num_patches or bucket(n, PATCH_BUCKETS)
    if P < n or P % v.merge_unit:
        raise ValueError(f"patch bucket {P} cannot hold {n} patches in merge units of {v.merge_unit}")
    pos, idx, wts, seg = [], [], [], []
    frame = 0
    for t, h, w in grid_thw.astype(np.int64).tolist():
        rows, cols = _merge_block_order(h, w, v.spatial_merge_size)
        i, wt = pos_embed_taps(h, w, v.grid_side, v.spatial_merge_size)
        pos.append(np.tile(np.stack([rows, cols], -1), (t, 1)))
        idx.append(np.tile(i, (t, 1)))
        wts.append(np.tile(wt, (t, 1)))
        seg.append(np.repeat(np.arange(frame, frame + t), h * w))
        frame += t
    pad = P - n

    def padded(parts, width, dtype, fill=0):
        body = np.concatenate(parts).reshape(n, *width)
        return np.concatenate([body, np.full((pad, *width), fill, body.dtype)]).astype(dtype)

    return VisionInputs(
        patches_PC=padded([np.asarray(pixel_values)], (v.patch_dim,), np.float32),
        rope_pos_P2=padded(pos, (2,), np.int32),
        pos_index_P4=padded(idx, (4,), np.int32),
        pos_weight_P4=padded(wts, (4,), np.float32),
        seg_P=padded(seg, (), np.int32, fill=-1),
        num_merged=np.asarray(n // v.merge_unit, np.int32),
    )


def vision_input_specs(cfg, num_patches: int) -> VisionInputs:
    """(shape, numpy dtype) of every `VisionInputs` field for a bucket of `num_patches` patches (for
    abstract inputs, e.g. the memory planner)."""
    P = num_patches
    return VisionInputs(
        ((P, cfg.vision.patch_dim), np.float32), ((P, 2), np.int32), ((P, 4), np.int32),
        ((P, 4), np.float32), ((P,), np.int32), ((), np.int32),
    )


def prepare_inputs(batch: Mapping[str, Any], cfg, *, num_patches: int | None = None) -> ModelInputs:
    """A processor-style batch dict (numpy) -> `ModelInputs` (Qwen2.5-VL's checks and positions,
    this family's vision layout)."""
    return q25_inputs.prepare_inputs(batch, cfg, num_patches=num_patches, prepare_vision_fn=prepare_vision)

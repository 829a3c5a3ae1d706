"""Host-side (numpy) Qwen2.5-VL vision inputs: each row's patches in window order, window and frame
segments, 2-D rope positions. The token side (MRoPE positions, checks, buckets) is shared
(`vlm_jax.models.common.inputs`).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np

from vlm_jax.models.common import inputs as common
from vlm_jax.models.common.inputs import (  # noqa: F401  (re-exported: the family's input API)
    ModelInputs,
    check_pixels,
    images_per_row,
    merge_block_order,
    rope_index,
    split_rows,
)
from vlm_jax.models.qwen2_5_vl.config import Qwen25VLConfig


class VisionInputs(NamedTuple):
    """Vision tower inputs, one row per batch row (its own images, in order), each padded to a
    per-row patch budget P (merged M = P / merge_unit), so the arrays split over the batch like the
    tokens and each shard encodes only its rows' images.

    Within a row, patches are stored in window order (the order the blocks see them);
    `window_inverse_BM` maps the merged outputs back to image order. Padding patches get segment id
    -1 and are discarded; a text-only row is all padding.
    """

    patches_BPC: np.ndarray  # float [B, P, C*tp*p*p], window order within the row
    rope_pos_BP2: np.ndarray  # int32 [B, P, 2] (row, col) per patch, window order
    window_seg_BP: np.ndarray  # int32 [B, P] window segment id within the row (window attention blocks)
    full_seg_BP: np.ndarray  # int32 [B, P] frame segment id within the row (full attention blocks)
    window_inverse_BM: np.ndarray  # int32 [B, M] merged index in window order for each image-order slot
    num_merged_B: np.ndarray  # int32 [B] valid merged tokens per row


def vision_layout(grid_thw: np.ndarray, cfg: Qwen25VLConfig):
    """Window permutation (merged granularity), window/frame segment ids and rope positions, image order.

    Mirrors transformers' `get_vision_window_index`, `get_vision_attention_seqlens` and
    `get_vision_position_ids` for Qwen2.5-VL.
    """
    v = cfg.vision
    m, unit = v.spatial_merge_size, v.merge_unit
    vws = v.window_size // m // v.patch_size
    window_index, window_sizes, frame_sizes, pos = [], [], [], []
    offset = 0
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).tolist():
        gh, gw = h // m, w // m
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = vws - gh % vws, vws - gw % vws
        nwh, nww = (gh + pad_h) // vws, (gw + pad_w) // vws
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        padded = (
            padded.reshape(t, nwh, vws, nww, vws).transpose(0, 1, 3, 2, 4).reshape(t, nwh * nww, vws * vws)
        )
        sizes = (padded != -100).sum(-1).reshape(-1)
        flat = padded.reshape(-1)
        window_index.append(flat[flat != -100] + offset)
        window_sizes.extend(int(s) for s in sizes if s > 0)
        frame_sizes.extend([h * w] * t)
        rows, cols = merge_block_order(h, w, m)
        pos.append(np.tile(np.stack([rows, cols], -1), (t, 1)))
        offset += t * gh * gw
    window_index = np.concatenate(window_index).astype(np.int64)
    # Segment ids per patch. Frame segments are defined in image order; permute to window order.
    window_seg = np.repeat(np.arange(len(window_sizes)), np.asarray(window_sizes) * unit)
    frame_seg_image_order = np.repeat(np.arange(len(frame_sizes)), frame_sizes)
    patch_perm = (window_index[:, None] * unit + np.arange(unit)[None]).reshape(-1)
    return dict(
        window_index=window_index,
        patch_perm=patch_perm,
        window_seg=window_seg,
        full_seg=frame_seg_image_order[patch_perm],
        rope_pos=np.concatenate(pos)[patch_perm],
    )


def vision_input_specs(cfg: Qwen25VLConfig, batch: int, num_patches: int) -> VisionInputs:
    """(shape, numpy dtype) of every `VisionInputs` field for `batch` rows of `num_patches` patches
    each (for abstract inputs, e.g. the memory planner)."""
    B, P, M = batch, num_patches, num_patches // cfg.vision.merge_unit
    return VisionInputs(
        ((B, P, cfg.vision.patch_dim), np.float32), ((B, P, 2), np.int32), ((B, P), np.int32),
        ((B, P), np.int32), ((B, M), np.int32), ((B,), np.int32),
    )


def prepare_vision(
    pixel_values: np.ndarray, grid_thw: np.ndarray, cfg: Qwen25VLConfig, num_patches: int | None = None,
    images_per_row=None,
) -> VisionInputs:
    """Lays out each row's images in window order, padded to a per-row budget of `num_patches`
    patches (default: the smallest bucket holding the largest row). `images_per_row` [B]: how many of
    the images (in order) each row holds (default: all in one row)."""
    grid_thw = np.asarray(grid_thw).reshape(-1, 3)
    pixel_values = np.asarray(pixel_values)
    check_pixels(pixel_values, grid_thw, cfg.vision.patch_dim)
    if images_per_row is None:
        images_per_row = [grid_thw.shape[0]]
    unit = cfg.vision.merge_unit
    rows, P = split_rows(pixel_values, grid_thw, images_per_row, unit, num_patches)
    B, M, C = len(rows), P // unit, cfg.vision.patch_dim
    patches = np.zeros((B, P, C), np.float32)
    rope = np.zeros((B, P, 2), np.int32)
    wseg = np.full((B, P), -1, np.int32)
    fseg = np.full((B, P), -1, np.int32)
    inverse = np.tile(np.arange(M, dtype=np.int32), (B, 1))
    merged = np.zeros(B, np.int32)
    for b, (grids, px) in enumerate(rows):
        n = len(px)
        if n == 0:
            continue
        lay = vision_layout(grids, cfg)
        patches[b, :n] = px[lay["patch_perm"]]
        rope[b, :n] = lay["rope_pos"]
        wseg[b, :n] = lay["window_seg"]
        fseg[b, :n] = lay["full_seg"]
        inverse[b, : n // unit] = np.argsort(lay["window_index"])
        merged[b] = n // unit
    return VisionInputs(patches, rope, wseg, fseg, inverse, merged)


def prepare_inputs(batch: Mapping[str, Any], cfg: Qwen25VLConfig, *, num_patches: int | None = None,
                   with_vision: bool = False) -> ModelInputs:
    """A processor-style batch dict (numpy) -> `ModelInputs` (`common.inputs.prepare_inputs` with
    this family's vision layout)."""
    return common.prepare_inputs(batch, cfg, prepare_vision=prepare_vision, num_patches=num_patches,
                                 with_vision=with_vision)

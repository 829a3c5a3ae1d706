"""Box overlap scores for grounding and detection rewards (pure numpy; boxes are `[x1, y1, x2, y2]`
in one pixel frame, `x2 > x1` and `y2 > y1`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlm_jax.rl.rewards.parsing import Box

# A predicted box must overlap a ground-truth box by at least this IoU to be matched.
DETECTION_IOU_THRESHOLD = 0.5


def is_valid_box(box: Box) -> bool:
    """Whether the box has positive width and height (degenerate or flipped boxes are invalid)."""
    x1, y1, x2, y2 = box
    return x2 > x1 and y2 > y1


def _unit_or(value: float, low: float, default: float) -> float:
    """`value` if finite and within [low, 1], else `default` (coordinates near the float limit can
    overflow areas to inf and give NaN ratios)."""
    return float(value) if np.isfinite(value) and low <= value <= 1.0 else default


def _area(box: Box) -> float:
    x1, y1, x2, y2 = box
    return (x2 - x1) * (y2 - y1)


def iou(a: Box, b: Box) -> float:
    """Intersection over union in [0, 1]; 0 if either box is invalid."""
    if not (is_valid_box(a) and is_valid_box(b)):
        return 0.0
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = _area(a) + _area(b) - inter
    return _unit_or(inter / union, 0.0, 0.0) if union > 0 else 0.0


def giou(a: Box, b: Box) -> float:
    """Generalized IoU (Rezatofighi et al. 2019) in [-1, 1]: IoU minus the fraction of the smallest
    enclosing box not covered by the union. Returns -1 (the worst value) if either box is invalid."""
    if not (is_valid_box(a) and is_valid_box(b)):
        return -1.0
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = _area(a) + _area(b) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    if union <= 0 or hull <= 0:
        return -1.0
    return _unit_or(inter / union - (hull - union) / hull, -1.0, -1.0)


def _iou_matrix(pred: Sequence[Box], gt: Sequence[Box]) -> np.ndarray:
    """IoU of every predicted box (rows) with every ground-truth box (columns); invalid boxes -> 0."""
    # Coordinates near the float limit overflow to inf/NaN; those pairs are zeroed below.
    with np.errstate(all="ignore"):
        p = np.asarray(pred, dtype=np.float64).reshape(-1, 4)
        g = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
        p_ok = (p[:, 2] > p[:, 0]) & (p[:, 3] > p[:, 1])
        g_ok = (g[:, 2] > g[:, 0]) & (g[:, 3] > g[:, 1])
        iw = np.minimum(p[:, None, 2], g[None, :, 2]) - np.maximum(p[:, None, 0], g[None, :, 0])
        ih = np.minimum(p[:, None, 3], g[None, :, 3]) - np.maximum(p[:, None, 1], g[None, :, 1])
        inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
        area_p = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
        area_g = (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1])
        union = area_p[:, None] + area_g[None, :] - inter
        out = np.where(union > 0, inter / union, 0.0)
        out = np.where(p_ok[:, None] & g_ok[None, :] & np.isfinite(out), out, 0.0)
    return out


def greedy_detection_score(pred: Sequence[Box], gt: Sequence[Box],
                           threshold: float = DETECTION_IOU_THRESHOLD) -> float:
    """Sum of matched IoUs / max(n_gt, n_pred), matching greedily by highest IoU first among pairs
    with IoU >= threshold (each box matched at most once). Unmatched and invalid boxes on either
    side lower the score through the denominator. Both lists empty -> 1 (nothing to find, nothing
    claimed)."""
    n = max(len(pred), len(gt))
    if n == 0:
        return 1.0
    if not pred or not gt:
        return 0.0
    ious = _iou_matrix(pred, gt)
    rows, cols = np.nonzero(ious >= threshold)
    order = np.argsort(-ious[rows, cols], kind="stable")
    used_p: set[int] = set()
    used_g: set[int] = set()
    total = 0.0
    for k in order:
        r, c = int(rows[k]), int(cols[k])
        if r in used_p or c in used_g:
            continue
        used_p.add(r)
        used_g.add(c)
        total += float(ious[r, c])
    return total / n

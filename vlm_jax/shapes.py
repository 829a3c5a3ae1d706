"""Shape buckets: padding sizes chosen from a short list so jitted functions see few shapes."""

from __future__ import annotations

from typing import Sequence


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest of `buckets` (ascending) that holds `n`; beyond the largest, the next multiple
    of the largest."""
    for b in buckets:
        if n <= b:
            return b
    return -(-n // buckets[-1]) * buckets[-1]


def chunk_size(n: int, chunk: int) -> int:
    """The largest divisor of `n` that is <= `chunk` (`n` itself when chunk is 0 or >= n)."""
    if chunk <= 0 or chunk >= n:
        return n
    return next(c for c in range(chunk, 0, -1) if n % c == 0)


# Per-row vision patch budgets are rounded up to a multiple of this.
ROW_PATCH_MULTIPLE = 64


def row_patch_budget(max_pixels_per_row: int, patch_size: int) -> int:
    """The vision inputs' per-row patch budget for rows of at most `max_pixels_per_row` pixels in
    `patch_size`-pixel patches, rounded up to a multiple of `ROW_PATCH_MULTIPLE` (one shape for a run)."""
    n = -(-max_pixels_per_row // (patch_size * patch_size))
    return -(-n // ROW_PATCH_MULTIPLE) * ROW_PATCH_MULTIPLE

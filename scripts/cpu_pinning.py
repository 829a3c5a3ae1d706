"""`pin_cpus`, shared by the benchmark scripts; standard library only, so the TRL side of
`bench_grpo.py` (its own venv, no JAX) can import it."""

from __future__ import annotations

import os


def pin_cpus(n: int | None) -> list[int]:
    """Restricts this process to its first `n` allowed cores; threads started later inherit it,
    so this runs before numpy, JAX or torch start their thread pools."""
    allowed = sorted(os.sched_getaffinity(0))
    if n is not None:
        if not 1 <= n <= len(allowed):
            raise SystemExit(f"--cpus {n}: this process may use {len(allowed)} cores {allowed}")
        os.sched_setaffinity(0, allowed[:n])
    return sorted(os.sched_getaffinity(0))

"""Soak run: a few hundred tiny curriculum steps across stage swaps; host memory and compiled
executables should stay flat after warm-up.

    python scripts/soak.py [--steps_per_stage 25] [--stages 12] [--workdir DIR]

Builds a tiny model and synthetic data, then runs `curriculum.run` over `--stages` stages that
alternate GRPO (perception) and SFT (textual reasoning), `--steps_per_stage` steps each, with a
checkpoint at every stage boundary and every 10 steps, the optimizer reset at each swap, evaluation
off. At chosen global steps it prints the process's resident set size (VmRSS), the number of XLA
executables compiled so far (JAX's backend-compile events; the persistent compilation cache is
off, so every compile counts), the number of live JAX arrays and of threads; RSS is read after
`gc.collect()` and glibc's `malloc_trim(0)` (without them it swings by hundreds of MB between marks
as the allocator keeps or returns free heap). Exits 1 when anything compiled
after step 50 (both objectives are warm by then) or RSS grew more than `--max_rss_growth_mb`
between step 50 and the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WARM_STEP = 50


def rss_mb() -> float:
    """Resident set size after a garbage collection and `malloc_trim(0)`, so it measures memory
    still held rather than free heap glibc has not returned yet (which swings by hundreds of MB)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps_per_stage", type=int, default=25)
    ap.add_argument("--stages", type=int, default=12)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    ap.add_argument("--max_rss_growth_mb", type=float, default=100.0)
    args = ap.parse_args(argv)
    total = args.steps_per_stage * args.stages
    if total < WARM_STEP * 2:
        ap.error(f"run at least {2 * WARM_STEP} steps")

    import jax
    from jax._src import dispatch

    from vlm_jax import config as config_lib
    from vlm_jax import curriculum
    from vlm_jax.data import build_synthetic
    from vlm_jax.models.tiny import build_tiny_model

    compiles = [0]

    def on_event(event: str, duration: float, **kwargs) -> None:
        if event == dispatch.BACKEND_COMPILE_EVENT:
            compiles[0] += 1

    jax.monitoring.register_event_duration_secs_listener(on_event)

    root = args.workdir or Path(tempfile.mkdtemp(prefix="vlm_jax_soak_"))
    root = root.resolve()
    build_synthetic(str(root / "data"), sizes={"train": 64, "validation": 4, "test": 4}, seed=0)
    model = build_tiny_model(root / "model", seed=0)
    kinds = [("perception", "grpo", "synthetic_perception"), ("textual", "sft", "synthetic_textual_reasoning")]
    overrides = [f"model.path={model}", f"data.data_dir={root / 'data'}", "data.length_buckets=(256,)",
                 "data.max_prompt_len=256", "data.max_pixels_per_image=12544", "checkpoint.every=10",
                 "checkpoint.keep=2", "logging.progress=false", "logging.tensorboard=false",
                 "compilation_cache_dir="]
    base = config_lib.load_config("configs/synthetic_cpu.py", overrides)
    stages = []
    for i in range(args.stages):
        name, objective, data = kinds[i % 2]
        template = base.stages[0] if objective == "grpo" else base.stages[1]
        stage = template.__class__(**{
            **template.__dict__, "name": f"{name}_{i}", "steps": args.steps_per_stage, "batch_size": 2,
            "datasets": (config_lib.DatasetSpec(name=data),), "eval": config_lib.EvalConfig(),
            "reset_optimizer": True})
        if objective == "grpo":
            stage = stage.__class__(**{**stage.__dict__, "grpo": stage.grpo.__class__(
                **{**stage.grpo.__dict__, "num_samples": 2, "max_new_tokens": 8, "kl_coef": 0.01})})
        stages.append(stage)
    cfg = base.__class__(**{**base.__dict__, "stages": tuple(stages)})

    marks = sorted({1, 10, 25, *range(WARM_STEP, total + 1, WARM_STEP), total})
    rows: list[tuple[int, float, int, int, float, int]] = []
    done = [0]
    start = time.monotonic()
    real_step = curriculum.train_step

    def train_step(*a, **kw):
        out = real_step(*a, **kw)
        done[0] += 1
        if done[0] in marks:
            jax.block_until_ready(out[0])
            rows.append((done[0], rss_mb(), compiles[0], len(jax.live_arrays()), time.monotonic() - start,
                         threading.active_count()))
            print(f"step {done[0]:4d}  rss {rows[-1][1]:7.1f} MB  compiled executables {compiles[0]:4d}  "
                  f"live arrays {rows[-1][3]:5d}  threads {rows[-1][5]:4d}  {rows[-1][4]:6.1f} s", flush=True)
        return out

    curriculum.train_step = train_step
    try:
        status = curriculum.run(cfg, root / "workdir")
    finally:
        curriculum.train_step = real_step
    assert status == "finished", status
    at = {r[0]: r for r in rows}
    warm, end = at[WARM_STEP], at[total]
    growth = end[1] - warm[1]
    print(f"\nsteps {WARM_STEP} -> {total} ({args.stages} stages of {args.steps_per_stage}, "
          f"{args.stages - 2} swaps after warm-up): RSS {warm[1]:.1f} -> {end[1]:.1f} MB ({growth:+.1f} MB), "
          f"compiled executables {warm[2]} -> {end[2]}, live arrays {warm[3]} -> {end[3]}; "
          f"{end[4]:.0f} s in all")
    ok = end[2] == warm[2] and growth <= args.max_rss_growth_mb
    print("flat after warm-up" if ok else "NOT flat after warm-up")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

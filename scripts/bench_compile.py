"""Compile time: each stage's first step against its later steps, with the persistent compilation
cache cold and warm.

    python scripts/bench_compile.py [--steps 3] [--cpus N] [--json OUT]

Builds the synthetic data and a tiny model (the demo's sizes, `TinySpec()`), then runs the same
four-stage curriculum (`configs/synthetic_cpu.py` stages: perception GRPO -> textual SFT -> perception
GRPO again -> textual SFT again, the last two with the first two's settings and shapes; `--steps`
steps each, evaluation off) three times, each in a fresh process: persistent cache off, cache cold
(an empty directory), cache warm (the directory the cold run filled). For every stage it reports
the first step, the median later step, and what JAX spent in the first step compiling with XLA
(`backend_compile` events; with a warm cache, loading the executable instead) and tracing +
lowering to StableHLO (`jaxpr_trace` and `jaxpr_to_mlir_module` events: done in every new process,
cache or not), so "first step - later step" is what a stage swap costs (building a stage's
optimizer and lazy data iterator, `curriculum.build_stage`, takes milliseconds). A stage whose shapes were seen before
(stages 3 and 4) should cost no compile at all, cache or not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(ROOT))


from bench_rollout import pin_cpus  # noqa: E402  (scripts/ is on sys.path: stdlib-only import)


def config(assets: Path, steps: int, cache: str):
    import dataclasses

    from vlm_jax import config as config_lib

    overrides = [
        f"model.path={assets / 'model'}", f"data.data_dir={assets / 'data'}",
        "data.length_buckets=(256,)", "data.max_prompt_len=256", "data.max_pixels_per_image=12544",
        f"stages.0.steps={steps}", f"stages.1.steps={steps}", "stages.0.batch_size=4", "stages.1.batch_size=4",
        "stages.0.grpo.num_samples=4", "stages.0.grpo.max_new_tokens=16", "stages.0.grpo.kl_coef=0.01",
        "stages.0.eval.datasets=()", "stages.1.eval.datasets=()", "checkpoint.every=1000",
        "checkpoint.async_save=false", "logging.progress=false", "logging.tensorboard=false",
        f"compilation_cache_dir={cache}",
    ]
    cfg = config_lib.load_config(str(ROOT / "configs/synthetic_cpu.py"), overrides)
    s0, s1 = cfg.stages[:2]
    stages = (s0, s1, dataclasses.replace(s0, name="perception_again"),
              dataclasses.replace(s1, name="textual_again"))
    return cfg.__class__(**{**cfg.__dict__, "stages": stages})


def child(args) -> int:
    """One curriculum run in this process; prints one JSON line with the per-stage timings."""
    import jax
    from jax._src import dispatch

    from vlm_jax import curriculum

    compile_s, trace_s = [0.0], [0.0]

    def on_event(event: str, duration: float, **kwargs) -> None:
        if event == dispatch.BACKEND_COMPILE_EVENT:
            compile_s[0] += duration
        elif event in (dispatch.JAXPR_TRACE_EVENT, dispatch.JAXPR_TO_MLIR_MODULE_EVENT):
            trace_s[0] += duration

    jax.monitoring.register_event_duration_secs_listener(on_event)
    cfg = config(Path(args.child), args.steps, args.cache)
    rows: list[dict] = []
    real_step, real_build = curriculum.train_step, curriculum.build_stage

    def build(env, index, *a, **k):
        start = time.perf_counter()
        out = real_build(env, index, *a, **k)
        rows.append(dict(stage=cfg.stages[index].name, objective=cfg.stages[index].objective,
                         setup_s=time.perf_counter() - start, steps=[], compile_s=[], trace_s=[]))
        return out

    def step(env, stage, *a):
        before, traced, start = compile_s[0], trace_s[0], time.perf_counter()
        out = real_step(env, stage, *a)
        rows[-1]["steps"].append(time.perf_counter() - start)
        rows[-1]["compile_s"].append(compile_s[0] - before)
        rows[-1]["trace_s"].append(trace_s[0] - traced)
        return out

    curriculum.train_step, curriculum.build_stage = step, build
    with tempfile.TemporaryDirectory() as wd:
        start = time.perf_counter()
        assert curriculum.run(cfg, wd) == "finished"
        total = time.perf_counter() - start
    print("RESULT " + json.dumps(dict(rows=rows, total_s=total)), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="steps per stage (>= 2)")
    parser.add_argument("--cpus", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cpus = pin_cpus(args.cpus)
    if args.child:
        return child(args)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (a first step and a later one)")

    from vlm_jax.data import build_synthetic
    from vlm_jax.models.tiny import build_tiny_model

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        assets = Path(tmp) / "assets"
        build_synthetic(str(assets / "data"), sizes={"train": 64, "validation": 4, "test": 4}, seed=0)
        build_tiny_model(assets / "model", seed=0)
        cache = Path(tmp) / "jax_cache"
        for label, cache_arg in (("cache off", ""), ("cache cold", str(cache)), ("cache warm", str(cache))):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(assets), "--cache", cache_arg,
                   "--steps", str(args.steps)]
            start = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            wall = time.perf_counter() - start
            line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
            if out.returncode or line is None:
                print(out.stdout[-3000:], out.stderr[-3000:], sep="\n")
                raise SystemExit(f"{label}: the run failed (exit {out.returncode})")
            results[label] = {**json.loads(line[7:]), "process_wall_s": wall}

    cmd = f"python {' '.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}"
    import jax

    print(f"command: {cmd}")
    print(f"machine: {platform.platform()}, os.cpu_count()={os.cpu_count()}, pinned to cores {cpus}; "
          f"jax {jax.__version__}")
    print("model: TinySpec() (the demo's sizes); stages 4 x "
          f"{args.steps} steps: GRPO (4 prompts x 4 samples x 16 tokens) -> SFT (4 rows) -> the same two again")
    print()
    print(f"{'':<12}{'stage':<26}{'first step s':>13}{'later step s':>13}"
          f"{'first - later':>14}{'XLA compile s':>14}{'trace+lower s':>14}")
    for label, res in results.items():
        for r in res["rows"]:
            later = statistics.median(r["steps"][1:])
            r["later_s"] = later
            print(f"{label:<12}{r['stage'] + ' (' + r['objective'] + ')':<26}"
                  f"{r['steps'][0]:>13.2f}{later:>13.3f}{r['steps'][0] - later:>14.2f}{r['compile_s'][0]:>14.2f}"
                  f"{r['trace_s'][0]:>14.2f}")
        print(f"{label:<12}whole run (curriculum.run) {res['total_s']:.1f} s; process {res['process_wall_s']:.1f} s "
              "(imports and start-up included)")
    if args.json:
        args.json.write_text(json.dumps(dict(command=cmd, cores=cpus, steps=args.steps, runs=results), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    _early = argparse.ArgumentParser(add_help=False)
    _early.add_argument("--cpus", type=int, default=None)
    pin_cpus(_early.parse_known_args()[0].cpus)
    sys.exit(main())

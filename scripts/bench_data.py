"""Input-pipeline throughput on the synthetic datasets (rows/s, batch shapes), offline.

    python scripts/bench_data.py [--batches 20] [--batch_size 16] [--threads 2] [--model DIR]
    python scripts/bench_data.py --config configs/demo_cpu.py [--steps 6]

With `--config`, for each stage of that config (its data, batch size and objective, on its model
and data directory, e.g. after `bash scripts/demo.sh`): examples/s the loader produces against
examples/s the stage's train step consumes (`Stage.step`, first compiling step excluded),
so the loader is shown not to be the bottleneck when the first number is the larger.

Builds a tiny model directory (tokenizer + image processor) and the three synthetic TFDS
datasets in a temporary folder unless ``--model`` / ``--data_dir`` point at existing ones,
then times ``make_dataset`` over a perception + visual-reasoning + text mixture. The number
to compare is rows/s for different ``--threads`` on the same machine.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm_jax.data import build_synthetic, load, make_dataset  # noqa: E402
from vlm_jax.data.processor import Processor  # noqa: E402
from vlm_jax.models.tiny import build_tiny_model  # noqa: E402


def against_train_step(config_path: str, steps: int) -> int:
    """Loader examples/s vs train-step examples/s per stage of a config."""
    import jax

    from vlm_jax import config as config_lib
    from vlm_jax import stages, startup
    from vlm_jax.train_state import init_state

    cfg = config_lib.load_config(config_path)
    env = startup.setup(cfg, Path(tempfile.mkdtemp()))
    print(f"{'stage':20s} {'objective':9s} {'loader ex/s':>12s} {'train ex/s':>11s} {'ratio':>7s}")
    for index, st in enumerate(cfg.stages):
        stage = stages.build_stage(env, index, None)
        next(stage.iterator)
        start = time.perf_counter()
        for _ in range(steps):
            next(stage.iterator)
        loader = steps * st.batch_size / (time.perf_counter() - start)
        stage = stages.build_stage(env, index, None)
        state = init_state(env.base_params, stage.optimizer)
        needs_ref = st.objective == "grpo" and st.grpo.kl_coef > 0
        ref = jax.tree.map(jax.numpy.copy, state.params) if needs_ref else None  # steps donate state
        state, _ = stage.step(env, state, ref, jax.random.key(0))  # compiles
        start = time.perf_counter()
        for i in range(steps):
            state, _ = stage.step(env, state, ref, jax.random.key(i + 1))
        train = steps * st.batch_size / (time.perf_counter() - start)
        print(f"{st.name:20s} {st.objective:9s} {loader:12.1f} {train:11.1f} {loader / train:6.1f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="compare the loader with this config's train steps")
    parser.add_argument("--steps", type=int, default=6, help="timed steps / batches per stage (--config)")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=256, help="train rows per synthetic dataset")
    parser.add_argument("--model", type=Path, default=None, help="HF model dir (default: build a tiny one)")
    parser.add_argument("--data_dir", type=Path, default=None, help="TFDS dir (default: build in a temp dir)")
    args = parser.parse_args(argv)
    if args.config:
        return against_train_step(args.config, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_tiny_model(Path(tmp) / "model", weights=False)
        data_dir = args.data_dir or Path(tmp) / "tfds"
        if args.data_dir is None:
            build_synthetic(data_dir, sizes={"train": args.rows, "validation": 8, "test": 8})
        processor = Processor.from_pretrained(model)
        sources = [(load(name, data_dir=data_dir), 1.0) for name in
                   ("synthetic_perception", "synthetic_visual_reasoning", "synthetic_textual_reasoning")]
        it = make_dataset(sources, processor, batch_size=args.batch_size, seed=0, shard_index=0, shard_count=1,
                          num_threads=args.threads)
        next(it)  # warm-up: thread start, first reads
        shapes: collections.Counter[tuple[tuple[int, ...], ...]] = collections.Counter()
        start = time.perf_counter()
        for _ in range(args.batches):
            batch = next(it)
            shapes[(batch["input_ids"].shape, batch["pixel_values"].shape, batch["image_grid_thw"].shape)] += 1
        elapsed = time.perf_counter() - start
    rows = args.batches * args.batch_size
    print(f"{rows} rows in {elapsed:.2f}s: {rows / elapsed:.1f} rows/s ({args.threads} threads)")
    for shape, count in shapes.most_common():
        print(f"  {count:4d} x input_ids {shape[0]}, pixel_values {shape[1]}, image_grid_thw {shape[2]}")
    print(f"skipped: { {k: v for k, v in it.stats['skipped'].items() if v} }")
    return 0


if __name__ == "__main__":
    sys.exit(main())

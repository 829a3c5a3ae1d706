"""Pilot for the grid world: how much of each capability the tiny base has after N pre-training
steps, greedy and sampled (T=1), so the demo's base leaves every stage headroom (sampled pass rates
~40-60% perception, 30-50% textual, 15-30% visual; greedy far from 100%).

    python scripts/pilot_grid.py --steps 400,600,800 [--items 128] [--out pilot.json]

Builds the grid data and the untrained tiny model as `python -m vlm_jax.demo_setup` does (reused
when present), pre-trains once per step count with `configs/pretrain_tiny.py` and evaluates.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def evaluate_base(model_dir: Path, data_dir: str, items: int) -> dict:
    from vlm_jax import data
    from vlm_jax.data.synthetic.grid import DATASETS, MAX_NEW_TOKENS
    from vlm_jax.evaluate import evaluate_source, load_for_eval

    model, params, processor = load_for_eval(model_dir)
    out = {}
    for capability, name in DATASETS.items():
        source = data.load(name, split="validation", data_dir=data_dir)
        for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
            r = evaluate_source(model, params, processor, source, name=name, max_examples=items, batch_size=128,
                                max_new_tokens=MAX_NEW_TOKENS, length_buckets=(128,), temperature=temperature)
            out[f"{capability}/{mode}"] = {"accuracy": r["accuracy"], "score": r["score"],
                                           "length": r["mean_response_length"]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="400,600,800")
    ap.add_argument("--items", type=int, default=128)
    ap.add_argument("--data_dir", default=None)
    ap.add_argument("--work", default="workdirs/pilot_grid")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from vlm_jax import demo_setup, paths

    data_dir = str(paths.data_dir(args.data_dir))
    work = Path(args.work)
    demo_setup.build_data(data_dir)
    init = demo_setup.build_init_model(work / "init")
    results = {}
    for steps in [int(s) for s in args.steps.split(",")]:
        out = demo_setup.pretrain(init, work / f"base_{steps}", data_dir, work / f"pretrain_{steps}",
                                  [f"stages.0.steps={steps}", "logging.progress=false"])
        results[steps] = r = evaluate_base(out, data_dir, args.items)
        print(f"steps {steps}: " + "  ".join(f"{k} {v['accuracy']:.2f}" for k, v in r.items()), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

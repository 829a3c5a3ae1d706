"""Pilots for the grid world, kept so the demo's and the experiment's settings can be re-derived.

**base** - how much of each capability the tiny base has after N pre-training steps, greedy and
sampled (T=1), so the demo's base leaves every stage headroom (sampled pass rates ~40-60%
perception, 30-50% textual, 15-30% visual; greedy far from 100%):

    python scripts/pilot_grid.py base --steps 400,600,800 [--items 128] [--out pilot.json]

Builds the grid data and the untrained tiny model as `python -m vlm_jax.demo_setup` does (reused
when present), pre-trains once per step count with `configs/pretrain_tiny.py` and evaluates.

**stage** - one stage alone from a base, per seed: its own capability before and after (512 items,
greedy) and the gain with its paired standard error, for a `vlm_jax.experiment.Budget` with any of
its fields overridden (how `Budget`'s defaults were chosen, docs/experiment.md):

    python scripts/pilot_grid.py stage --base artifacts/tiny_base --capability perception \
        --objective grpo --budget '{"grpo_lr": 2e-4, "num_samples": 8}' [--batch 32] --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def evaluate_base(model_dir: Path, data_dir: str, items: int) -> dict:
    from vlm_jax import data
    from vlm_jax.data.synthetic.grid import DATASETS, LENGTH_BUCKETS, MAX_NEW_TOKENS
    from vlm_jax.evaluate import evaluate_source, load_for_eval

    model, params, processor = load_for_eval(model_dir)
    out = {}
    for capability, name in DATASETS.items():
        source = data.load(name, split="validation", data_dir=data_dir)
        for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
            r = evaluate_source(model, params, processor, source, name=name, max_examples=items, batch_size=128,
                                max_new_tokens=MAX_NEW_TOKENS, length_buckets=LENGTH_BUCKETS, temperature=temperature)
            out[f"{capability}/{mode}"] = {"accuracy": r["accuracy"], "score": r["score"],
                                           "length": r["mean_response_length"]}
    return out


def base_pilot(args, data_dir: str) -> dict:
    from vlm_jax import demo_setup

    demo_setup.build_data(data_dir)
    init = demo_setup.build_init_model(args.work / "init")
    results = {}
    for steps in [int(s) for s in args.steps.split(",")]:
        tag = f"{args.tag}{steps}"
        out = demo_setup.pretrain(init, args.work / f"base_{tag}", data_dir, args.work / f"pretrain_{tag}",
                                  [f"stages.0.steps={steps}", "logging.progress=false", *args.set])
        results[steps] = r = evaluate_base(out, data_dir, args.items)
        print(f"steps {steps}: " + "  ".join(f"{k} {v['accuracy']:.2f}" for k, v in r.items()), flush=True)
    return results


def stage_config(base: Path, data_dir: str, capability: str, objective: str, budget: dict, batch: int,
                 items: int, seed: int):
    """The experiment's stage for `capability` as the only stage of a run from `base`, evaluated on
    its own capability's set at its start and end."""
    from vlm_jax import experiment

    budget = dataclasses.replace(experiment.Budget(), **{k: tuple(v) if isinstance(v, list) else v
                                                         for k, v in budget.items()})
    st = experiment.stage(capability, objective, budget, first=True)
    own = tuple(d for d in st.eval.datasets if d.name == experiment.DATASETS[capability])
    st = dataclasses.replace(st, batch_size=batch, eval=dataclasses.replace(st.eval, datasets=own, max_examples=items))
    cfg = experiment.base_config((st,), seed)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(base)),
                               data=dataclasses.replace(cfg.data, data_dir=data_dir),
                               logging=dataclasses.replace(cfg.logging, progress=False))


def stage_pilot(args, data_dir: str) -> dict:
    from vlm_jax import curriculum

    budget = json.loads(args.budget)
    results = {"capability": args.capability, "objective": args.objective, "budget": budget, "batch": args.batch,
               "base": str(args.base), "seeds": {}}
    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = stage_config(args.base, data_dir, args.capability, args.objective, budget, args.batch, args.items,
                           seed)
        workdir = args.work / f"{args.capability}_{args.objective}_seed{seed}"
        if curriculum.run(cfg, workdir) != "finished":
            raise SystemExit(f"the pilot run in {workdir} did not finish")
        gain = json.loads((workdir / "report.json").read_text())["gains"][0]
        results["seeds"][seed] = gain
        print(f"seed {seed}: {args.capability} {gain['before']:.3f} -> {gain['after']:.3f} "
              f"(gain {gain['gain']:+.3f} +- {gain['se']:.3f}, z {gain['z']:.1f})", flush=True)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("base", "stage"))
    ap.add_argument("--items", type=int, default=None, help="evaluation items (base: 128, stage: 512)")
    ap.add_argument("--data_dir", default=None)
    ap.add_argument("--work", type=Path, default=Path("workdirs/pilot_grid"))
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--steps", default="400,600,800", help="base: pre-training step counts")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="base: a pre-training config override (repeatable), e.g. stages.0.datasets.1.weight=2")
    ap.add_argument("--tag", default="", help="base: prefix of the pre-trained bases' directory names")
    ap.add_argument("--base", type=Path, default=Path("artifacts/tiny_base"), help="stage: the base model")
    ap.add_argument("--capability", default="perception", help="stage: perception, textual_reasoning, visual_reasoning")
    ap.add_argument("--objective", default="grpo", choices=("grpo", "sft"))
    ap.add_argument("--budget", default="{}", help="stage: JSON of vlm_jax.experiment.Budget fields to override")
    ap.add_argument("--batch", type=int, default=None, help="stage: prompts per step (default: the experiment's)")
    ap.add_argument("--seeds", default="0")
    args = ap.parse_args(argv)
    from vlm_jax import experiment, paths

    if args.mode == "stage" and args.capability not in experiment.CAPABILITIES:
        ap.error(f"--capability {args.capability!r}: one of {experiment.CAPABILITIES}")
    args.items = args.items or (128 if args.mode == "base" else experiment.EVAL_ITEMS)
    args.batch = args.batch or experiment.BATCH
    data_dir = str(paths.data_dir(args.data_dir))
    results = base_pilot(args, data_dir) if args.mode == "base" else stage_pilot(args, data_dir)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

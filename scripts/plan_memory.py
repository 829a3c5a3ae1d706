"""Bytes per chip of every program the trainer runs, compiled for a TPU topology on this machine.

    python scripts/plan_memory.py --config configs/qwen2_5_vl_7b_tpu.py --topology v5p:4x4x4 \
        [--model_config configs/hf/Qwen2.5-VL-7B-Instruct] [--stages textual_reasoning] \
        [--programs init,sft,grpo,score,generate] [--json OUT] [--num_layers N] [--suggest_micro_batch] [--config.KEY=VALUE ...]

Needs `pip install libtpu` (no TPU, no weights: abstract shapes only). See `vlm_jax/plan.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")  # quiets libtpu's start-up warnings
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU is only a compile target
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several planners (or a test run) at once


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a for a in argv if a.startswith("--config.")]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--topology", required=True, help="e.g. v5p:4x4x4, v5e:2x4, v6e:1x1")
    ap.add_argument("--model_config", default=None, help="an HF config.json (or its folder); "
                    "default: the config's model.path")
    ap.add_argument("--stages", default=None, help="comma-separated stage names (default: all)")
    ap.add_argument("--programs", default=",".join(("init", "sft", "grpo", "score", "generate", "vision")))
    ap.add_argument("--json", default=None)
    ap.add_argument("--num_layers", type=int, default=None,
                    help="cut the decoder to this many layers (compile-time comparisons)")
    ap.add_argument("--suggest_micro_batch", action="store_true",
                    help="also find the largest micro-batch that fits (sft / grpo: 2-3 more compiles each)")
    args = ap.parse_args([a for a in argv if not a.startswith("--config.")])

    from vlm_jax import config as config_lib
    from vlm_jax import plan

    try:
        cfg = config_lib.load_config(args.config, [o[len("--config."):] for o in overrides])
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = plan.plan(cfg, args.topology, model_config=args.model_config,
                     programs=tuple(args.programs.split(",")),
                     stages=None if args.stages is None else set(args.stages.split(",")),
                     num_layers=args.num_layers, suggest=args.suggest_micro_batch)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_json() for r in rows], f, indent=2)
    return 0 if all(r.fits for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

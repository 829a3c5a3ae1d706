"""The paper's comparisons at toy scale, on the demo's data and base model (same total steps):

  staged        perception (GRPO) -> textual (SFT) -> visual (SFT)       configs/demo_cpu.py
  merged        one stage, all data mixed, same total steps (GRPO)        configs/demo_cpu.py:merged
  caption_sft   stage 1 replaced by caption SFT on the perception images
  order_213     textual -> perception -> visual
  easy_to_hard  staged, each stage's data ordered easy -> hard (difficulty)

    bash scripts/demo.sh            # once: builds the synthetic data (default data dir) and artifacts/tiny_base
    python scripts/compare_curricula.py [--runs staged,merged,...] [--workdir workdirs/compare]
        [--steps_scale 1.0]

Prints (and writes to WORKDIR/comparison.md) a table of final accuracy and mean response length
per evaluation set for each run. Each run is an ordinary `vlm_jax.curriculum.run`, resumable.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlm_jax import config as config_lib  # noqa: E402


def _scaled(cfg, scale: float):
    stages = tuple(dataclasses.replace(s, steps=max(1, round(s.steps * scale))) for s in cfg.stages)
    return dataclasses.replace(cfg, stages=stages)


def variants(scale: float) -> dict:
    staged = config_lib.load_config(str(ROOT / "configs/demo_cpu.py"))
    merged = config_lib.load_config(str(ROOT / "configs/demo_cpu.py:merged"))
    p, t, v = staged.stages
    caption = dataclasses.replace(
        p, name="perception_caption_sft", objective="sft", sft=dataclasses.replace(p.sft, target="caption")
    )
    e2h = tuple(dataclasses.replace(s, order="easy_to_hard", order_key="difficulty") for s in staged.stages)
    runs = {
        "staged": staged,
        "merged": merged,
        "caption_sft": dataclasses.replace(staged, stages=(caption, t, v)),
        "order_213": dataclasses.replace(staged, stages=(t, p, v)),
        "easy_to_hard": dataclasses.replace(staged, stages=e2h),
    }
    return {k: _scaled(config_lib.validate(c), scale) for k, c in runs.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="staged,merged,caption_sft,order_213,easy_to_hard")
    ap.add_argument("--workdir", default="workdirs/compare")
    ap.add_argument("--steps_scale", type=float, default=1.0)
    args = ap.parse_args(argv)
    from vlm_jax import curriculum, report

    all_runs = variants(args.steps_scale)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in all_runs]
    if unknown:
        print(f"error: unknown runs {unknown}; valid: {sorted(all_runs)}", file=sys.stderr)
        return 2
    workdirs = {}
    for name in names:
        wd = Path(args.workdir) / name
        print(f"=== {name} -> {wd}")
        if curriculum.run(all_runs[name], wd) != "finished":
            return 1
        workdirs[name] = wd
    table = report.compare_runs(workdirs)
    (Path(args.workdir) / "comparison.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

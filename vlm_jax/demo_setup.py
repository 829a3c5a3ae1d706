"""Builds what the CPU demo needs, offline and idempotently:

1. the grid world's datasets (perception, textual reasoning, visual reasoning) under `--data_dir`;
2. a tiny real-format Qwen2.5-VL directory (tokenizer trained on the synthetic corpus, random
   weights) at `<out>_init`;
3. the demo **base model** at `--out`: a short cross-entropy pre-training of (2) on synthetic
   reference solutions (`configs/pretrain_tiny.py`, run by the project's own trainer), exported as a
   Hugging Face directory, with headroom in every capability.

    python -m vlm_jax.demo_setup --data_dir artifacts/data --out artifacts/tiny_base
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_SPEC = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    mrope_section=(4, 6, 6),
    vision_depth=2,
    vision_hidden_size=64,
    vision_intermediate_size=128,
    vision_num_heads=2,
    tie_word_embeddings=True,
)
# The grid world (vlm_jax.data.synthetic.grid): 4000 training rows per capability; 512 fixed
# validation items per capability, the evaluation sets of the demo and the experiment.
DATA_SIZES = {"train": 4000, "validation": 512}


def build_data(data_dir: str, sizes=DATA_SIZES, seed: int = 0) -> None:
    from vlm_jax.data.synthetic import grid

    grid.build(data_dir, sizes=sizes, seed=seed, verbose=True)


def build_init_model(out: Path, seed: int = 0) -> Path:
    from vlm_jax.data.synthetic import grid
    from vlm_jax.models.tiny import TinySpec, build_tiny_model

    if (out / "config.json").exists():
        return out
    return build_tiny_model(
        out, spec=TinySpec(**DEMO_SPEC), seed=seed, extra_texts=grid.corpus(600, seed), weight_scale=0.5
    )


PRETRAIN_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "pretrain_tiny.py"


def pretrain(init_dir: Path, out: Path, data_dir: str, workdir: Path, overrides=()) -> Path:
    """SFT pre-training with the project's trainer, then export to `out`."""
    if (out / "config.json").exists():
        return out
    from vlm_jax import config as config_lib
    from vlm_jax import curriculum
    from vlm_jax.export import export

    cfg = config_lib.load_config(  # the repository's config, from whatever directory this runs in
        str(PRETRAIN_CONFIG), [f"model.path={init_dir}", f"data.data_dir={data_dir}", *overrides]
    )
    status = curriculum.run(cfg, workdir)
    if status != "finished":
        raise SystemExit(f"pre-training was interrupted ({status}); rerun to resume")
    return export(workdir, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vlm_jax.demo_setup",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--data_dir", default=None, help="default: $VLM_JAX_DATA_DIR, else ~/vlm_jax/data")
    ap.add_argument("--out", default="artifacts/tiny_base")
    ap.add_argument("--workdir", default="workdirs/pretrain_tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="config overrides for the pre-training, KEY=VALUE")
    args = ap.parse_args(argv)
    from vlm_jax import paths

    print(paths.describe_data_dir(args.data_dir))
    args.data_dir = str(paths.data_dir(args.data_dir))
    out = Path(args.out)
    build_data(args.data_dir, seed=args.seed)
    init = build_init_model(out.with_name(out.name + "_init"), args.seed)
    pretrain(init, out, args.data_dir, Path(args.workdir), args.overrides)
    print(f"demo base model: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write a tiny real-format Qwen2.5-VL or Qwen3-VL Hugging Face directory (random weights), offline.

    python scripts/build_tiny_model.py --out /tmp/tiny_qwen [--family qwen3_vl [--thinking]]
        [--flat] [--tied] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm_jax.models.tiny import FAMILIES, build_tiny_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory (overwritten)")
    parser.add_argument("--family", default="qwen2_5_vl", choices=FAMILIES, help="model family")
    parser.add_argument("--thinking", action="store_true", help="Qwen3-VL Thinking chat template")
    parser.add_argument("--flat", action="store_true", help="flat hub-style config.json (Qwen2.5-VL)")
    parser.add_argument("--tied", action="store_true", help="tie lm_head to the embeddings")
    parser.add_argument("--seed", type=int, default=0, help="weight RNG seed")
    parser.add_argument("--shards", type=int, default=1, help="number of safetensors files")
    parser.add_argument("--no-weights", action="store_true", help="tokenizer and configs only")
    args = parser.parse_args(argv)
    try:
        path = build_tiny_model(args.out, family=args.family, flat=args.flat, tied=args.tied,
                                seed=args.seed, shards=args.shards, weights=not args.no_weights,
                                thinking=args.thinking)
    except (ValueError, OSError) as err:
        print(f"build_tiny_model: error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

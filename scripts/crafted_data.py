"""Writes a small local dataset with the row problems the preflight check reports, and a config.

    python scripts/crafted_data.py --out /tmp/crafted --model artifacts/tiny_base
    python -m vlm_jax.data.check --config /tmp/crafted/config.py

`OUT/crafted.jsonl` (images in `OUT/images/`), 20 rows:
- rows 0-11 usable: one 56x56 image and a short question;
- rows 12, 13 over-long: the question repeated until the prompt is over max_prompt_len (128);
- rows 14, 15 mismatched: two `<image>` placeholders for one image (dropped when the file is read);
- row 16 one 8x8 image (below min_pixels_per_image: resized up, still usable);
- row 17 one 400x400 image (above max_pixels_per_image: resized down, still usable);
- rows 18, 19 two 112x112 images (each within bounds, together over the per-row pixel budget).
`OUT/config.py`: one SFT stage on it (max_prompt_len 128, pixels 56*56 .. 112*112 per image).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CONFIG = '''
from vlm_jax.config import (Config, DataConfig, DatasetSpec, LoggingConfig, ModelConfig, OptimizerConfig,
                            StageConfig)


def get_config():
    stage = StageConfig(name="caption_sft", capability="perception", objective="sft",
                        datasets=(DatasetSpec(name="{data}"),), steps=4, batch_size=2,
                        optimizer=OptimizerConfig(lr=1e-4))
    return Config(model=ModelConfig(path="{model}"),
                  data=DataConfig(data_dir="{out}", max_prompt_len=128, length_buckets=(128, 256),
                                  min_pixels_per_image=56 * 56, max_pixels_per_image=112 * 112),
                  stages=(stage,), logging=LoggingConfig(tensorboard=False, progress=False))
'''

QUESTION = "What colour is the shape in the picture?"


def write(out: Path, model: Path) -> Path:
    """Writes the dataset and config under `out`; returns the config path."""
    from PIL import Image

    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)

    def image(name: str, size: tuple[int, int], colour: tuple[int, int, int]) -> str:
        Image.new("RGB", size, colour).save(images / name)
        return f"images/{name}"

    rows = []
    for i in range(12):
        rows.append({"problem": f"<image>{QUESTION}", "answer": "red",
                     "images": [image(f"ok{i}.png", (56, 56), (200, 20 * i, 30))]})
    for i in range(2):
        rows.append({"problem": "<image>" + " ".join([QUESTION] * 40), "answer": "red",
                     "images": [image(f"long{i}.png", (56, 56), (200, 0, 0))]})
    for i in range(2):
        rows.append({"problem": f"<image> and <image>: {QUESTION}", "answer": "red",
                     "images": [image(f"pair{i}.png", (56, 56), (0, 200, 0))]})
    rows.append({"problem": f"<image>{QUESTION}", "answer": "blue", "images": [image("tiny.png", (8, 8), (0, 0, 255))]})
    rows.append({"problem": f"<image>{QUESTION}", "answer": "blue", "images": [image("huge.png", (400, 400), (0, 0, 255))]})
    for i in range(2):
        rows.append({"problem": f"<image><image>Which is brighter? {QUESTION}", "answer": "left",
                     "images": [image(f"two{i}a.png", (112, 112), (250, 250, 250)),
                                image(f"two{i}b.png", (112, 112), (10, 10, 10))]})
    for row in rows:
        row["caption"] = "a coloured square"
        row["solution"] = row["answer"]
    data = out / "crafted.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = out / "config.py"
    config.write_text(CONFIG.format(data=data, model=Path(model).resolve(), out=out))
    return config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True, help="a Qwen2.5-VL directory (its processor)")
    args = ap.parse_args(argv)
    print(write(args.out.resolve(), args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Greedy batched evaluation: accuracy (same graders as the rewards) and mean response length.

    python -m vlm_jax.evaluate --model PATH --data SPEC[,SPEC...] --out FILE.json
        [--data_dir DIR] [--max_examples N] [--batch_size B] [--max_new_tokens T]

PATH is a Hugging Face model directory or a training workdir (its latest checkpoint). SPEC is a
dataset name, `name[split]` (default split `test`) or a `.jsonl` / `.json` / `.parquet` file in the
`problem` / `answer` / `images` layout (see the README, "Evaluation sets").
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from vlm_jax.rl import rewards as rewards_lib
from vlm_jax.rl.rollout import generate_and_grade

CORRECT_THRESHOLD = 0.5  # a graded score >= this counts as correct (IoU >= 0.5 for boxes)


def evaluate_source(
    model,
    params,
    processor,
    source,
    *,
    name: str,
    max_examples: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    length_buckets=(64, 128, 256, 512),
    max_pixels_per_batch: int | None = None,
    seed: int = 0,
) -> dict:
    """Accuracy and mean response length (tokens) on `source`, overall and per task."""
    from vlm_jax.data.pipeline import make_dataset

    n_total = len(source) if not max_examples else min(len(source), max_examples)
    if n_total == 0:
        raise ValueError(f"evaluation set {name!r} is empty")
    subset = _Head(source, n_total)
    it = make_dataset(
        [(subset, 1.0)],
        processor,
        batch_size=batch_size,
        seed=seed,
        shard_index=0,
        shard_count=1,
        order="easy_to_hard",
        order_key="difficulty",
        length_buckets=length_buckets,
        num_epochs=1,
        max_pixels_per_batch=max_pixels_per_batch,
    )
    reward_fn = rewards_lib.build_reward({"auto": 1.0})
    per_task: dict[str, list] = collections.defaultdict(list)
    samples = []
    for batch in it:
        g = generate_and_grade(
            model,
            params,
            batch,
            tokenizer=processor.tokenizer,
            reward_fn=reward_fn,
            num_samples=1,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            rng=jax.random.key(seed),
            eos_token_ids=processor.eos_token_ids,
            pad_token_id=processor.pad_token_id,
            image_token_id=processor.image_token_id,
            prompt_buckets=length_buckets,
        )
        correct = g.components["auto"] >= CORRECT_THRESHOLD
        for i, text in enumerate(g.texts):
            task = g.prompts.get("task", ["all"] * len(g.texts))[i] or "all"
            per_task[task].append((bool(correct[i]), int(g.rollout.lengths[i])))
            if len(samples) < 8:
                samples.append(
                    {
                        "task": task,
                        "answer": g.prompts["answer"][i],
                        "response": text,
                        "correct": bool(correct[i]),
                    }
                )
    rows = [r for v in per_task.values() for r in v]
    summary = lambda rs: {
        "accuracy": float(np.mean([c for c, _ in rs])),
        "mean_response_length": float(np.mean([n for _, n in rs])),
        "n": len(rs),
    }
    return {
        "name": name,
        **summary(rows),
        "per_task": {t: summary(v) for t, v in sorted(per_task.items())},
        "skipped": dict(getattr(it, "stats", {}).get("skipped", {})),
        "samples": samples,
    }


class _Head:
    """The first `n` examples of a random-access source."""

    def __init__(self, source, n: int):
        self.source, self.n = source, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]


def load_for_eval(path: str | Path, dtype=None):
    """(model, params, processor) from an HF directory or a training workdir."""
    import jax.numpy as jnp
    from vlm_jax import models
    from vlm_jax.data.processor import Processor

    path = Path(path)
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        model, params = models.from_pretrained(path, dtype=dtype or jnp.float32)
        return model, params, Processor.from_pretrained(path)
    from vlm_jax.curriculum import restore_for_export

    return restore_for_export(path)


def parse_specs(spec: str) -> list[tuple[str, str]]:
    """'a,b[validation],c.jsonl' -> [(name, split)] (default split 'test')."""
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part.endswith("]") and "[" in part:
            name, split = part[:-1].split("[", 1)
            out.append((name, split))
        else:
            out.append((part, "test"))
    if not out:
        raise ValueError(f"--data {spec!r} names no dataset")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vlm_jax.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data_dir", default="artifacts/data")
    ap.add_argument("--image_dir", default=None)
    ap.add_argument("--max_examples", type=int, default=0)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    args = ap.parse_args(argv)
    try:
        from vlm_jax import data

        specs = parse_specs(args.data)
        sources = [
            (f"{n}[{s}]", data.load(n, split=s, data_dir=args.data_dir, image_dir=args.image_dir))
            for n, s in specs
        ]
        model, params, processor = load_for_eval(args.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = {}
    for name, source in sources:
        results[name] = evaluate_source(
            model,
            params,
            processor,
            source,
            name=name,
            max_examples=args.max_examples,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
        )
        r = results[name]
        print(
            f"{name}: accuracy {r['accuracy']:.3f}  mean response length {r['mean_response_length']:.1f}"
            f"  (n={r['n']})"
        )
    rows = [(r["accuracy"], r["mean_response_length"], r["n"]) for r in results.values()]
    n = sum(k for _, _, k in rows)
    overall = {
        "accuracy": sum(a * k for a, _, k in rows) / n,
        "mean_response_length": sum(m * k for _, m, k in rows) / n,
        "n": n,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"overall": overall, "datasets": results}, indent=2))
    print(
        f"overall: accuracy {overall['accuracy']:.3f}  mean response length "
        f"{overall['mean_response_length']:.1f}  -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

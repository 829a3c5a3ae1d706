"""Greedy batched evaluation: accuracy (same graders as the rewards) and mean response length.

    python -m vlm_jax.evaluate --model PATH --data SPEC[,SPEC...] --out FILE.json
        [--data_dir DIR] [--max_examples N] [--batch_size B] [--max_new_tokens T]

PATH is a Hugging Face model directory or a training workdir (its latest checkpoint). SPEC is a
dataset name (its only split; with several, name one), `name[split]`, or a `.jsonl` / `.json` /
`.parquet` file in the `problem` / `answer` / `images` layout (see docs/guides/evaluation.md).
`--data_dir` defaults to the one data directory of every command (`$VLM_JAX_DATA_DIR`, else
`~/vlm_jax/data`). Each result says how many rows the data has (`rows`), how many were graded (`n`,
the denominator of the accuracy) and the skipped rows per reason; when they differ the console
says so too.
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

from vlm_jax import paths
from vlm_jax.rl import rewards as rewards_lib
from vlm_jax.rl.rollout import SamplingSpec, SpecialTokens, generate_and_grade

CORRECT_THRESHOLD = 0.5  # a graded score >= this counts as correct (IoU >= 0.5 for boxes)
# answer types whose graded score is partial credit: correct only when every part is right
EXACT_ANSWER_TYPES = frozenset({"cells"})
NO_TASK = "(no task)"  # per-task key of rows without a `task`


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
    temperature: float = 0.0,
    row_cache=0,
    slots: int = 0,
) -> dict:
    """Accuracy and mean response length (tokens) on `source`, overall and per task; greedy, or
    sampled at `temperature` (a pass rate: one sample per item). `row_cache`: a
    `vlm_jax.data.rows.RowCache` kept between evaluations of the same set (its rows encoded once).
    `slots` > 0: decode in that many refilled slots (the same answers, `sampler.generate`)."""
    from vlm_jax.data.pipeline import make_dataset

    report = getattr(source, "report", None)  # a data file read whole: its rows skipped on reading
    file_skipped = {r: len(v) for r, v in report.skipped.items()} if report is not None else {}
    n_rows = len(source) + sum(file_skipped.values())
    n_total = len(source) if not max_examples else min(len(source), max_examples)
    if n_total == 0:
        raise ValueError(f"evaluation set {name!r} has no usable rows"
                         + (f" (skipped {file_skipped})" if file_skipped else ""))
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
        row_cache=row_cache,
    )
    reward_fn = rewards_lib.build_reward({"auto": 1.0})
    per_task: dict[str, list] = collections.defaultdict(list)
    samples = []
    items = []  # (row index, correct, length, score) per graded row
    for batch in it:
        g = generate_and_grade(
            model,
            params,
            batch,
            spec=SamplingSpec(max_new_tokens=max_new_tokens, temperature=temperature,
                              prompt_buckets=tuple(length_buckets), slots=slots),
            tokens=SpecialTokens.of(processor),
            tokenizer=processor.tokenizer,
            reward_fn=reward_fn,
            rng=jax.random.fold_in(jax.random.key(seed), len(samples) + sum(map(len, per_task.values()))),
        )
        score = g.components["auto"]
        types = g.prompts.get("answer_type", [""] * len(g.texts))
        exact = np.array([t in EXACT_ANSWER_TYPES for t in types])
        correct = np.where(exact, score >= 1.0, score >= CORRECT_THRESHOLD)
        for i, text in enumerate(g.texts):
            items.append((int(g.prompts["index"][i]), bool(correct[i]), int(g.rollout.lengths[i]), float(score[i])))
            task = g.prompts.get("task", [""] * len(g.texts))[i] or NO_TASK
            per_task[task].append((bool(correct[i]), int(g.rollout.lengths[i]), float(score[i])))
            if len(samples) < 8:
                samples.append(
                    {
                        "task": task,
                        "answer": g.prompts["answer"][i],
                        "response": text,
                        "correct": bool(correct[i]),
                    }
                )
    it.close()
    from vlm_jax.data.pipeline import describe_skips

    skipped = dict(file_skipped)
    for reason, k in it.stats["skipped"].items():
        if k:
            skipped[reason] = skipped.get(reason, 0) + k
    rows = [r for v in per_task.values() for r in v]
    if not rows:
        raise ValueError(f"evaluation set {name!r}: every row was skipped ({describe_skips(skipped)})")
    out = {"name": name, **summarize(rows), "rows": n_rows, "max_examples": max_examples,
           "per_task": {t: summarize(v) for t, v in sorted(per_task.items())},
           "skipped": skipped, "samples": samples, "items": item_table(items)}
    if len(rows) != n_rows:
        limit = f"max_examples={max_examples}; " if max_examples and max_examples < len(source) else ""
        out["note"] = (f"accuracy is over n={len(rows)} of the data's {n_rows} rows "
                       f"({limit}skipped: {describe_skips(skipped)})")
    return out


def summarize(rows) -> dict:
    """Accuracy, mean graded score (partial credit, e.g. the share of grid cells right), mean
    response length of all answers and of the correct ones, from (correct, length, score) rows."""
    right = [n for c, n, _ in rows if c]
    return {
        "accuracy": float(np.mean([c for c, _, _ in rows])),
        "score": float(np.mean([s for _, _, s in rows])),
        "mean_response_length": float(np.mean([n for _, n, _ in rows])),
        "mean_response_length_correct": float(np.mean(right)) if right else None,
        "n": len(rows),
    }


def item_table(items) -> dict:
    """Per-item results in row order (for paired comparisons across runs on the same items):
    `index`, `correct` (0/1), `length` (tokens), `score` (graded reward)."""
    items = sorted(items)
    return {"index": [i for i, _, _, _ in items], "correct": [int(c) for _, c, _, _ in items],
            "length": [n for _, _, n, _ in items], "score": [round(s, 4) for _, _, _, s in items]}


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

    path = paths.model_dir(path)  # a folder, a URL (gs://...) or a Hugging Face hub id
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        model, params = models.from_pretrained(path, dtype=dtype or jnp.float32)
        return model, params, Processor.from_pretrained(path)
    from vlm_jax.workdir import restore_for_export

    return restore_for_export(path)


def parse_specs(spec: str) -> list[tuple[str, str | None]]:
    """'a,b[validation],c.jsonl' -> [(name, split)] (split None when not given)."""
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part.endswith("]") and "[" in part:
            name, split = part[:-1].split("[", 1)
            out.append((name, split))
        else:
            out.append((part, None))
    if not out:
        raise ValueError(f"--data {spec!r} names no dataset")
    return out


def pick_split(name: str, data_dir) -> str:
    """The only split of a prepared dataset; ValueError listing them when there are several."""
    from vlm_jax.data import tfds_builders

    splits = sorted(tfds_builders.dataset_splits(name, data_dir))
    if len(splits) != 1:
        raise ValueError(f"dataset {name!r} has the splits {splits}; name one, e.g. --data {name}[{splits[0]}]")
    return splits[0]


def check_writable(out) -> None:
    """Creates the folder of `out` and checks a file can be written there (before any evaluation)."""
    try:
        paths.check_writable(paths.as_path(out).parent)
    except OSError as e:
        raise ValueError(f"--out {str(out)!r} cannot be written ({e.strerror or e})") from None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vlm_jax.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data_dir", default=None, help="default: $VLM_JAX_DATA_DIR, else ~/vlm_jax/data")
    ap.add_argument("--image_dir", default=None)
    ap.add_argument("--max_examples", type=int, default=0)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--slots", type=int, default=0,
                    help="decode slots refilled as answers finish (0: each batch decodes to its longest answer)")
    args = ap.parse_args(argv)
    for key in ("max_examples", "slots"):
        if getattr(args, key) < 0:
            ap.error(f"--{key} must be >= 0, got {getattr(args, key)}")
    try:
        from vlm_jax import data
        from vlm_jax.data.prepare import SUFFIXES as FILE_SUFFIXES

        check_writable(args.out)
        data_dir = paths.data_dir(args.data_dir)
        print(paths.describe_data_dir(args.data_dir))
        sources = []
        for n, s in parse_specs(args.data):
            if Path(n).suffix.lower() in FILE_SUFFIXES:
                src = data.load(n, data_dir=data_dir, image_dir=args.image_dir)
                sources.append((n, src))
                if src.report is not None and src.report.num_skipped:
                    print(f"warning: {src.report.summary()}")
                continue
            s = s if s is not None else pick_split(n, data_dir)
            sources.append((f"{n}[{s}]", data.load(n, split=s, data_dir=data_dir)))
        model, params, processor = load_for_eval(args.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = {}
    for name, source in sources:
        try:
            results[name] = r = evaluate_source(
                model,
                params,
                processor,
                source,
                name=name,
                max_examples=args.max_examples,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                slots=args.slots,
            )
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(
            f"{name}: accuracy {r['accuracy']:.3f}  mean response length {r['mean_response_length']:.1f}"
            f"  (n={r['n']} of {r['rows']} rows)"
        )
        if "note" in r:
            print(f"warning: {name}: {r['note']}")
    rows = [(r["accuracy"], r["mean_response_length"], r["n"]) for r in results.values()]
    n = sum(k for _, _, k in rows)
    overall = {
        "accuracy": sum(a * k for a, _, k in rows) / n,
        "mean_response_length": sum(m * k for _, m, k in rows) / n,
        "n": n,
        "rows": sum(r["rows"] for r in results.values()),
    }
    out = paths.as_path(args.out)  # a local file or a URL (gs://...)
    paths.makedirs(out.parent)
    out.write_text(json.dumps({"overall": overall, "datasets": results}, indent=2))
    print(
        f"overall: accuracy {overall['accuracy']:.3f}  mean response length "
        f"{overall['mean_response_length']:.1f}  -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

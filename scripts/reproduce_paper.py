"""The paper's comparisons on the grid world (`vlm_jax.data.synthetic.grid`), several seeds each.

Every arm starts from the same base (`python -m vlm_jax.demo_setup`), trains on the same data with
the same step budget (`vlm_jax.experiment.Budget`) and is evaluated greedily on the same 512 fixed
items per capability; seed s of every arm uses the same seed (paired by seed).

Arms (form: "paper" = every stage GRPO; "project" = GRPO perception, cross-entropy reasoning):
  staged_paper   P -> T -> V, GRPO everywhere                                 (paper form)
  merged_paper   one GRPO stage, same data mixture and total steps            (paper form)
  staged         P -> T -> V (the demo)                                       (project form)
  caption_sft    perception by cross-entropy on the grid's caption, then T -> V (project form)
  answer_sft     perception by cross-entropy on the reference response, then T -> V (project form;
                 every stage by cross-entropy)
  merged_sft     one cross-entropy stage, the same data mixture and total steps as answer_sft
  order_TPV      T -> P -> V (the paper's 2-1-3 order)                        (project form)
  easy_to_hard   P -> T -> V, each stage's data sorted easy -> hard            (project form)
  paced          P -> T -> V, each stage's first half drawn from a pool growing from the easiest
                 quarter of its data to all of it (a competence curriculum)   (project form)

    python scripts/reproduce_paper.py [--seeds 5] [--jobs 2] [--quick] [--out docs/results/experiment.json]

Writes the JSON of every number (`--out`), a markdown table next to it (`.md`) and plots
(`--plots`; by default `docs/_static` with the default `--out`, else beside `--out`).
Comparisons: the final accuracy of each capability and their mean, as the paired difference of two
arms (mean over seeds), with a 95% interval from a bootstrap over seeds and items and the number of
seeds going each way.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vlm_jax import experiment, report  # noqa: E402
from vlm_jax.data.synthetic.grid import DATASETS  # noqa: E402

CAPS = experiment.CAPABILITIES
EVAL_NAMES = {c: f"{DATASETS[c]}[validation]" for c in CAPS}
ARMS: dict[str, dict] = {
    "staged_paper": dict(form="paper"),
    "merged_paper": dict(merged="paper"),
    "staged": dict(form="project"),
    "caption_sft": dict(form="project", perception="caption_sft"),
    "answer_sft": dict(form="project", perception="answer_sft"),
    "merged_sft": dict(merged="sft"),
    "order_TPV": dict(form="project", order=("textual_reasoning", "perception", "visual_reasoning")),
    "easy_to_hard": dict(form="project", data_order="easy_to_hard"),
    "paced": dict(form="project", data_order="paced"),
}
COMPARISONS: list[tuple[str, str, str, str]] = [  # (question, form, arm A, arm B): A - B
    ("staged vs merged", "paper", "staged_paper", "merged_paper"),
    ("staged vs merged (every stage by cross-entropy)", "project", "answer_sft", "merged_sft"),
    ("perception by GRPO vs caption SFT", "project", "staged", "caption_sft"),
    ("perception by GRPO vs answer SFT", "project", "staged", "answer_sft"),
    ("perception first (P-T-V) vs T-P-V", "project", "staged", "order_TPV"),
    ("easy-to-hard (sorted) vs shuffled", "project", "easy_to_hard", "staged"),
    ("easy-to-hard (paced) vs shuffled", "project", "paced", "staged"),
]
# Every arm but the sorted easy-to-hard one (each stage's hardest questions all come at its end: a
# known way to ruin a stage; the paced order is the experiment's easy-to-hard arm); `--arms` adds it.
DEFAULT_ARMS = tuple(a for a in ARMS if a != "easy_to_hard")
QUICK = dict(seeds=2, scale=0.8)  # below ~0.6 the textual stage ends before it learns to count
BOOTSTRAP = 2000
DEFAULT_OUT, DEFAULT_PLOTS = "docs/results/experiment.json", "docs/_static"


def arm_config(arm: str, seed: int, budget: experiment.Budget, model: str, data_dir: str):
    spec = dict(ARMS[arm])
    if "merged" in spec:
        cfg = experiment.merged(form=spec["merged"], budget=budget, seed=seed)
    else:
        cfg = experiment.staged(budget=budget, seed=seed, **spec)
    # the base is evaluated once for every arm (greedy: the same numbers), not at each run's start
    stages = tuple(dataclasses.replace(s, eval=dataclasses.replace(s.eval, at_start=False)) for s in cfg.stages)
    return dataclasses.replace(cfg, stages=stages,
                               model=dataclasses.replace(cfg.model, path=model),
                               data=dataclasses.replace(cfg.data, data_dir=data_dir),
                               logging=dataclasses.replace(cfg.logging, progress=False, tensorboard=False))


def run_key(arm: str, seed: int, budget: experiment.Budget, base: dict) -> str:
    """What makes two runs the same run: the arm's whole configuration (its model and data paths
    aside) and the base it starts from (its evaluation, item by item). A run whose key is already
    in the experiment's store (or in an earlier experiment's JSON, ``--reuse``) is not run again,
    so changing one stage's budget reruns only the arms that stage is part of."""
    cfg = arm_config(arm, seed, budget, model="", data_dir="")
    base_items = {name: e["correct"] for name, e in sorted(base.items())}
    blob = json.dumps({"config": _set_fields(cfg), "base": base_items}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _set_fields(value):
    """A config as nested dicts of the fields that differ from their defaults, so a field added
    later (its default keeping the old behaviour) leaves every earlier run's key as it was."""
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            default = (f.default if f.default is not dataclasses.MISSING else
                       f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if default is dataclasses.MISSING or v != default:
                out[f.name] = _set_fields(v)
        return out
    if isinstance(value, (list, tuple)):
        return [_set_fields(v) for v in value]
    return value


def reusable_runs(path: Path, base: dict) -> dict[str, dict]:
    """The runs of an earlier experiment's JSON by their `run_key` (computed from its budget and its
    base evaluation, so a run counts only if its configuration and base are the ones wanted now)."""
    earlier = json.loads(path.read_text())
    budget = experiment.Budget(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in earlier["meta"]["budget"].items()})
    same_base = all(earlier["base"].get(n, {}).get("correct") == e["correct"] for n, e in base.items())
    if not same_base:
        print(f"--reuse {path}: its base evaluation differs from this base's; nothing reused", flush=True)
        return {}
    return {run_key(r["arm"], r["seed"], budget, base): r for r in earlier["runs"]}


def _summary(record: dict) -> dict:
    items = record["items"]
    return {"accuracy": record["accuracy"], "score": record.get("score"),
            "length": record["mean_response_length"], "length_correct": record.get("mean_response_length_correct"),
            "n": record["n"], "correct": "".join(map(str, items["correct"])), "lengths": items["length"],
            "index": items["index"]}


def run_arm(arm: str, seed: int, budget: experiment.Budget, model: str, data_dir: str, workdir: str) -> dict:
    """One run (in a worker process): train, then its stage-end evaluations as summaries."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import contextlib
    import io

    from vlm_jax import curriculum

    import shutil

    cfg = arm_config(arm, seed, budget, model, data_dir)
    shutil.rmtree(workdir, ignore_errors=True)  # a run interrupted before: start it again
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        status = curriculum.run(cfg, workdir)
    if status != "finished":
        raise RuntimeError(f"{arm} seed {seed}: run ended {status}")
    points = report.capability_matrix(report.load_evals(workdir), [s.name for s in cfg.stages])
    return {"arm": arm, "seed": seed, "seconds": time.time() - t0, "stages": [s.name for s in cfg.stages],
            "points": [{"after": p["after"], "evals": {n: _summary(e) for n, e in p["evals"].items()}}
                       for p in points]}


def plots_dir(out: str, plots: str | None) -> Path:
    """Where the plots go: `plots` if given; the docs' images next to the docs' JSON; else beside
    `out`, so a pilot written elsewhere leaves the committed plots alone."""
    if plots is not None:
        return Path(plots)
    return Path(DEFAULT_PLOTS) if Path(out) == Path(DEFAULT_OUT) else Path(out).parent


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: end this worker when the experiment's process is gone (killed, or
    stopped with Ctrl-C), instead of training on for minutes with nobody to take the result."""
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def evaluate_base(model: str, data_dir: str, budget: experiment.Budget, max_examples: int) -> dict:
    """The base's evaluation, with the settings of every stage-end evaluation."""
    from vlm_jax import data
    from vlm_jax.evaluate import evaluate_source, load_for_eval

    cfg = arm_config("staged", 0, budget, model, data_dir)
    ev = cfg.stages[0].eval
    m, params, processor = load_for_eval(model)
    from vlm_jax.startup import configure_processor

    configure_processor(processor, cfg.data)
    out = {}
    for c in CAPS:
        source = data.load(DATASETS[c], split="validation", data_dir=data_dir)
        r = evaluate_source(m, params, processor, source, name=EVAL_NAMES[c], max_examples=max_examples,
                            batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
                            length_buckets=cfg.data.length_buckets,
                            max_pixels_per_batch=cfg.data.max_pixels_per_image * ev.batch_size)
        out[EVAL_NAMES[c]] = _summary(r)
    return out


# ------------------------------------------------------------------------------------------ analysis


def correct_matrix(runs: list[dict], name: str, point: int = -1) -> np.ndarray:
    """[seeds, items] 0/1 of dataset `name` at `point` (default: the end of the run)."""
    return np.array([[int(ch) for ch in r["points"][point]["evals"][name]["correct"]] for r in runs], float)


def bootstrap_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray], rng: np.random.Generator,
                   reps: int = BOOTSTRAP) -> tuple[float, float, float]:
    """Mean paired difference a - b averaged over datasets, with a 95% bootstrap interval resampling
    seeds and, per dataset, items (the same draws for both arms)."""
    names = list(a)
    seeds = a[names[0]].shape[0]
    point = float(np.mean([(a[n] - b[n]).mean() for n in names]))
    stats = np.empty(reps)
    for k in range(reps):
        s = rng.integers(0, seeds, seeds)
        vals = []
        for n in names:
            items = rng.integers(0, a[n].shape[1], a[n].shape[1])
            d = a[n][s][:, items] - b[n][s][:, items]
            vals.append(d.mean())
        stats[k] = np.mean(vals)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return point, float(lo), float(hi)


def analyse(results: dict) -> dict:
    rng = np.random.default_rng(0)
    by_arm: dict[str, list[dict]] = {}
    for r in sorted(results["runs"], key=lambda r: (r["arm"], r["seed"])):
        by_arm.setdefault(r["arm"], []).append(r)
    arms = {}
    for arm, runs in by_arm.items():
        final = {c: [r["points"][-1]["evals"][EVAL_NAMES[c]] for r in runs] for c in CAPS}
        arms[arm] = {
            "seeds": [r["seed"] for r in runs],
            "final": {c: {"accuracy_mean": float(np.mean([e["accuracy"] for e in final[c]])),
                          "accuracy_sd": float(np.std([e["accuracy"] for e in final[c]], ddof=1)) if len(runs) > 1 else 0.0,
                          "length_mean": float(np.mean([e["length"] for e in final[c]])),
                          "length_sd": float(np.std([e["length"] for e in final[c]], ddof=1)) if len(runs) > 1 else 0.0,
                          "score_mean": float(np.mean([e["score"] for e in final[c]]))}
                      for c in CAPS},
            "average": {"accuracy_mean": float(np.mean([np.mean([e["accuracy"] for e in final[c]]) for c in CAPS])),
                        "accuracy_sd": float(np.std([np.mean([final[c][i]["accuracy"] for c in CAPS])
                                                     for i in range(len(runs))], ddof=1)) if len(runs) > 1 else 0.0},
            "gains": [stage_gains(results["base"], r) for r in runs],
        }
    comparisons = []
    for question, form, a_arm, b_arm in COMPARISONS:
        if a_arm not in by_arm or b_arm not in by_arm:
            continue
        a_runs, b_runs = by_arm[a_arm], by_arm[b_arm]
        seeds = sorted({r["seed"] for r in a_runs} & {r["seed"] for r in b_runs})
        a_runs = [r for r in a_runs if r["seed"] in seeds]
        b_runs = [r for r in b_runs if r["seed"] in seeds]
        row = {"question": question, "form": form, "a": a_arm, "b": b_arm, "seeds": seeds, "metrics": {}}
        for label, caps in [*((c, [c]) for c in CAPS), ("average", list(CAPS))]:
            a = {c: correct_matrix(a_runs, EVAL_NAMES[c]) for c in caps}
            b = {c: correct_matrix(b_runs, EVAL_NAMES[c]) for c in caps}
            diff, lo, hi = bootstrap_diff(a, b, rng)
            per_seed = np.mean([a[c].mean(1) - b[c].mean(1) for c in caps], axis=0)
            row["metrics"][label] = {"diff": diff, "ci": [lo, hi], "a_better": int((per_seed > 0).sum()),
                                     "b_better": int((per_seed < 0).sum()), "ties": int((per_seed == 0).sum())}
        comparisons.append(row)
    return {"arms": arms, "comparisons": comparisons}


def missing_comparisons(arms) -> list[tuple[str, str, str]]:
    """(question, arm A, arm B) of each comparison with an arm not among `arms`."""
    return [(q, x, y) for q, _, x, y in COMPARISONS if not {x, y} <= set(arms)]


def stage_gains(base: dict, run: dict) -> list[dict]:
    """Each stage's own-capability accuracy gain in one run, with its paired SE over items."""
    points = [{"after": "start", "evals": base}, *run["points"]]
    out = []
    for k in range(1, len(points)):
        stage = points[k]["after"]
        if stage not in EVAL_NAMES:
            continue  # the merged stage has no own capability
        name = EVAL_NAMES[stage]
        before, after = points[k - 1]["evals"][name], points[k]["evals"][name]
        gain = report.paired_gain(_as_record(before), _as_record(after))
        if gain is None:
            raise ValueError(f"{run['arm']} seed {run['seed']}: {name} was not evaluated on the base's items")
        mean, se = gain
        out.append({"stage": stage, "before": before["accuracy"], "after": after["accuracy"],
                    "gain": mean, "se": se, "z": mean / se if se > 0 else 0.0})
    return out


def _as_record(summary: dict) -> dict:
    """A run summary's per-item results in the shape `vlm_jax.report` reads (`items`)."""
    return {"items": {"index": summary["index"], "correct": [int(c) for c in summary["correct"]]}}


# ------------------------------------------------------------------------------------------ output


def _run_time(results: dict) -> str:
    """The runs' own time (reused runs included) and this invocation's wall time."""
    hours = sum(r.get("seconds", 0.0) for r in results["runs"]) / 3600
    return (f"{hours:.1f} h summed over the runs (several at once on the CPU's cores, each slower for it); "
            f"this invocation {results['meta']['minutes']:.0f} min")


def markdown(results: dict) -> str:
    a = results["analysis"]
    meta = results["meta"]
    counts = sorted(set(meta.get("arm_seeds", {}).values()) | {meta["seeds"]})
    lines = [f"Command: `{meta['command']}`; {' or '.join(map(str, counts))} seeds per arm; {meta['machine']}; "
             f"{len(results['runs'])} runs, {_run_time(results)}; "
             f"{len(meta['eval_items'])} evaluation sets of {meta['eval_items'][0]} items.", "",
             "**Final accuracy per arm** (mean ± SD over seeds, %; mean response length in tokens):", "",
             "| arm | form | perception | textual | visual | average | length P / T / V |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    base = results["base"]
    lines.append("| base | — | " + " | ".join(f"{100 * base[EVAL_NAMES[c]]['accuracy']:.1f}" for c in CAPS)
                 + f" | {100 * np.mean([base[EVAL_NAMES[c]]['accuracy'] for c in CAPS]):.1f} | "
                 + " / ".join(f"{base[EVAL_NAMES[c]]['length']:.1f}" for c in CAPS) + " |")
    for arm, s in a["arms"].items():
        form = "paper" if arm.endswith("_paper") else "project"
        lines.append(f"| {arm} | {form} | " + " | ".join(
            f"{100 * s['final'][c]['accuracy_mean']:.1f} ± {100 * s['final'][c]['accuracy_sd']:.1f}" for c in CAPS)
            + f" | {100 * s['average']['accuracy_mean']:.1f} ± {100 * s['average']['accuracy_sd']:.1f} | "
            + " / ".join(f"{s['final'][c]['length_mean']:.1f}" for c in CAPS) + " |")
    lines += ["", "**Comparisons** (A − B in points, mean over seeds; 95% bootstrap interval over seeds and "
              "items; seeds with A better / B better / tied):", ""]
    if not a["comparisons"]:
        lines.append("_None: no two arms of a comparison were run (`--arms`)._")
    else:
        lines += ["| question | form | A − B | visual | average | perception | textual |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for row in a["comparisons"]:
        cells = []
        for label in ("visual_reasoning", "average", "perception", "textual_reasoning"):
            m = row["metrics"][label]
            cells.append(f"{100 * m['diff']:+.1f} [{100 * m['ci'][0]:+.1f}, {100 * m['ci'][1]:+.1f}] "
                         f"({m['a_better']}/{m['b_better']}/{m['ties']})")
        lines.append(f"| {row['question']} | {row['form']} | {row['a']} − {row['b']} | " + " | ".join(cells) + " |")
    missing = [f"{q} ({x} − {y})" for q, x, y in missing_comparisons(a["arms"])]
    if missing and a["comparisons"]:
        lines += ["", f"Not run (`--arms`): {'; '.join(missing)}."]
    lines += ["", "**Each stage's gain on its own capability** (accuracy points, per seed; paired SE over items; "
              "the smallest gain / SE over seeds):", "",
              "| arm | stage | gains per seed (± SE) | min gain / SE |", "| --- | --- | --- | ---: |"]
    for arm, s in a["arms"].items():
        stages = [g["stage"] for g in s["gains"][0]] if s["gains"] else []
        for k, stage in enumerate(stages):
            gs = [run[k] for run in s["gains"]]
            lines.append(f"| {arm} | {stage} | " + ", ".join(f"{100 * g['gain']:+.1f} ± {100 * g['se']:.1f}" for g in gs)
                         + f" | {min(g['z'] for g in gs):.1f} |")
    return "\n".join(lines) + "\n"


def plots(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    by_arm: dict[str, list[dict]] = {}
    for r in results["runs"]:
        by_arm.setdefault(r["arm"], []).append(r)
    base = results["base"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=False)
    for ax, c in zip(axes, CAPS):
        for arm, runs in sorted(by_arm.items()):
            acc = np.array([[base[EVAL_NAMES[c]]["accuracy"]] + [p["evals"][EVAL_NAMES[c]]["accuracy"] for p in r["points"]]
                            for r in runs]) * 100
            x = np.arange(acc.shape[1]) if acc.shape[1] == 4 else np.array([0, 3])
            m, sd = acc.mean(0), acc.std(0)
            ax.plot(x, m, marker="o", label=arm)
            ax.fill_between(x, m - sd, m + sd, alpha=0.15)
        ax.set_title(c.replace("_", " "))
        ax.set_xticks(range(4), ["start", "stage 1", "stage 2", "stage 3"])
        ax.set_ylabel("accuracy % (mean ± SD over seeds)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths = [out_dir / "experiment_accuracy.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(9, 4))
    arms = sorted(by_arm)
    width = 0.25
    for k, c in enumerate(CAPS):
        vals = [[r["points"][-1]["evals"][EVAL_NAMES[c]]["length"] for r in by_arm[a]] for a in arms]
        ax.bar(np.arange(len(arms)) + (k - 1) * width, [np.mean(v) for v in vals], width,
               yerr=[np.std(v) for v in vals], label=c.replace("_", " "))
    ax.set_xticks(range(len(arms)), arms, rotation=20, fontsize=8)
    ax.set_ylabel("final mean response length (tokens)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "experiment_length.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"some of {', '.join(ARMS)}")
    ap.add_argument("--arm_seeds", default="", help="more seeds for some arms, e.g. staged=5 (run after the rest)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (worker processes)")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK['seeds']} seeds, steps x {QUICK['scale']}")
    ap.add_argument("--budget", default="{}", help="JSON of vlm_jax.experiment.Budget fields to override (pilots)")
    ap.add_argument("--model", default="artifacts/tiny_base")
    ap.add_argument("--data_dir", default=None)
    ap.add_argument("--workdir", default="workdirs/experiment")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="an earlier experiment JSON: its runs whose configuration and base are unchanged are kept")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--plots", default=None,
                    help=f"directory of the plots (default: {DEFAULT_PLOTS} with the default --out, else --out's)")
    args = ap.parse_args(argv)
    from vlm_jax import paths

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        ap.error(f"unknown arms {unknown}; known: {sorted(ARMS)}")
    seeds = QUICK["seeds"] if args.quick else args.seeds
    if seeds < 1 or args.jobs < 1:
        ap.error("--seeds and --jobs must be >= 1")
    arm_seeds = {arm: seeds for arm in arms}
    for item in filter(None, args.arm_seeds.split(",")):
        arm, _, n = item.partition("=")
        if arm not in arm_seeds or not n.isdigit() or int(n) < seeds:
            ap.error(f"--arm_seeds {item!r}: ARM=N with ARM one of --arms and N >= --seeds ({seeds})")
        arm_seeds[arm] = int(n)
    try:
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.budget).items()}
        budget = experiment.Budget(**{"scale": QUICK["scale"] if args.quick else 1.0, **overrides})
    except (ValueError, TypeError) as e:
        ap.error(f"--budget {args.budget!r}: {e}")
    data_dir = str(paths.data_dir(args.data_dir))
    model = str(Path(args.model).resolve())
    if not (Path(model) / "config.json").exists():
        ap.error(f"--model {args.model}: no model there; run `python -m vlm_jax.demo_setup` first")
    t0 = time.time()
    print(f"base: {model}; data: {data_dir}; {len(arms)} arms x {seeds} seeds, {args.jobs} at once", flush=True)
    base = evaluate_base(model, data_dir, budget, experiment.EVAL_ITEMS)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    # finished runs are kept in runs.jsonl, so an interrupted experiment reruns only what is missing
    done_file = work / "runs.jsonl"
    done = reusable_runs(args.reuse, base) if args.reuse else {}
    earlier = set(done)
    if done_file.exists():
        for line in done_file.read_text().splitlines():
            r = json.loads(line)
            done[r.get("key")] = r
    wanted = [(arm, seed) for seed in range(max(arm_seeds.values())) for arm in arms if seed < arm_seeds[arm]]
    keys = {t: run_key(*t, budget, base) for t in wanted}
    runs = [{k: v for k, v in done[keys[t]].items() if k != "key"} for t in wanted if keys[t] in done]
    tasks = [t for t in wanted if keys[t] not in done]
    if runs:
        reused = sum(keys[t] in earlier for t in wanted)
        print(f"{len(runs)} runs already finished ({reused} of them in {args.reuse}); {len(tasks)} to go"
              if reused else f"{len(runs)} runs already finished in {done_file}; {len(tasks)} to go", flush=True)
    import multiprocessing

    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(run_arm, arm, seed, budget, model, data_dir, str(work / f"{arm}_s{seed}")): (arm, seed)
                   for arm, seed in tasks}
        for f in futures:
            r = f.result()
            runs.append(r)
            with done_file.open("a") as fh:
                fh.write(json.dumps({**r, "key": keys[(r["arm"], r["seed"])]}) + "\n")
            final = r["points"][-1]["evals"]
            print(f"{r['arm']:>13} seed {r['seed']}: " + "  ".join(
                f"{c[0].upper()} {100 * final[EVAL_NAMES[c]]['accuracy']:.1f}" for c in CAPS)
                + f"  ({r['seconds']:.0f} s)", flush=True)
    command = "python scripts/reproduce_paper.py" + (" --quick" if args.quick else f" --seeds {seeds}")
    if arms != list(DEFAULT_ARMS):
        command += f" --arms {','.join(arms)}"
    if args.arm_seeds:
        command += f" --arm_seeds {args.arm_seeds}"
    if args.budget != "{}":
        command += f" --budget '{args.budget}'"
    results = {"meta": {"command": command, "seeds": seeds, "arm_seeds": arm_seeds, "arms": arms, "budget": dataclasses.asdict(budget),
                        "machine": f"{os.cpu_count()}-core CPU, JAX on CPU", "minutes": (time.time() - t0) / 60,
                        "eval_items": [base[EVAL_NAMES[c]]["n"] for c in CAPS]},
               "base": base, "runs": runs}
    results["analysis"] = analyse(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results) + "\n")
    table = markdown(results)
    out.with_suffix(".md").write_text(table)
    for p in plots(results, plots_dir(args.out, args.plots)):
        print(f"plot: {p}")
    print(table)
    print(f"results: {out} ({(time.time() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End-of-run report: per-stage before/after tables, plots, and comparisons between runs.

Reads only what `vlm_jax.metrics.MetricsWriter` writes in a workdir (`metrics.jsonl`, `eval/*.json`),
so it works on finished, running or killed runs, and on runs copied from another machine.

Accuracy is shown in percent and its deltas in percentage points; response lengths are mean
generated tokens per response. Plots are drawn with matplotlib's Agg canvas directly (no pyplot,
no global backend switch), one PNG per quantity, with dashed vertical lines at stage boundaries.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlm_jax import paths
from vlm_jax.metrics import EVAL_DIR, EVAL_WHEN, METRICS_FILE

Record = dict[str, Any]
Series = tuple[list[float], list[float]]

EVAL_REQUIRED_KEYS: tuple[str, ...] = ("step", "stage", "name", "when", "accuracy",
                                       "mean_response_length")
ALL_TASKS = "(all)"
NO_TASK_KEYS = ("(no task)", "all")  # per-task key of rows without a `task` (now / before)
MISSING = "—"
_WHEN_RANK = {when: i for i, when in enumerate(EVAL_WHEN)}  # before < during < after
_PLOT_DPI = 100


# ----------------------------------------------------------------------------------- Loading
def _require_workdir(workdir: str | os.PathLike[str]) -> Path:
    path = paths.as_path(workdir)  # a local folder or a URL (gs://...)
    if not path.is_dir():
        raise FileNotFoundError(f"workdir {str(path)!r} does not exist or is not a directory")
    return path


def load_metrics(workdir: str | os.PathLike[str]) -> list[Record]:
    """Every record of `workdir/metrics.jsonl` in file order ([] when the file is absent).

    A truncated last line (run killed mid-write) is skipped; any other unreadable line raises,
    naming the file and line number.
    """
    path = _require_workdir(workdir) / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records: list[Record] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                continue
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({e.msg}): {line[:80]!r}") from None
        if not isinstance(record, dict) or "step" not in record or "stage" not in record:
            raise ValueError(f"{path}:{i + 1}: expected an object with 'step' and 'stage': {line[:80]!r}")
        records.append(record)
    return records


def load_evals(workdir: str | os.PathLike[str]) -> list[Record]:
    """Every evaluation file under `workdir/eval/`, sorted by step, then before/during/after, then
    dataset name ([] when there is none). A file that is not valid JSON, lacks a required key
    or has an unknown `when` raises, naming the file."""
    eval_dir = _require_workdir(workdir) / EVAL_DIR
    if not eval_dir.is_dir():
        return []
    evals: list[Record] = []
    for path in sorted(eval_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}")
        missing = [k for k in EVAL_REQUIRED_KEYS if k not in record]
        if missing:
            raise ValueError(f"{path}: missing keys {missing} (required: {list(EVAL_REQUIRED_KEYS)})")
        if record["when"] not in _WHEN_RANK:
            raise ValueError(f"{path}: 'when' must be one of {EVAL_WHEN}, got {record['when']!r}")
        record.setdefault("per_task", {})
        evals.append(record)
    evals.sort(key=_eval_order)
    return evals


def _eval_order(record: Record) -> tuple[int, int, str]:
    return (record["step"], _WHEN_RANK[record["when"]], record["name"])


# ------------------------------------------------------------------------------------ Tables
def _pct(value: float | None) -> str:
    return MISSING if value is None else f"{100.0 * value:.1f}"


def _tokens(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f}"


def _delta(before: float | None, after: float | None, scale: float = 1.0) -> str:
    if before is None or after is None:
        return MISSING
    return f"{scale * (after - before):+.1f}"


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric_from: int) -> str:
    """A markdown table; columns from index `numeric_from` on are right-aligned."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _last(evals: Iterable[Record], **match: Any) -> Record | None:
    """The latest (by step, then when) eval whose fields equal `match`, or None."""
    found = [e for e in evals if all(e.get(k) == v for k, v in match.items())]
    return max(found, key=_eval_order) if found else None


def _task_view(record: Record | None, task: str) -> tuple[float | None, float | None, int | None]:
    """(accuracy, mean response length, n) of one task of an eval (or its overall numbers)."""
    if record is None:
        return None, None, None
    if task == ALL_TASKS:
        return record["accuracy"], record["mean_response_length"], record.get("n")
    entry = record["per_task"].get(task)
    if entry is None:
        return None, None, None
    return entry.get("accuracy"), entry.get("mean_response_length"), entry.get("n")


def stage_table(evals: Sequence[Record], stages: Sequence[str]) -> str:
    """Markdown: for each stage, each eval dataset and task (plus the overall `(all)` row), the
    accuracy (%) and mean response length (tokens) before and after the stage, with deltas.

    "Before"/"after" are that stage's evals with `when="before"`/`"after"` (the latest one when
    there are several). A side that is missing shows `—`.
    """
    sections: list[str] = []
    header = ["dataset", "task", "n", "acc before %", "acc after %", "Δ acc (pts)",
              "len before", "len after", "Δ len (tok)"]
    for stage in stages:
        names = sorted({e["name"] for e in evals
                        if e["stage"] == stage and e["when"] in ("before", "after")})
        title = f"### Stage `{stage}`"
        if not names:
            sections.append(f"{title}\n\n_No before/after evaluations for this stage._")
            continue
        rows: list[list[str]] = []
        previous = stages[stages.index(stage) - 1] if stages.index(stage) > 0 else None
        for name in names:
            before = _last(evals, stage=stage, name=name, when="before")
            if before is None and previous is not None:  # evaluated at the previous stage's end only
                before = _last(evals, stage=previous, name=name, when="after")
            after = _last(evals, stage=stage, name=name, when="after")
            tasks = sorted({*(before or {}).get("per_task", {}), *(after or {}).get("per_task", {})})
            if len(tasks) == 1 and tasks[0] in NO_TASK_KEYS:
                tasks = []  # rows without a task: the overall row says it all
            for task in [ALL_TASKS, *tasks]:
                acc_b, len_b, n_b = _task_view(before, task)
                acc_a, len_a, n_a = _task_view(after, task)
                n = n_a if n_a is not None else n_b
                rows.append([name, task, MISSING if n is None else str(n),
                             _pct(acc_b), _pct(acc_a), _delta(acc_b, acc_a, 100.0),
                             _tokens(len_b), _tokens(len_a), _delta(len_b, len_a)])
        sections.append(f"{title}\n\n{_markdown_table(header, rows, numeric_from=2)}")
    return "\n\n".join(sections) + "\n"


def capability_matrix(evals: Sequence[Record], stages: Sequence[str]) -> list[dict[str, Any]]:
    """The evaluation points of a run: its start (the first stage's `before`), then the end of each
    stage; each point maps every dataset evaluated there to its record. A point without records is
    left out."""
    points = []
    if stages:
        start = {e["name"]: e for e in sorted(evals, key=_eval_order) if e["stage"] == stages[0] and e["when"] == "before"}
        if start:
            points.append({"after": "start", "evals": start})
    for stage in stages:
        end = {e["name"]: e for e in sorted(evals, key=_eval_order) if e["stage"] == stage and e["when"] == "after"}
        if end:
            points.append({"after": stage, "evals": end})
    return points


def paired_gain(before: Record, after: Record, field: str = "correct") -> tuple[float, float] | None:
    """(mean gain, its standard error) of `after` over `before` on the same items, from their
    per-item results (paired: the SE of the mean per-item difference); None without item results
    or when the two evaluated different items."""
    a, b = after.get("items"), before.get("items")
    if not a or not b or a["index"] != b["index"] or not a["index"]:
        return None
    d = np.asarray(a[field], float) - np.asarray(b[field], float)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se


def stage_gains(points: Sequence[dict[str, Any]], own: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """For each stage, the change of its own capability's evaluation sets (`own[stage]`: dataset
    names) from the previous point to its end: accuracy before / after, the gain, its paired SE and
    gain / SE, and the same for the graded score."""
    out = []
    for k in range(1, len(points)):
        stage = points[k]["after"]
        for name in own.get(stage, ()):
            before, after = points[k - 1]["evals"].get(name), points[k]["evals"].get(name)
            if before is None or after is None:
                continue
            row = {"stage": stage, "dataset": name, "before": before["accuracy"], "after": after["accuracy"],
                   "gain": after["accuracy"] - before["accuracy"], "se": None, "z": None}
            g = paired_gain(before, after)
            if g is not None:
                row["se"] = g[1]
                row["z"] = g[0] / g[1] if g[1] > 0 else (0.0 if g[0] == 0 else float("inf"))
            if "score" in before and "score" in after:
                row["score_before"], row["score_after"] = before["score"], after["score"]
                sg = paired_gain(before, after, "score")
                row["score_gain"] = after["score"] - before["score"]
                row["score_se"] = None if sg is None else sg[1]
            out.append(row)
    return out


def own_datasets(evals: Sequence[Record], stage_datasets: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Stage -> the evaluated datasets (`name[split]`) that share a name with its training data."""
    names = sorted({e["name"] for e in evals})
    return {stage: [n for n in names if n.split("[", 1)[0] in set(ds)] for stage, ds in stage_datasets.items()}


def matrix_table(points: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per evaluation set, one column per point: accuracy % (graded score % where
    it differs), then the mean response length per point."""
    if not points:
        return "_No stage-end evaluations._\n"
    names = sorted({n for p in points for n in p["evals"]})
    header = ["dataset", *[f"{'start' if p['after'] == 'start' else 'after ' + p['after']}" for p in points]]
    rows = []
    for name in names:
        cells = []
        for p in points:
            e = p["evals"].get(name)
            if e is None:
                cells.append(MISSING)
                continue
            text = _pct(e["accuracy"])
            if e.get("score") is not None and abs(e["score"] - e["accuracy"]) > 1e-9:
                text += f" ({_pct(e['score'])})"
            cells.append(text)
        rows.append([name, *cells])
    for name in names:
        rows.append([f"{name} length", *[_tokens(p["evals"][name]["mean_response_length"]) if name in p["evals"]
                                          else MISSING for p in points]])
    return _markdown_table(header, rows, numeric_from=1)


def gains_table(gains: Sequence[dict[str, Any]]) -> str:
    """Markdown: each stage's own-capability accuracy before / after, gain ± paired SE, gain / SE."""
    if not gains:
        return "_No stage trained a capability it also evaluated._\n"
    def score(g):  # partial credit (e.g. per grid cell), where the set has it
        if g.get("score_gain") is None or abs(g["score_before"] - g["before"]) < 1e-9:
            return MISSING
        return f"{100 * g['score_gain']:+.1f}" + ("" if g.get("score_se") is None else f" ± {100 * g['score_se']:.1f}")

    rows = [[g["stage"], g["dataset"], _pct(g["before"]), _pct(g["after"]),
             f"{100 * g['gain']:+.1f}" + ("" if g["se"] is None else f" ± {100 * g['se']:.1f}"),
             MISSING if g["z"] is None else f"{g['z']:.1f}", score(g)] for g in gains]
    return _markdown_table(["stage", "own set", "acc before %", "acc after %", "gain ± SE (pts)", "gain / SE",
                            "graded score gain ± SE (pts)"], rows, numeric_from=2)


def final_evals(evals: Sequence[Record]) -> dict[str, Record]:
    """Dataset name -> its last evaluation (highest step; at equal steps after > during > before)."""
    final: dict[str, Record] = {}
    for record in sorted(evals, key=_eval_order):
        final[record["name"]] = record
    return final


def compare_runs(runs: Mapping[str, str | os.PathLike[str]]) -> str:
    """Markdown table, one row per run: the final accuracy (%) and mean response length (tokens)
    on each eval dataset, and their averages over datasets (only when the run has all of them)."""
    if not runs:
        raise ValueError("compare_runs needs at least one run")
    finals = {run: final_evals(load_evals(workdir)) for run, workdir in runs.items()}
    datasets = sorted({name for final in finals.values() for name in final})
    header = ["run"]
    for name in datasets:
        header += [f"{name} acc %", f"{name} len"]
    header += ["avg acc %", "avg len"]
    rows = []
    for run, final in finals.items():
        row = [run]
        for name in datasets:
            record = final.get(name)
            row += [_pct(record["accuracy"] if record else None),
                    _tokens(record["mean_response_length"] if record else None)]
        complete = bool(datasets) and all(name in final for name in datasets)
        accs = [final[n]["accuracy"] for n in datasets] if complete else []
        lens = [final[n]["mean_response_length"] for n in datasets] if complete else []
        row += [_pct(sum(accs) / len(accs) if accs else None),
                _tokens(sum(lens) / len(lens) if lens else None)]
        rows.append(row)
    return _markdown_table(header, rows, numeric_from=1) + "\n"


# ------------------------------------------------------------------------------------- Plots
def stage_boundaries(metrics: Sequence[Record], evals: Sequence[Record] = ()) -> list[tuple[int, str]]:
    """(first step, stage) of each stage seen in the metrics or evals, in step order."""
    first: dict[str, int] = {}
    for record in [*metrics, *evals]:
        stage, step = record["stage"], record["step"]
        first[stage] = min(step, first.get(stage, step))
    return sorted(((step, stage) for stage, step in first.items()), key=lambda b: b[0])


def metric_series(metrics: Sequence[Record], key: str) -> Series:
    """(steps, values) of one metric, skipping records without it and null (non-finite) values."""
    points = [(r["step"], r[key]) for r in metrics if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def eval_series(evals: Sequence[Record], field: str) -> dict[str, Series]:
    """Dataset name -> (steps, `field`) over its evaluations; one point per step (the last)."""
    per_name: dict[str, dict[int, float]] = {}
    for record in sorted(evals, key=_eval_order):
        if record.get(field) is not None:
            per_name.setdefault(record["name"], {})[record["step"]] = record[field]
    return {name: (sorted(points), [points[s] for s in sorted(points)])
            for name, points in sorted(per_name.items())}


def line_figure(series: Mapping[str, Series], boundaries: Sequence[tuple[int, str]], *,
                title: str, ylabel: str, markers: bool = False) -> Any | None:
    """A matplotlib Figure with one line per non-empty series and a dashed, labelled vertical line
    at each stage boundary; None when no series has a point."""
    drawn = {label: xy for label, xy in series.items() if xy[0]}
    if not drawn:
        return None
    from matplotlib.figure import Figure  # Lazy: matplotlib is slow to import.

    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for label, (xs, ys) in drawn.items():
        ax.plot(xs, ys, label=label, marker="o" if markers else None, markersize=4)
    for step, stage in boundaries:
        ax.axvline(step, linestyle="--", color="gray", linewidth=1)
        ax.text(step, 0.98, f" {stage}", transform=ax.get_xaxis_transform(), rotation=90,
                va="top", ha="left", fontsize=8, color="dimgray",
                bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1})
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(drawn) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(workdir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Write reward, eval accuracy, response length and loss plots (PNG) to `out_dir` (default
    `workdir/plots`). A plot whose data is absent is skipped. Returns the written paths."""
    workdir = _require_workdir(workdir)
    out = paths.as_path(out_dir) if out_dir is not None else workdir / "plots"
    metrics, evals = load_metrics(workdir), load_evals(workdir)
    bounds = stage_boundaries(metrics, evals)
    lengths = {"train (response_length/mean)": metric_series(metrics, "response_length/mean")}
    lengths.update({f"eval {name}": xy
                    for name, xy in eval_series(evals, "mean_response_length").items()})
    figures = {
        "reward": line_figure({"reward/mean": metric_series(metrics, "reward/mean")}, bounds,
                              title="Reward (mean)", ylabel="reward"),
        "eval_accuracy": line_figure(eval_series(evals, "accuracy"), bounds,
                                     title="Eval accuracy", ylabel="accuracy", markers=True),
        "response_length": line_figure(lengths, bounds, title="Mean response length",
                                       ylabel="tokens"),
        "loss": line_figure({"loss": metric_series(metrics, "loss")}, bounds,
                            title="Loss", ylabel="loss"),
    }
    written: list[Path] = []
    for name, fig in figures.items():
        if fig is None:
            continue
        paths.makedirs(out)
        path = out / f"{name}.png"
        with path.open("wb") as f:  # a file object: also for a bucket
            fig.savefig(f, dpi=_PLOT_DPI, format="png")
        written.append(path)
    return written


# ------------------------------------------------------------------------------------ Report
SUMMARY_KEYS = ("accuracy", "score", "mean_response_length", "mean_response_length_correct", "n")


def write_report(workdir: str | os.PathLike[str], stages: Sequence[str] | None = None,
                 stage_datasets: Mapping[str, Sequence[str]] | None = None) -> str:
    """Write `workdir/report.md` (the capability matrix and each stage's gain on its own sets when
    the run evaluated at stage ends, per-stage tables, final evals, plots) and `workdir/report.json`
    (the matrix and gains), and return the markdown. `stages=None` takes the stages in the order
    they appear in the run's logs; `stage_datasets` maps a stage to its training dataset names (its
    own capability's evaluation sets are those with the same names)."""
    workdir = _require_workdir(workdir)
    metrics, evals = load_metrics(workdir), load_evals(workdir)
    if stages is None:
        stages = [stage for _, stage in stage_boundaries(metrics, evals)]
    plots = plot(workdir)
    points = capability_matrix(evals, stages)
    gains = stage_gains(points, own_datasets(evals, stage_datasets or {}))
    summary = {"stages": list(stages), "points": [
        {"after": p["after"], "evals": {n: {k: e.get(k) for k in SUMMARY_KEYS} for n, e in p["evals"].items()}}
        for p in points], "gains": gains}
    (workdir / "report.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    parts = [f"# Run report: `{workdir.name}`"]
    if len(points) > 1:
        parts += ["## Every capability after every stage (accuracy %, graded score % in brackets)",
                  matrix_table(points).rstrip("\n"), "## Each stage's gain on its own capability (paired SE)",
                  gains_table(gains).rstrip("\n")]
    parts += ["## Before / after each stage",
             stage_table(evals, stages).rstrip("\n"), "## Final evaluation",
             compare_runs({workdir.name: workdir}).rstrip("\n"), "## Plots"]
    if plots:
        parts += [f"![{p.stem}]({_relative(p, workdir)})" for p in plots]
    else:
        parts.append("_No metrics to plot._")
    text = "\n\n".join(parts) + "\n"
    (workdir / "report.md").write_text(text, encoding="utf-8")
    return text


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)

"""Renders every results block of README.md and docs/**/*.md from the JSON under docs/results/.

A results block is the text between two markers in a markdown file:

    <!-- BEGIN results:NAME -->
    ... (written by this script: never edit by hand) ...
    <!-- END results:NAME -->

NAME picks a renderer in RENDERERS: a function of the parsed JSON files it names (None for a file
that is not there yet) returning markdown. To add one:

    @renderer("mytable", "mytable.json")
    def render_mytable(data):
        if data is None:
            return NOT_MEASURED
        return table(["a", "b"], [[row["a"], row["b"]] for row in data["rows"]])

then put the two markers where the table goes and run this script.

    python scripts/render_docs.py            # rewrite the blocks in place
    python scripts/render_docs.py --check    # exit 1, naming each block that differs (tests/test_docs.py)
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vlm_jax.data.synthetic import grid  # noqa: E402  (imports numpy and PIL only)

RESULTS = ROOT / "docs" / "results"
NOT_MEASURED = "*Not yet measured: no committed results file.*"
BLOCK = re.compile(r"(<!-- BEGIN results:([\w.-]+) -->\n)(.*?)(<!-- END results:\2 -->)", re.S)
MARKER = re.compile(r"<!-- (BEGIN|END) results:([\w.-]+) -->")

RENDERERS: dict[str, tuple[tuple[str, ...], Callable[..., str]]] = {}


def renderer(name: str, *json_files: str):
    """Registers `fn(*parsed_json_files) -> markdown` as the renderer of block `name`."""
    def register(fn):
        if name in RENDERERS:
            raise ValueError(f"renderer {name!r} registered twice")
        RENDERERS[name] = (json_files, fn)
        return fn
    return register


def load(json_file: str):
    path = RESULTS / json_file
    return json.loads(path.read_text()) if path.exists() else None


def table(header: list[str], rows: list[list[object]], align: str = "") -> str:
    """A markdown table; `align` has one letter per column, `r` for right-aligned (numbers)."""
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def commit_link(commit: str) -> str:
    return f"`{commit}`" if commit else "-"


# ---------------------------------------------------------------------------------- renderers
# the grid world's evaluation sets (`name[split]`) -> the capability (= the stage that trains it)
STAGE_OF = {f"{name}[validation]": capability for capability, name in grid.DATASETS.items()}
CAP_LABEL = {name: capability.replace("_", " ") for name, capability in STAGE_OF.items()}


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"




def _cell(e: dict) -> str:
    extra = f" ({_pct(e['score'])})" if e.get("score") is not None and abs(e["score"] - e["accuracy"]) > 1e-9 else ""
    return _pct(e["accuracy"]) + extra


@renderer("demo", "demo.json", "experiment.json")
def render_demo(demo, experiment) -> str:
    """The CPU demo's capability matrix with each stage's gain on its own capability
    (docs/results/demo.json: a demo run's report.json, taken with `python scripts/render_docs.py
    --take-demo WORKDIR`), and the range of those gains over the experiment's seeds (its `staged` arm)."""
    if demo is None:
        return NOT_MEASURED
    meta, points = demo["meta"], demo["points"]
    gains = {g["stage"]: g for g in demo["gains"]}
    header = ["accuracy % (per-cell %)", *["start" if p["after"] == "start" else f"after {p['after'].split('_')[0]}"
                                          for p in points], "own stage: gain ± SE"]
    rows = []
    for name, label in CAP_LABEL.items():
        if name not in points[0]["evals"]:
            continue
        g = gains.get(STAGE_OF[name])
        gain = "—" if g is None else f"{100 * g['gain']:+.1f} ± {100 * g['se']:.1f}"
        if g is not None and g.get("score_gain") is not None and abs(g["score_before"] - g["before"]) > 1e-9:
            gain += f" (per-cell {100 * g['score_gain']:+.1f} ± {100 * g['score_se']:.1f})"
        rows.append([label, *[_cell(p["evals"][name]) for p in points], gain])
    out = [table(header, rows, "l" + "r" * (len(points) + 1)), "",
           f"`{meta['command']}`, seed {meta['seed']}, {meta['eval_items']} items per capability, "
           f"{meta['machine']}, commit `{meta['commit']}`."]
    if experiment is not None and "staged" in experiment["analysis"]["arms"]:
        arm = experiment["analysis"]["arms"]["staged"]
        spread = []
        for k, g in enumerate(arm["gains"][0]):
            gs = [100 * run[k]["gain"] for run in arm["gains"]]
            spread.append(f"{g['stage'].split('_')[0]} {min(gs):+.1f} to {max(gs):+.1f}")
        out[-1] += (f" Over the experiment's {len(arm['seeds'])} seeds the same run's own-stage gains range "
                    + ", ".join(spread) + " points.")
    return "\n".join(out)


@renderer("experiment", "experiment.json")
def render_experiment(experiment) -> str:
    """README: the primary comparison (staged against merged, in each form run) and where the rest is."""
    if experiment is None:
        return NOT_MEASURED
    a = experiment["analysis"]
    lines = []

    def cell(m):
        return f"{100 * m['diff']:+.1f} [{100 * m['ci'][0]:+.1f}, {100 * m['ci'][1]:+.1f}]"

    for row in (r for r in a["comparisons"] if r["question"].startswith("staged vs merged")):
        m, v = row["metrics"]["average"], row["metrics"]["visual_reasoning"]
        lines.append(f"- {row['question']} ({row['form']} form, {len(row['seeds'])} seeds): average {cell(m)}; "
                     f"visual reasoning {cell(v)}")
    missing = [q for q, _, _ in _reproduce_paper().missing_comparisons(a["arms"])]
    if missing:
        lines.append(f"- *Not in the committed run (`--arms`): {'; '.join(missing)}.*")
    others = len(a["comparisons"]) - sum(r["question"].startswith("staged vs merged") for r in a["comparisons"])
    if others:
        lines.append(f"- {others} more comparisons (perception by GRPO or SFT, stage order, easy-to-hard) in the docs.")
    return "\n".join(lines + ["", f"{len(experiment['runs'])} runs; the command, tables, per-stage gains and plots: "
                                  "[docs/experiment.md](docs/experiment.md)."])


@functools.cache
def _reproduce_paper():
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce_paper", ROOT / "scripts" / "reproduce_paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@renderer("experiment-tables", "experiment.json")
def render_experiment_tables(experiment) -> str:
    """docs/experiment.md: the tables `scripts/reproduce_paper.py` writes (its markdown, from the JSON)."""
    if experiment is None:
        return NOT_MEASURED
    return _reproduce_paper().markdown(experiment).rstrip("\n")


def take_demo(workdir: str) -> Path:
    """Copies a finished demo run's report.json to docs/results/demo.json with its command, seed,
    machine and commit."""
    import os
    import subprocess

    report = json.loads((Path(workdir) / "report.json").read_text())
    seed = json.loads((Path(workdir) / "config.json").read_text()).get("seed", 0) if (Path(workdir) / "config.json").exists() else 0
    # the commit of the checkout the run was made in (the workdir's), else this one's
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(workdir).resolve(), capture_output=True,
                            text=True).stdout.strip() or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    first = report["points"][0]["evals"]
    report["meta"] = {"command": "bash scripts/demo.sh" + (f" --config.seed={seed}" if seed else ""), "seed": seed,
                      "machine": f"{os.cpu_count()}-core CPU", "commit": commit,
                      "eval_items": next(iter(first.values()))["n"]}
    out = RESULTS / "demo.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    return out


def _machine(data: dict, key: str) -> str:
    return data["machines"].get(key, key)


@renderer("headline", "performance.json", "scale.json")
def render_headline(perf, scale) -> str:
    """README: the few figures flagged `headline` plus the planner's verdict for the TPU recipes."""
    if perf is None:
        return NOT_MEASURED
    rows, used = [], set()
    for f in perf["figures"]:
        if f.get("headline"):
            value = f.get("headline_value") or f["result"] or f["vlm_jax"]
            rows.append([f["headline"], f"**{value}**", f"`{f['command']}`", f["machine"], commit_link(f["commit"])])
            used.add(f["machine"])
    if scale is not None:
        for plan in scale["plans"]:
            if plan.get("headline"):
                biggest = max(plan["rows"], key=lambda r: r["gib"])
                rows.append([f"Largest program per chip: {plan['title']}",
                             f"**{biggest['gib']:.2f} of {plan['hbm_gib']} GiB** "
                             f"({biggest['program'].split(' ')[0]}; every program fits)",
                             f"`{plan['command']}`", "tpu-compiler", commit_link(biggest["commit"])])
                used.add("tpu-compiler")
    machines = "; ".join(f"`{k}`: {v}" for k, v in perf["machines"].items() if k in used)
    return table(["figure", "value", "command", "machine", "commit"], rows) + f"\n\nMachines: {machines}."


@renderer("performance", "performance.json")
def render_performance(perf) -> str:
    if perf is None:
        return NOT_MEASURED
    rows = [[f["figure"], f["vlm_jax"], f["reference"] or "-", f"**{f['result']}**" if f["result"] else "-",
             f"`{f['command']}`", f["machine"], commit_link(f["commit"])] for f in perf["figures"]]
    machines = "\n".join(f"- `{k}`: {v}" for k, v in perf["machines"].items())
    return (table(["figure", "vlm_jax", "reference", "result", "command", "machine", "commit"], rows)
            + "\n\nMachines:\n\n" + machines)


@renderer("compile", "performance.json")
def render_compile(perf) -> str:
    if perf is None or "compile" not in perf:
        return NOT_MEASURED
    c = perf["compile"]
    rows = [[r["cache"], r["stage"], r["first"], r["later"], r["xla_compile"], r["trace_lower"]] for r in c["rows"]]
    return (table(["persistent cache", "stage", "first step s", "later step s", "XLA compile s",
                   "trace + lower s"], rows, "llrrrr")
            + f"\n\n{c['about']} `{c['command']}`, machine `{c['machine']}`, commit {commit_link(c['commit'])}.")


@renderer("tpu-estimate", "performance.json")
def render_tpu_estimate(perf) -> str:
    """The compiler's whole-iteration estimate (`scripts/estimate_tpu.py --json`, one run per recipe)
    before / after (`grpo.length_groups`, bounded KV reads, the recipe's `grpo.refill_slots`), per
    response-length distribution, and the peers' measured row."""
    if perf is None or "tpu_estimate" not in perf:
        return NOT_MEASURED
    t = perf["tpu_estimate"]
    rows, notes = [], []
    for run in t["runs"]:
        e = run["estimate"]
        mark = "" if e["compiler_rate_usable"] else "*"
        for mean, d in e["by_mean"].items():
            for path in ("before", "after"):
                p = d[path]
                sh = p["shares"]
                rows.append([f"{run['recipe']}, {run['slice']}", f"mean {d['mean_drawn']:.0f} ({d['truncated']:.1%} at {e['cap']})",
                             path, f"{p['seconds']:.0f}{mark}",
                             f"{sh['rollout']:.0%} / {sh['score']:.0%} / {sh['update']:.0%}",
                             f"{p['tokens_per_s_per_chip']:,.0f}", f"{p['mfu']:.1%} / {p['update_mfu']:.1%}",
                             f"{p['update_real_fraction']:.0%}",
                             f"{d['sampler'][path]['decode_slot_utilisation']:.0%}"])
        alternatives = "; ".join(
            f"mean {d['mean_drawn']:.0f}: " + ", ".join(
                f"{'no slots' if S == '0' else f'{int(S):,} slots'} {sec:.1f} s" for S, sec in d["refill_alternatives"].items())
            for d in e["by_mean"].values() if "refill_alternatives" in d)
        if alternatives:
            notes.append(f"{run['recipe']}, decode loops of its sampler calls with refilled slots instead "
                         f"(bounded views, prefill aside): {alternatives}")
        notes.append(f"{run['recipe']}: `{e['command']}`, commit {commit_link(run['commit'])}"
                     + ("" if e["compiler_rate_usable"] else " (* libtpu returns a negative time for its update and "
                        "scoring: they are at 100% of the bf16 peak, so its seconds are a lower bound and its tokens/s "
                        "and MFU upper bounds)"))
    for ref in t["reference"]["rows"]:
        rows.append([ref["recipe"], ref["lengths"], "measured", ref["seconds"], "-", ref["tokens"], ref["mfu"], "-", "-"])
    out = table(["recipe, slice", "responses", "path", "s/iter", "rollout / scoring / update",
                 "tokens/s/chip", "MFU iteration / update", "update positions real", "decode slots used"], rows,
                "lllrlrrrr")
    return out + "\n\n" + t["about"] + " " + t["reference"]["source"] + "\n\n" + "\n".join(f"- {n}" for n in notes)


@renderer("scale", "scale.json")
def render_scale(scale) -> str:
    if scale is None:
        return NOT_MEASURED
    out = []
    for plan in scale["plans"]:
        rows = []
        for r in plan["rows"]:
            hbm = r.get("hbm_gib", plan["hbm_gib"])
            rows.append([r["program"], f"{r['gib']:.2f}", hbm, "yes" if r["gib"] <= hbm else "**no**",
                         commit_link(r["commit"])])
        out += [f"**{plan['title']}** (`{plan['recipe']}`; {plan['sizes']})", "",
                table(["program", "GiB per chip", "HBM GiB", "fits", "commit"], rows, "lrrll"), "",
                f"`{plan['command']}`", ""]
    return "\n".join(out).rstrip()


@renderer("decode-layout", "scale.json")
def render_decode_layout(scale) -> str:
    if scale is None:
        return NOT_MEASURED
    d = scale["decode_layout"]
    rows = [[r["what"], r["fsdp"], r["decoding"]] for r in d["rows"]]
    return (table(["7B text stage, `generate`", "training (FSDP) layout", "decoding layout"], rows, "lrr")
            + f"\n\n`{d['command']}`, commit {commit_link(d['commit'])}.")


@renderer("not-fitting", "scale.json")
def render_not_fitting(scale) -> str:
    if scale is None:
        return NOT_MEASURED
    rows = [[r["what"], r["gib"], r["why"], commit_link(r["commit"])] for r in scale["not_fitting"]["rows"]]
    return table(["what", "GiB per chip", "why", "commit"], rows, "lrll")


# ------------------------------------------------------------------------------------- driver
def markdown_files() -> list[Path]:
    docs = [p for p in sorted((ROOT / "docs").rglob("*.md"))
            if not any(part.startswith("_") for part in p.relative_to(ROOT / "docs").parts)]
    return [ROOT / "README.md", *docs]


def render_block(name: str) -> str:
    if name not in RENDERERS:
        raise KeyError(f"no renderer for results:{name}; known: {', '.join(sorted(RENDERERS))}")
    files, fn = RENDERERS[name]
    return fn(*(load(f) for f in files)).rstrip("\n") + "\n"


def render_text(text: str, where: str = "") -> str:
    """`text` with every results block re-rendered. Unbalanced markers are errors."""
    begins = [m.group(2) for m in MARKER.finditer(text) if m.group(1) == "BEGIN"]
    blocks = [m.group(2) for m in BLOCK.finditer(text)]
    if begins != blocks or len(begins) != sum(1 for m in MARKER.finditer(text) if m.group(1) == "END"):
        raise ValueError(f"{where}: unbalanced results markers (BEGIN {begins}, complete blocks {blocks})")
    return BLOCK.sub(lambda m: m.group(1) + render_block(m.group(2)) + m.group(4), text)


def blocks_in(text: str) -> list[str]:
    return [m.group(2) for m in BLOCK.finditer(text)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs")
    ap.add_argument("--take-demo", metavar="WORKDIR", help="first copy a demo run's report.json to docs/results/demo.json")
    args = ap.parse_args(argv)
    if args.take_demo:
        print(f"wrote {take_demo(args.take_demo)}")
    stale = []
    for path in markdown_files():
        text = path.read_text()
        new = render_text(text, str(path.relative_to(ROOT)))
        if new == text:
            continue
        changed = [n for n, a, b in zip(blocks_in(text), BLOCK.findall(text), BLOCK.findall(new)) if a != b]
        stale += [f"{path.relative_to(ROOT)}: results:{n}" for n in changed]
        if not args.check:
            path.write_text(new)
    if stale:
        verb = "differs from what scripts/render_docs.py makes of docs/results/" if args.check else "rendered"
        print("\n".join(f"{s} {verb}" for s in stale), file=sys.stderr if args.check else sys.stdout)
        return 1 if args.check else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

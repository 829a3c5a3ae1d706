"""Report: loading, per-stage before/after tables, plots with stage boundaries, run comparison."""

import json
from pathlib import Path

import pytest

from vlm_jax.metrics import MetricsWriter
from vlm_jax.report import (compare_runs, line_figure, load_evals, load_metrics, plot,
                            stage_boundaries, stage_table, write_report)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _eval(acc: float, length: float, n: int, when: str, tasks: dict | None = None) -> dict:
    return {"when": when, "accuracy": acc, "mean_response_length": length, "n": n,
            "per_task": tasks or {}}


def _make_run(workdir: Path, final_geo_acc: float = 0.625) -> Path:
    """Two stages: perception (GRPO, steps 0-9) then textual (SFT, steps 10-19), with evals."""
    with MetricsWriter(workdir, tensorboard=False, progress=False, is_main=True) as w:
        w.write_eval(0, "perception", "geo", _eval(0.5, 100.0, 8, "before", {
            "counting": {"accuracy": 0.25, "mean_response_length": 80.0, "n": 4},
            "grounding": {"accuracy": 0.75, "mean_response_length": 120.0, "n": 4}}))
        for step in range(10):
            w.write(step, "perception", step, {"loss": 1.0 - 0.05 * step, "reward/mean": 0.1 * step,
                                               "response_length/mean": 100.0 - step})
        w.write_eval(5, "perception", "geo", _eval(0.55, 95.0, 8, "during"))
        w.write_eval(10, "perception", "geo", _eval(0.625, 90.5, 8, "after", {
            "counting": {"accuracy": 0.5, "mean_response_length": 70.0, "n": 4},
            "grounding": {"accuracy": 0.75, "mean_response_length": 111.0, "n": 4}}))
        w.write_eval(10, "textual", "geo", _eval(0.625, 90.5, 8, "before"))
        w.write_eval(10, "textual", "mathqa", _eval(0.2, 200.0, 10, "before"))
        for step in range(10, 20):
            w.write(step, "textual", step - 10, {"loss": 0.5, "response_length/mean": float("nan")})
        w.write_eval(20, "textual", "geo", _eval(final_geo_acc, 150.0, 8, "after"))
        w.write_eval(20, "textual", "mathqa", _eval(0.3, 180.0, 10, "after"))
    return workdir


def _rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]


def test_load_metrics_and_evals(tmp_path):
    run = _make_run(tmp_path / "run")
    metrics = load_metrics(run)
    assert [r["step"] for r in metrics if "loss" in r] == list(range(20))
    by_step = {r["step"]: r for r in metrics if "loss" in r}
    assert by_step[9]["stage"] == "perception" and by_step[10]["stage"] == "textual"
    assert by_step[10]["stage_step"] == 0 and by_step[10]["response_length/mean"] is None
    evals = load_evals(run)
    assert [(e["step"], e["when"], e["stage"], e["name"]) for e in evals] == [
        (0, "before", "perception", "geo"), (5, "during", "perception", "geo"),
        (10, "before", "textual", "geo"), (10, "before", "textual", "mathqa"),
        (10, "after", "perception", "geo"), (20, "after", "textual", "geo"),
        (20, "after", "textual", "mathqa")]
    assert stage_boundaries(metrics, evals) == [(0, "perception"), (10, "textual")]


def test_loaders_name_the_bad_file_or_line(tmp_path):
    run = _make_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 20, "sta')  # partial last line of a killed run: skipped
    assert load_metrics(run)[-1]["step"] == 20
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        load_metrics(run)
    (run / "eval" / "0000030_x_y.json").write_text(json.dumps({"step": 30, "stage": "x", "name": "y"}))
    with pytest.raises(ValueError, match=r"0000030_x_y.json: missing keys \['when', 'accuracy'"):
        load_evals(run)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_evals(tmp_path / "nowhere")


def test_stage_table_before_after_and_deltas(tmp_path):
    evals = load_evals(_make_run(tmp_path / "run"))
    table = stage_table(evals, ["perception", "textual", "visual"])
    rows = _rows(table)
    assert rows[0] == ["dataset", "task", "n", "acc before %", "acc after %", "Δ acc (pts)",
                       "len before", "len after", "Δ len (tok)"]
    # perception/geo: 50% -> 62.5% is +12.5 points; 100 -> 90.5 tokens is -9.5.
    assert ["geo", "(all)", "8", "50.0", "62.5", "+12.5", "100.0", "90.5", "-9.5"] in rows
    # counting: 25% -> 50% (+25.0 points), 80 -> 70 tokens (-10.0); grounding unchanged.
    assert ["geo", "counting", "4", "25.0", "50.0", "+25.0", "80.0", "70.0", "-10.0"] in rows
    assert ["geo", "grounding", "4", "75.0", "75.0", "+0.0", "120.0", "111.0", "-9.0"] in rows
    # textual: mathqa 20% -> 30% (+10.0), 200 -> 180 (-20.0); geo 62.5 -> 62.5, 90.5 -> 150 (+59.5).
    assert ["mathqa", "(all)", "10", "20.0", "30.0", "+10.0", "200.0", "180.0", "-20.0"] in rows
    assert ["geo", "(all)", "8", "62.5", "62.5", "+0.0", "90.5", "150.0", "+59.5"] in rows
    assert "### Stage `visual`\n\n_No before/after evaluations for this stage._" in table
    # the "during" eval (55%) is neither before nor after
    assert "55.0" not in table


def test_stage_table_missing_side_shows_dash():
    evals = [{"step": 0, "stage": "s", "name": "d", "when": "before", "accuracy": 0.5,
              "mean_response_length": 10.0, "per_task": {}, "n": 2}]
    assert ["d", "(all)", "2", "50.0", "—", "—", "10.0", "—", "—"] in _rows(stage_table(evals, ["s"]))


def test_plot_writes_pngs_and_skips_absent_metrics(tmp_path):
    run = _make_run(tmp_path / "run")
    paths = plot(run)
    assert [p.name for p in paths] == ["reward.png", "eval_accuracy.png", "response_length.png",
                                       "loss.png"]
    for path in paths:
        assert path.parent == run / "plots"
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000

    only_loss = tmp_path / "only_loss"
    with MetricsWriter(only_loss, tensorboard=False, progress=False, is_main=True) as w:
        w.write(0, "sft", 0, {"loss": 1.0})
        w.write(1, "sft", 1, {"loss": float("nan")})
    out = tmp_path / "elsewhere"
    assert plot(only_loss, out) == [out / "loss.png"]


def test_line_figure_draws_labelled_stage_boundaries(tmp_path):
    run = _make_run(tmp_path / "run")
    metrics = load_metrics(run)
    fig = line_figure({"loss": ([0, 10, 20], [1.0, 0.5, 0.25])}, stage_boundaries(metrics),
                      title="Loss", ylabel="loss")
    ax = fig.axes[0]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert [tuple(line.get_xdata()) for line in dashed] == [(0, 0), (10, 10)]
    assert [t.get_text().strip() for t in ax.texts] == ["perception", "textual"]
    solid = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
    assert [list(line.get_ydata()) for line in solid] == [[1.0, 0.5, 0.25]]
    assert line_figure({"loss": ([], [])}, [], title="t", ylabel="y") is None


def test_write_report(tmp_path):
    run = _make_run(tmp_path / "run")
    text = write_report(run, ["perception", "textual"])
    assert (run / "report.md").read_text() == text
    assert "| geo | counting | 4 | 25.0 | 50.0 | +25.0 | 80.0 | 70.0 | -10.0 |" in text
    assert "![reward](plots/reward.png)" in text and "![loss](plots/loss.png)" in text
    assert (run / "plots" / "eval_accuracy.png").exists()
    # inferred stage order is the order of first appearance
    assert write_report(run).index("Stage `perception`") < text.index("Stage `textual`")


def test_compare_runs(tmp_path):
    staged = _make_run(tmp_path / "staged", final_geo_acc=0.75)
    merged = tmp_path / "merged"
    with MetricsWriter(merged, tensorboard=False, progress=False, is_main=True) as w:
        w.write_eval(20, "mixed", "geo", _eval(0.5, 210.0, 8, "after"))
    rows = _rows(compare_runs({"staged": staged, "merged": merged}))
    assert rows[0] == ["run", "geo acc %", "geo len", "mathqa acc %", "mathqa len", "avg acc %",
                       "avg len"]
    # staged: geo 75% / 150 tok, mathqa 30% / 180 tok; averages (75+30)/2 = 52.5, (150+180)/2 = 165.
    assert rows[1] == ["staged", "75.0", "150.0", "30.0", "180.0", "52.5", "165.0"]
    assert rows[2] == ["merged", "50.0", "210.0", "—", "—", "—", "—"]
    with pytest.raises(ValueError, match="at least one run"):
        compare_runs({})

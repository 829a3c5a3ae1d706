"""The grid-world experiment end to end (slow: builds the demo's base, then
`scripts/reproduce_paper.py --quick`): the numbers' structure (every run's matrix, gains with
their paired SEs, comparisons with intervals, plots), and the base's controls (blank images at
chance; visual items given as text at the textual level)."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _reproduce_paper():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import reproduce_paper
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return reproduce_paper


def _summary(correct: str) -> dict:
    c = [int(ch) for ch in correct]
    return {"accuracy": sum(c) / len(c), "score": sum(c) / len(c), "length": 10.0, "length_correct": 10.0,
            "n": len(c), "correct": correct, "lengths": [10] * len(c), "index": list(range(len(c)))}


def test_analysis_of_hand_made_runs(tmp_path):
    """`reproduce_paper.analyse` on runs written by hand (4 items per set): the paired differences,
    the per-seed directions, each stage's gain and SE, the table and the plots."""
    rp = _reproduce_paper()
    P, T, V = (rp.EVAL_NAMES[c] for c in rp.CAPS)
    base = {P: _summary("1100"), T: _summary("0000"), V: _summary("0000")}

    def staged(seed, p, t, v):  # each stage's end: P, T, V sets
        ends = [{P: p, T: "0000", V: "0000"}, {P: "0000", T: t, V: "0000"}, {P: "0000", T: t, V: v}]
        return {"arm": "staged_paper", "seed": seed, "stages": list(rp.CAPS),
                "points": [{"after": c, "evals": {n: _summary(x) for n, x in e.items()}} for c, e in zip(rp.CAPS, ends)]}

    def merged(seed, v):
        return {"arm": "merged_paper", "seed": seed, "stages": ["merged"],
                "points": [{"after": "merged", "evals": {P: _summary("1000"), T: _summary("1000"), V: _summary(v)}}]}

    runs = [staged(0, "1110", "1111", "1100"), staged(1, "1111", "1100", "1000"), staged(2, "1101", "1110", "0000"),
            merged(0, "1000"), merged(1, "1000"), merged(2, "1000")]
    results = {"meta": {"command": "x", "seeds": 3, "machine": "m", "minutes": 1.0, "eval_items": [4, 4, 4]},
               "base": base, "runs": runs}
    a = rp.analyse(results)
    (row,) = a["comparisons"]
    assert (row["a"], row["b"], row["seeds"]) == ("staged_paper", "merged_paper", [0, 1, 2])
    visual = row["metrics"]["visual_reasoning"]  # staged V 2/4, 1/4, 0/4 against merged 1/4 each
    assert visual["diff"] == pytest.approx(0.0) and (visual["a_better"], visual["b_better"], visual["ties"]) == (1, 1, 1)
    textual = row["metrics"]["textual_reasoning"]  # 4/4, 2/4, 3/4 against 1/4
    assert textual["diff"] == pytest.approx(0.5) and textual["a_better"] == 3
    assert 0 <= textual["ci"][0] <= textual["diff"] <= textual["ci"][1] <= 1  # no resample makes staged worse
    average = row["metrics"]["average"]  # perception: staged ends at 0/4, merged at 1/4
    assert average["diff"] == pytest.approx((-0.25 + 0.5 + 0.0) / 3)
    gains = a["arms"]["staged_paper"]["gains"]
    assert [g["stage"] for g in gains[0]] == list(rp.CAPS)
    first = gains[0][0]  # perception 1100 -> 1110: +0.25, SE of (0, 0, 1, 0) = 0.5 / 2
    assert (first["gain"], first["se"], first["z"]) == pytest.approx((0.25, 0.25, 1.0))
    assert a["arms"]["merged_paper"]["gains"] == [[], [], []]  # the merged stage has no own capability
    assert a["arms"]["staged_paper"]["final"]["visual_reasoning"]["accuracy_mean"] == pytest.approx(0.25)
    results["analysis"] = a
    table = rp.markdown(results)
    assert "| staged vs merged | paper | staged_paper − merged_paper | +0.0 [" in table
    assert "| staged_paper | perception | +25.0 ± 25.0, +50.0 ± 28.9, +25.0 ± 25.0 | 1.0 |" in table
    assert [p.name for p in rp.plots(results, tmp_path)] == ["experiment_accuracy.png", "experiment_length.png"]
    # the committed plots are written only for the committed JSON (or where --plots says)
    assert rp.plots_dir("docs/results/experiment.json", None) == Path("docs/_static")
    assert rp.plots_dir(str(tmp_path / "pilot.json"), None) == tmp_path
    assert rp.plots_dir(str(tmp_path / "pilot.json"), "figs") == Path("figs")


def test_runs_are_reused_only_when_their_configuration_and_base_are_unchanged(tmp_path):
    """`run_key`: a longer GRPO perception stage changes the key of every arm whose perception is
    GRPO, not of the arms whose perception is SFT; another base changes every key. `reusable_runs`
    keeps an earlier JSON's runs by those keys, and none from another base."""
    rp = _reproduce_paper()
    from vlm_jax import experiment

    P, T, V = (rp.EVAL_NAMES[c] for c in rp.CAPS)
    base = {P: _summary("1100"), T: _summary("0000"), V: _summary("0000")}
    old, new = experiment.Budget(grpo_steps=(40, 40, 40)), experiment.Budget(grpo_steps=(60, 40, 40))
    changed = {arm for arm in rp.ARMS if rp.run_key(arm, 0, old, base) != rp.run_key(arm, 0, new, base)}
    assert changed == set(rp.ARMS) - {"caption_sft", "answer_sft", "merged_sft"}
    assert rp.run_key("staged", 0, new, base) != rp.run_key("staged", 1, new, base)
    # a config field added later, at a default that keeps the old behaviour, keeps the keys
    cfg = rp.arm_config("staged", 0, new, "", "")
    stage0 = cfg.stages[0]
    assert rp._set_fields(dataclasses.replace(cfg, stages=(dataclasses.replace(
        stage0, eval=dataclasses.replace(stage0.eval, refill_slots=0)), *cfg.stages[1:]))) == rp._set_fields(cfg)
    assert rp._set_fields(dataclasses.replace(cfg, stages=(dataclasses.replace(
        stage0, eval=dataclasses.replace(stage0.eval, refill_slots=4)), *cfg.stages[1:]))) != rp._set_fields(cfg)
    other = {**base, T: _summary("0001")}
    assert rp.run_key("caption_sft", 0, new, base) != rp.run_key("caption_sft", 0, new, other)
    runs = [{"arm": arm, "seed": 0, "points": []} for arm in ("staged", "caption_sft")]
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"meta": {"budget": dataclasses.asdict(old)}, "base": base, "runs": runs}))
    kept = rp.reusable_runs(earlier, base)
    assert kept[rp.run_key("caption_sft", 0, new, base)]["arm"] == "caption_sft"
    assert rp.run_key("staged", 0, new, base) not in kept
    assert rp.reusable_runs(earlier, other) == {}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("experiment")
    # as a user runs them: one CPU device (the device count the committed results were made on)
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu",
           "VLM_JAX_DATA_DIR": str(d / "data")}
    proc = subprocess.run([sys.executable, "-m", "vlm_jax.demo_setup", "--out", str(d / "base"),
                           "--workdir", str(d / "pretrain")], env=env, cwd=d, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return d, env


def test_pretraining_uses_every_device_and_is_unchanged_on_one():
    """The demo's pre-training mesh takes every device on the data axis: on one device the mesh the
    committed demo ran on (so the same numbers), on 8 the batch of 16 split 2 rows a device."""
    from vlm_jax import config as config_lib
    from vlm_jax.demo_setup import PRETRAIN_CONFIG

    cfg = config_lib.load_config(str(PRETRAIN_CONFIG))
    assert cfg.mesh.shape(1) == (1, 1, 1)
    assert cfg.mesh.shape(8) == (8, 1, 1) and cfg.stages[0].batch_size % 8 == 0


@pytest.mark.slow  # builds the grid data and compiles the pre-training: ~3 min on 2 cores
def test_demo_setup_on_several_devices(tmp_path):
    """`python -m vlm_jax.demo_setup` on 8 (fake CPU) devices pre-trains on all of them (two steps
    here) and exports the base."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "VLM_JAX_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run([sys.executable, "-m", "vlm_jax.demo_setup", "--out", str(tmp_path / "base"),
                           "--workdir", str(tmp_path / "pretrain"), "stages.0.steps=2", "compilation_cache_dir="],
                          env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (tmp_path / "base" / "config.json").exists()
    config = json.loads((tmp_path / "pretrain" / "config.json").read_text())
    assert config["mesh"]["data"] == -1


@pytest.mark.slow
def test_base_controls(built):
    """Blank images: visual answers at chance (the best constant guess is under 20%); the same
    visual items with the cells given as text: about the base's textual accuracy."""
    from vlm_jax.data.synthetic import grid
    from vlm_jax.evaluate import evaluate_source, load_for_eval

    d, _ = built
    model, params, processor = load_for_eval(d / "base")
    kw = dict(max_examples=0, batch_size=128, max_new_tokens=grid.MAX_NEW_TOKENS, length_buckets=grid.LENGTH_BUCKETS)
    visual = grid.generate("visual_reasoning", 256, split="validation")
    blank = grid.generate("visual_reasoning", 256, split="validation", blank=True)
    as_text = [grid.as_text_item(r) for r in visual]
    textual = grid.generate("textual_reasoning", 256, split="validation")
    acc = {name: evaluate_source(model, params, processor, rows, name=name, **kw)["accuracy"]
           for name, rows in (("blank", blank), ("as_text", as_text), ("textual", textual))}
    assert acc["blank"] <= 0.20 + 3 * 0.025, acc
    assert abs(acc["as_text"] - acc["textual"]) <= 3 * 0.044, acc


@pytest.mark.slow
def test_quick_experiment(built, tmp_path):
    """`--quick` (2 seeds, stages at 0.8 of their steps) of the demo's arm from a freshly built base:
    every stage improves its own capability in both seeds, the reasoning stages by more than 3
    paired SEs (perception by GRPO, 48 steps here, is only required to gain: docs/experiment.md
    has its pilots at 40 and 60), and the JSON,
    the table and the plots are written (the analysis itself: test_analysis_of_hand_made_runs)."""
    d, env = built
    out = tmp_path / "experiment.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/reproduce_paper.py"), "--quick", "--model",
                           str(d / "base"), "--workdir", str(tmp_path / "runs"), "--out", str(out),
                           "--plots", str(tmp_path / "plots"), "--arms", "staged"],
                          env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["meta"]["eval_items"] == [512, 512, 512] and "--quick --arms staged" in results["meta"]["command"]
    arm = results["analysis"]["arms"]["staged"]
    assert arm["seeds"] == [0, 1]
    for run in arm["gains"]:
        assert [g["stage"] for g in run] == ["perception", "textual_reasoning", "visual_reasoning"]
        assert all(g["gain"] > 0 for g in run) and all(g["z"] > 3 for g in run[1:]), run
    assert (tmp_path / "plots" / "experiment_accuracy.png").exists()
    assert "| staged | visual_reasoning |" in out.with_suffix(".md").read_text()

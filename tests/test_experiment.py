"""The grid-world experiment end to end (slow: builds the demo's base, then
`scripts/reproduce_paper.py --quick`): the numbers' structure (every run's matrix, gains with
their paired SEs, comparisons with intervals, plots), and the base's controls (blank images at
chance; visual items given as text at the textual level)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
    kw = dict(max_examples=0, batch_size=128, max_new_tokens=grid.MAX_NEW_TOKENS, length_buckets=(128,))
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
    d, env = built
    out = tmp_path / "experiment.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/reproduce_paper.py"), "--quick", "--model",
                           str(d / "base"), "--workdir", str(tmp_path / "runs"), "--out", str(out),
                           "--plots", str(tmp_path / "plots"), "--arms", "staged_paper,merged_paper,staged,caption_sft"],
                          env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert sorted({r["arm"] for r in results["runs"]}) == ["caption_sft", "merged_paper", "staged", "staged_paper"]
    assert results["meta"]["eval_items"] == [512, 512, 512]
    arms = results["analysis"]["arms"]
    for arm in ("staged_paper", "staged"):
        assert arms[arm]["seeds"] == [0, 1]
        for run in arms[arm]["gains"]:
            assert [g["stage"] for g in run] == ["perception", "textual_reasoning", "visual_reasoning"]
            for g in run:
                assert g["se"] >= 0 and (g["se"] == 0 or abs(g["z"] - g["gain"] / g["se"]) < 1e-9)
    # Not asserted: that each stage learns at --quick's half-length stages (not measured there); at
    # full length every stage's own gain is above 3 SE in the committed seeds (docs/experiment.md).
    comparisons = {c["question"]: c for c in results["analysis"]["comparisons"]}
    row = comparisons["staged vs merged"]["metrics"]["average"]
    assert row["ci"][0] <= row["diff"] <= row["ci"][1]
    assert row["a_better"] + row["b_better"] + row["ties"] == 2
    assert (tmp_path / "plots" / "experiment_accuracy.png").exists()
    assert "staged vs merged" in out.with_suffix(".md").read_text()

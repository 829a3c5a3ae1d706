"""End-to-end curriculum runs on the tiny model: stage swap, resume, non-finite guard, bad configs,
export round trip, evaluation CLI."""

import gc
import json
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from test_user_data import write_config_file
from vlm_jax import config as config_lib
from vlm_jax import curriculum, models, sft, startup, train
from vlm_jax.workdir import restore_for_export
from vlm_jax.checkpoint import Checkpointer
from vlm_jax.rl import policy, sampler

ROOT = Path(__file__).resolve().parents[1]


def make_assets(tmp_path_factory, family):
    from vlm_jax.data import build_synthetic
    from vlm_jax.models.tiny import build_tiny_model

    d = tmp_path_factory.mktemp(f"assets_{family}")
    build_synthetic(str(d / "data"), sizes={"train": 24, "validation": 4, "test": 4}, seed=0)
    build_tiny_model(d / "model", family=family, seed=0)
    return d


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory, "qwen2_5_vl")


def two_stage_config(assets, **over):
    """GRPO perception stage -> SFT textual stage, fixed shapes (one length bucket, one patch bucket)."""
    overrides = [
        f"model.path={assets / 'model'}",
        f"data.data_dir={assets / 'data'}",
        "data.length_buckets=(256,)",
        "data.max_prompt_len=256",
        "data.max_pixels_per_image=12544",
        "stages.0.steps=3",
        "stages.1.steps=3",
        "stages.0.batch_size=2",
        "stages.1.batch_size=2",
        "stages.0.grpo.num_samples=2",
        "stages.0.grpo.max_new_tokens=8",
        "stages.0.grpo.kl_coef=0.01",
        "stages.0.eval.datasets=()",
        "stages.1.eval.datasets=()",
        "checkpoint.every=1",
        "checkpoint.async_save=false",
        "logging.progress=false",
        "logging.tensorboard=false",
        "compilation_cache_dir=",
        *[f"{k}={v}" for k, v in over.items()],
    ]
    cfg = config_lib.load_config(str(ROOT / "configs/synthetic_cpu.py"), overrides)
    return cfg.__class__(**{**cfg.__dict__, "stages": cfg.stages[:2]})


def final_params(workdir):
    model, params, _ = restore_for_export(workdir)
    return model, params


def assert_bitwise(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def run_uninterrupted(assets, tmp_path_factory):
    wd = tmp_path_factory.mktemp("full")
    cfg = two_stage_config(assets)
    counts = {}
    before = (policy.grpo_step._cache_size(), sft.sft_step._cache_size())
    assert curriculum.run(cfg, wd) == "finished"
    counts["grpo"] = policy.grpo_step._cache_size() - before[0]
    counts["sft"] = sft.sft_step._cache_size() - before[1]
    return wd, cfg, counts


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    return run_uninterrupted(assets, tmp_path_factory)


# Qwen3-VL runs with -m slow (the suite's 10-minute budget); the Qwen2.5-VL run is the quick check.
@pytest.fixture(scope="module", params=["qwen2_5_vl", pytest.param("qwen3_vl", marks=pytest.mark.slow)])
def family_run(request, tmp_path_factory):
    """(family, assets, uninterrupted run) per model family; Qwen2.5-VL reuses the fixtures above."""
    if request.param == "qwen2_5_vl":
        return request.param, request.getfixturevalue("assets"), request.getfixturevalue("uninterrupted")
    assets = make_assets(tmp_path_factory, request.param)
    return request.param, assets, run_uninterrupted(assets, tmp_path_factory)


def test_two_stages_swap_step_functions_without_recompiling(uninterrupted):
    wd, cfg, counts = uninterrupted
    rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["stage"] for r in train_rows] == ["perception"] * 3 + ["textual_reasoning"] * 3
    assert [r["step"] for r in train_rows] == list(range(1, 7))
    assert all("reward/mean" in r and "clip_frac" in r for r in train_rows[:3])  # GRPO step ran
    assert all("target_tokens" in r and "reward/mean" not in r for r in train_rows[3:])  # SFT step
    # each step function compiled once for its stage, none again within the stage
    assert counts == {"grpo": 1, "sft": 1}
    assert all(r["skipped_nonfinite"] == 0 for r in train_rows)


def test_loaded_weights_are_not_kept_beside_the_trained_copy(assets, tmp_path, monkeypatch):
    """Once the first stage's state holds its copy of the weights, the loaded base arrays are freed
    (only their abstract form stays), so the chips hold one copy of the parameters, not two."""
    cfg = two_stage_config(assets, **{"stages.1.steps": 1})
    cfg = cfg.__class__(**{**cfg.__dict__, "stages": cfg.stages[1:]})  # one SFT step
    loaded, seen = [], []
    real_setup, real_step = curriculum.setup, curriculum.train_step

    def setup(*a, **k):
        env = real_setup(*a, **k)
        loaded.extend(weakref.ref(x) for x in jax.tree.leaves(env.base_params))
        return env

    def train_step(env, stage, state, ref, rng):
        gc.collect()
        seen.append((all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(env.base_params)),
                     sum(r() is not None for r in loaded)))
        return real_step(env, stage, state, ref, rng)

    monkeypatch.setattr(curriculum, "setup", setup)
    monkeypatch.setattr(curriculum, "train_step", train_step)
    assert curriculum.run(cfg, tmp_path / "wd") == "finished"
    assert len(loaded) > 10 and seen == [(True, 0)]


@pytest.mark.slow  # two GRPO runs
def test_shared_prompt_trains_the_same(assets, tmp_path):
    """`grpo.share_prompt` through the trainer (reference scoring and update): the same metrics and
    the same parameters as the [prompt + completion] rows, to fp32 round-off. SGD: AdamW divides by
    each element's gradient RMS, which turns the round-off of a near-zero gradient into a step of
    ~lr either way."""
    out = []
    for share in (False, True):
        cfg = two_stage_config(assets, **{"stages.0.steps": 2, "stages.0.grpo.share_prompt": share,
                                          "stages.0.optimizer.name": "sgd", "stages.0.optimizer.lr": 0.1})
        cfg = cfg.__class__(**{**cfg.__dict__, "stages": cfg.stages[:1]})
        assert cfg.stages[0].grpo.share_prompt is share
        wd = tmp_path / f"wd{share}"
        assert curriculum.run(cfg, wd) == "finished"
        rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        out.append((rows, final_params(wd)[1]))
    (rows0, p0), (rows1, p1) = out
    assert len(rows0) == len(rows1) == 2
    for r0, r1 in zip(rows0, rows1):
        for k in ("loss", "kl", "entropy", "grad_norm", "reward/mean"):
            np.testing.assert_allclose(r1[k], r0[k], rtol=1e-4, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5)


@pytest.mark.slow  # two GRPO runs: ~1 min on a quiet 2-core machine
def test_reference_offloaded_to_host_memory_trains_the_same(assets, tmp_path, monkeypatch):
    """`grpo.offload_reference`: the KL reference sits in host memory between its uses and the run
    is bitwise the one with the reference on the chips."""
    kinds = []
    real_step = curriculum.train_step

    def train_step(env, stage, state, ref, rng):
        kinds.append({x.sharding.memory_kind for x in jax.tree.leaves(ref)})
        return real_step(env, stage, state, ref, rng)

    monkeypatch.setattr(curriculum, "train_step", train_step)
    finals = []
    for offload in (False, True):
        cfg = two_stage_config(assets, **{"stages.0.steps": 1, "stages.0.grpo.offload_reference": offload})
        cfg = cfg.__class__(**{**cfg.__dict__, "stages": cfg.stages[:1]})
        assert curriculum.run(cfg, tmp_path / f"wd{offload}") == "finished"
        finals.append(final_params(tmp_path / f"wd{offload}")[1])
    assert kinds == [{"device"}, {"pinned_host"}]
    assert_bitwise(finals[0], finals[1])


@pytest.mark.slow  # a four-stage run (test_two_stages_swap_step_functions_without_recompiling is the quick check)
def test_nothing_compiles_after_a_stage_first_step_nor_when_a_stage_repeats_the_shapes(assets, tmp_path, monkeypatch):
    """GRPO -> SFT -> GRPO -> SFT, the last two with the first two's settings and shapes but fewer
    steps (a constant schedule does not depend on the stage length): XLA compiles (JAX's
    backend-compile events, persistent cache off) only during the first step of the first two
    stages; every later step, the swaps back included, reuses the compiled rollout, reference
    scoring and step functions (their jit caches do not grow either)."""
    import dataclasses

    from jax._src import dispatch

    base = two_stage_config(assets, **{"checkpoint.every": 100})  # 3 steps per stage, as `uninterrupted`
    s0, s1 = base.stages
    stages = (s0, s1, dataclasses.replace(s0, name="perception_again", steps=2),
              dataclasses.replace(s1, name="textual_again", steps=2))
    cfg = base.__class__(**{**base.__dict__, "stages": stages})
    fns = (sampler._generate, policy.score_responses, policy.grpo_step, sft.sft_step)
    compiles = [0]

    def on_event(event, duration, **kwargs):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            compiles[0] += 1

    steps = []
    real_step = curriculum.train_step

    def counted(env, stage, *args):
        before = compiles[0]
        out = real_step(env, stage, *args)
        steps.append((stage.cfg.name, compiles[0] - before, tuple(f._cache_size() for f in fns)))
        return out

    monkeypatch.setattr(curriculum, "train_step", counted)
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        assert curriculum.run(cfg, tmp_path) == "finished"
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert [name for name, _, _ in steps] == [s.name for s in stages for _ in range(s.steps)]
    # later steps of a stage, and every step of the repeated stages: no compile at all
    firsts = {0, s0.steps}
    later = [(name, n) for i, (name, n, _) in enumerate(steps) if i not in firsts]
    assert all(n == 0 for _, n in later), later
    # the jit caches of the rollout, scoring and both steps stop growing after stage 1's first step
    assert len({caches for _, _, caches in steps[s0.steps:]}) == 1, steps


def test_resume_mid_grpo_stage_is_bitwise(family_run, tmp_path):
    _, _, (full_wd, cfg, counts) = family_run
    assert counts == {"grpo": 1, "sft": 1}
    assert curriculum.run(cfg, tmp_path, stop_after=2) == "preempted"
    meta = Checkpointer(tmp_path / "checkpoints").restore_meta()
    assert (meta["stage_index"], meta["stage_step"], meta["global_step"]) == (0, 2, 2)
    assert curriculum.run(cfg, tmp_path) == "finished"
    assert_bitwise(final_params(full_wd)[1], final_params(tmp_path)[1])
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no duplicated log lines


def test_resume_at_stage_boundary_is_bitwise(assets, uninterrupted, tmp_path):
    full_wd, cfg, _ = uninterrupted
    assert curriculum.run(cfg, tmp_path, stop_after=3) == "preempted"
    meta = Checkpointer(tmp_path / "checkpoints").restore_meta()
    assert (meta["stage_index"], meta["stage_step"]) == (1, 0)
    assert curriculum.run(cfg, tmp_path) == "finished"
    assert_bitwise(final_params(full_wd)[1], final_params(tmp_path)[1])


@pytest.fixture(scope="module")
def preempted_at_2(assets, uninterrupted, tmp_path_factory):
    """A workdir stopped after step 2 of the GRPO stage, holding checkpoints of steps 1 and 2."""
    _, cfg, _ = uninterrupted
    wd = tmp_path_factory.mktemp("preempted")
    assert curriculum.run(cfg, wd, stop_after=2) == "preempted"
    assert Checkpointer(wd / "checkpoints").all_steps() == [1, 2]
    return wd


@pytest.mark.parametrize("damage", ["truncated_array_file", pytest.param("meta_removed", marks=pytest.mark.slow),
                                    pytest.param("half_written", marks=pytest.mark.slow)])
def test_damaged_latest_checkpoint_resumes_from_the_previous_step_bitwise(
        uninterrupted, preempted_at_2, tmp_path, damage, caplog):
    import shutil

    from test_checkpoint import DAMAGE

    full_wd, cfg, _ = uninterrupted
    wd = tmp_path / "wd"
    shutil.copytree(preempted_at_2, wd)
    DAMAGE[damage](wd / "checkpoints" / "2")
    restore_for_export(wd)  # export / evaluate skip the damaged step 2 and rename nothing
    assert Checkpointer(wd / "checkpoints").all_steps() == [1, 2]
    assert curriculum.run(cfg, wd) == "finished"
    assert "checkpoint step 2" in caplog.text and "resuming from step 1" in caplog.text
    assert (wd / "checkpoints" / "2.damaged").is_dir()  # set aside, not deleted
    assert_bitwise(final_params(full_wd)[1], final_params(wd)[1])
    rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines() if "loss" in l]
    assert [r["step"] for r in rows] == list(range(1, 7))  # step 2 redone once, logged once


def test_damaged_latest_checkpoint_in_a_bucket_resumes_from_the_previous_step_bitwise(
        gcs, uninterrupted, preempted_at_2, tmp_path, caplog, monkeypatch):
    """The same in a bucket workdir: the newest step (2) truncated, and a save killed mid-write
    (step 3 written in place without `commit_success.txt`, orbax's commit on GCS): the partial step
    is removed at start, step 2 is set aside as `2.damaged`, the run resumes from step 1 and ends
    bitwise equal to the uninterrupted run."""
    from test_checkpoint import DAMAGE

    from vlm_jax import paths

    full_wd, cfg, _ = uninterrupted
    monkeypatch.chdir(tmp_path)
    wd = f"{gcs}/damaged_run"
    paths.copy_tree(preempted_at_2, wd)
    ckpts = paths.resolve(wd) / "checkpoints"
    paths.copy_tree(preempted_at_2 / "checkpoints" / "2", ckpts / "3")
    (ckpts / "3" / "commit_success.txt").unlink()
    DAMAGE["truncated_array_file"](ckpts / "2")
    assert Checkpointer(ckpts).all_steps() == [1, 2]  # the uncommitted step 3 is never listed
    assert curriculum.run(cfg, wd) == "finished"
    assert "checkpoint step 2" in caplog.text and "resuming from step 1" in caplog.text
    names = {p.name for p in ckpts.iterdir()}
    assert "2.damaged" in names and "3" not in names, names
    assert_bitwise(final_params(full_wd)[1], final_params(wd)[1])
    rows = [json.loads(l) for l in (paths.resolve(wd) / "metrics.jsonl").read_text().splitlines() if "loss" in l]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert not (tmp_path / "gs:").exists()


def test_failing_checkpoint_write_stops_the_run_with_the_previous_checkpoint_intact(
        assets, uninterrupted, tmp_path, capsys, monkeypatch):
    """The save of step 2 hits a full disk: `train` exits 1 naming the step and the cause, step 1
    stays restorable, and rerunning resumes from it and ends bitwise equal."""
    from test_checkpoint import disk_full

    full_wd, cfg, _ = uninterrupted
    cfg_file = write_config_file(tmp_path / "cfg.py", cfg)
    wd = tmp_path / "wd"
    real_save = Checkpointer.save

    def save(self, step, *args, **kwargs):
        if self.directory.name == "checkpoints" and step == 2:
            with disk_full():
                return real_save(self, step, *args, **kwargs)
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", save)
    argv = ["--config", str(cfg_file), "--workdir", str(wd)]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert f"error: writing checkpoint step 2 to {wd / 'checkpoints'} failed" in err, err
    assert "File too large" in err and "the newest intact checkpoint is step 1" in err, err
    monkeypatch.setattr(Checkpointer, "save", real_save)
    with Checkpointer(wd / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [1] and ckpt.restore_meta()["global_step"] == 1
    assert train.main(argv) == 0
    assert_bitwise(final_params(full_wd)[1], final_params(wd)[1])


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero(family_run, tmp_path):
    """A real SIGTERM to `python -m vlm_jax.train` during the GRPO stage: exit 0 after saving at the
    next step boundary; rerunning the same command resumes and ends bitwise equal."""
    _, _, (full_wd, cfg, _) = family_run
    cfg_file = write_config_file(tmp_path / "cfg.py", cfg)
    wd = tmp_path / "wd"
    cmd = [sys.executable, "-m", "vlm_jax.train", "--config", str(cfg_file), "--workdir", str(wd)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = wd / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().strip():
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=240)[0].decode()
    assert proc.returncode == 0, out[-2000:]
    assert "run preempted" in out
    meta = Checkpointer(wd / "checkpoints").restore_meta()
    assert meta["global_step"] < 6
    rerun = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout.decode()[-2000:] + rerun.stderr.decode()[-2000:]
    assert_bitwise(final_params(full_wd)[1], final_params(wd)[1])


def test_nonfinite_loss_is_skipped_counted_and_never_checkpointed(assets, tmp_path, monkeypatch):
    cfg = two_stage_config(assets)
    cfg = cfg.__class__(**{**cfg.__dict__, "stages": cfg.stages[1:2]})  # the SFT stage alone
    real = sft.token_logprobs
    monkeypatch.setattr(sft, "token_logprobs", lambda *a, **k: tuple(
        None if x is None else x * np.nan for x in real(*a, **k)))
    sft.sft_step.clear_cache()
    try:
        assert curriculum.run(cfg, tmp_path) == "finished"
    finally:
        sft.sft_step.clear_cache()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_nonfinite"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(r["loss"] is None for r in rows if "loss" in r)  # NaN logged as null
    _, base = models.from_pretrained(assets / "model")
    _, saved = final_params(tmp_path)
    assert_bitwise(base, saved)  # no update reached the parameters or the checkpoint


@pytest.mark.parametrize(
    "override, message",
    [
        ("stages.0.learning_rate=1", "stages.0.learning_rate"),
        ("stages.0.objective=dpo", "stages.0.objective"),
        ("stages.1.datasets.0.name=no_such_dataset", "no_such_dataset"),
        ("stages.0.steps=0", "stages.0.steps"),
        ("stages.0.grpo.refill_slots=12", "stages.0.grpo.refill_slots: 12 decode slots do not split over"),
    ],
)
def test_bad_config_fails_before_compiling(assets, tmp_path, capsys, override, message):
    before = (policy.grpo_step._cache_size(), sft.sft_step._cache_size(), sampler._generate._cache_size())
    argv = [
        "--config",
        str(ROOT / "configs/synthetic_cpu.py"),
        f"--config.model.path={assets / 'model'}",
        f"--config.data.data_dir={assets / 'data'}",
        f"--config.{override}",
        "--workdir",
        str(tmp_path),
    ]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error:")
    assert before == (
        policy.grpo_step._cache_size(),
        sft.sft_step._cache_size(),
        sampler._generate._cache_size(),
    )


def test_export_round_trip_with_transformers(family_run, tmp_path):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration
    from vlm_jax import export
    from vlm_jax.data.processor import Processor

    family, _, (full_wd, _, _) = family_run
    hf_class = Qwen3VLForConditionalGeneration if family == "qwen3_vl" else Qwen2_5_VLForConditionalGeneration
    assert export.main(["--workdir", str(full_wd), "--out", str(tmp_path / "hf")]) == 0
    for f in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (tmp_path / "hf" / f).exists(), f
    AutoTokenizer.from_pretrained(tmp_path / "hf")
    model, params = final_params(full_wd)
    proc = Processor.from_pretrained(tmp_path / "hf")
    from PIL import Image

    img = Image.fromarray((np.arange(56 * 84 * 3) % 251).astype(np.uint8).reshape(56, 84, 3))
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red circles?"}]}]
    )
    batch = proc([text, "hello there"], [[img], []], padding_side="left")
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(models.forward(model, params, batch))
    ref = hf_class.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(
            **{
                k: torch.as_tensor(v).long() if v.dtype.kind == "i" else torch.as_tensor(v)
                for k, v in batch.items()
            }
        ).logits.numpy()
    m = batch["attention_mask"].astype(bool)
    assert np.abs(ours - theirs)[m].max() <= 1e-4


def test_evaluate_cli(family_run, tmp_path, capsys):
    from vlm_jax import evaluate

    _, assets, _ = family_run
    out = tmp_path / "eval.json"
    assert (
        evaluate.main(
            [
                "--model",
                str(assets / "model"),
                "--data",
                "synthetic_perception[test],synthetic_textual_reasoning[test]",
                "--data_dir",
                str(assets / "data"),
                "--out",
                str(out),
                "--max_new_tokens",
                "8",
                "--batch_size",
                "4",
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["overall"]["n"] == 8
    for name in ("synthetic_perception[test]", "synthetic_textual_reasoning[test]"):
        r = res["datasets"][name]
        assert r["n"] == 4 and 0.0 <= r["accuracy"] <= 1.0 and 1 <= r["mean_response_length"] <= 8
        assert sum(t["n"] for t in r["per_task"].values()) == 4
    assert (
        evaluate.main(
            [
                "--model",
                str(assets / "model"),
                "--data",
                "nope[test]",
                "--data_dir",
                str(assets / "data"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--coordinator_address=127.0.0.1:1234"], "go together"),
        (["--distributed=yes"], "only value is 'auto'"),
    ],
)
def test_distributed_flags_are_checked(tmp_path, capsys, flags, message):
    argv = ["--config", str(ROOT / "configs/synthetic_cpu.py"), "--workdir", str(tmp_path), *flags]
    assert train.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_recipe_smoke_variant_runs_the_scale_code_path(assets, tmp_path):
    """The 3B recipe's CPU smoke variant (remat, micro-batches, chunked scoring and sampling, fp32
    storage) trains its text-only GRPO stage through the trainer, sampling in a decoding layout
    (`grpo.rollout_tensor=2`, as the 7B recipe's 4, on the 8 fake devices)."""
    cfg = config_lib.load_config(str(ROOT / "configs/qwen2_5_vl_3b_tpu.py:smoke"), [
        f"model.path={assets / 'model'}", f"data.data_dir={assets / 'data'}", "compilation_cache_dir=",
        "stages.1.steps=2", "stages.1.grpo.rollout_tensor=2"])
    st = cfg.stages[1]
    assert (st.remat, st.micro_batch_size, st.grpo.score_chunk, st.grpo.rollout_chunk) == ("full", 2, 4, 2)
    cfg = cfg.__class__(**{**cfg.__dict__, "stages": (st,)})
    assert curriculum.run(cfg, tmp_path) == "finished"
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "loss" in l]
    assert [r["stage_step"] for r in rows] == [1, 2]
    assert all(r["update_ok"] == 1.0 and np.isfinite(r["loss"]) for r in rows)


def test_bucket_run_sigterm_resume_export(gcs, assets, uninterrupted, tmp_path, monkeypatch):
    """A workdir, model and prepared data in a bucket (storage server on loopback): SIGTERM during
    the GRPO stage checkpoints to the bucket, the rerun resumes from it and ends bitwise equal to the
    local uninterrupted run; metrics, TensorBoard, report and plots land in the bucket; export
    writes there and loads back from the bucket; nothing appears under a local gs:."""
    from vlm_jax import export, paths

    full_wd, _, _ = uninterrupted
    monkeypatch.chdir(tmp_path)
    root = f"{gcs}/curriculum"
    paths.copy_tree(assets / "model", f"{root}/model")
    paths.copy_tree(assets / "data", f"{root}/data")
    cfg = two_stage_config(assets, **{"model.path": f"{root}/model", "data.data_dir": f"{root}/data",
                                      "logging.tensorboard": "true"})
    real_step, calls = curriculum.train_step, []

    def step(*args, **kwargs):  # a real SIGTERM to this process after the second step
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    wd = f"{root}/run"
    monkeypatch.setattr(curriculum, "train_step", step)
    assert curriculum.run(cfg, wd) == "preempted"
    monkeypatch.setattr(curriculum, "train_step", real_step)
    meta = Checkpointer(f"{wd}/checkpoints").restore_meta()
    assert (meta["stage_index"], meta["stage_step"], meta["global_step"]) == (0, 2, 2)
    assert curriculum.run(cfg, wd) == "finished"
    assert_bitwise(final_params(full_wd)[1], final_params(wd)[1])
    bucket_wd = paths.resolve(wd)
    steps = [json.loads(l)["step"] for l in (bucket_wd / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) and steps[-1] == 6
    assert (bucket_wd / "report.md").read_text().startswith("# Run report")
    assert [p.name for p in (bucket_wd / "plots").iterdir()] and list((bucket_wd / "tensorboard").iterdir())

    assert export.main(["--workdir", wd, "--out", f"{root}/hf"]) == 0
    model, params = models.from_pretrained(f"{root}/hf")
    assert_bitwise(final_params(full_wd)[1], params)
    assert not (tmp_path / "gs:").exists() and not (ROOT / "gs:").exists()


@pytest.mark.slow  # the sampler's compile; the bucket paths are those of the run above
def test_evaluate_model_and_data_in_a_bucket_to_a_bucket(gcs, assets, tmp_path, monkeypatch):
    from vlm_jax import evaluate, paths

    monkeypatch.chdir(tmp_path)
    root = f"{gcs}/evaluate"
    paths.copy_tree(assets / "model", f"{root}/model")
    paths.copy_tree(assets / "data", f"{root}/data")
    out = f"{root}/eval/perception.json"
    assert evaluate.main(["--model", f"{root}/model", "--data", "synthetic_perception[test]", "--data_dir",
                          f"{root}/data", "--out", out, "--max_new_tokens", "4", "--batch_size", "4"]) == 0
    assert json.loads(paths.resolve(out).read_text())["overall"]["n"] == 4
    assert not (tmp_path / "gs:").exists()


def test_unwritable_bucket_workdir_fails_before_compiling(gcs, assets, tmp_path, capsys, monkeypatch):
    cfg_file = write_config_file(tmp_path / "cfg.py", two_stage_config(assets))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(curriculum, "setup", lambda *a: pytest.fail("set-up ran for an unwritable workdir"))
    assert train.main(["--config", str(cfg_file), "--workdir", "gs://no-such-bucket/runs/demo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gs://no-such-bucket/runs/demo" in err[0] and "no such bucket" in err[0], err
    assert not (tmp_path / "gs:").exists()


def test_unwritable_bucket_compilation_cache_fails_before_compiling(gcs, assets, tmp_path, capsys, monkeypatch):
    """`compilation_cache_dir=gs://...` that cannot be written is one line naming the key and the
    cause before set-up (JAX itself would only warn at every compile and carry on uncached)."""
    cfg = two_stage_config(assets, compilation_cache_dir="gs://no-such-bucket/jax_cache")
    cfg_file = write_config_file(tmp_path / "cfg.py", cfg)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(curriculum, "setup", lambda *a: pytest.fail("set-up ran for an unwritable cache"))
    assert train.main(["--config", str(cfg_file), "--workdir", f"{gcs}/cache_check/run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: compilation_cache_dir: gs://no-such-bucket/jax_cache"), err
    assert "no such bucket" in err[0], err


def test_model_path_may_be_a_hub_id_read_from_the_cache(assets, tmp_path, monkeypatch):
    """`model.path=ORG/NAME[@REVISION]` resolves through huggingface_hub's cache (offline here: the
    test fills the cache with the tiny model)."""
    import shutil

    from huggingface_hub import constants
    from vlm_jax import paths
    from vlm_jax.data.processor import Processor

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-vl"
    shutil.copytree(assets / "model", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    paths._hub_snapshot.cache_clear()
    try:
        for name in ("tiny-org/tiny-vl", f"tiny-org/tiny-vl@{commit}"):
            startup.check_model_dir(name)
            assert_bitwise(models.from_pretrained(name)[1], models.from_pretrained(assets / "model")[1])
        assert Processor.from_pretrained("tiny-org/tiny-vl").image_token_id > 0
        with pytest.raises(config_lib.ConfigError, match="does not exist, and as a Hugging Face hub id"):
            startup.check_model_dir("tiny-org/no-such-model")
    finally:
        paths._hub_snapshot.cache_clear()

"""Issue 10: a researcher's first hour on their own (EasyR1-style) data. One test (or a few) per
numbered failure of the issue: SFT without its target, endless data waits, one data directory,
silently dropped rows, wrong-signature rewards, checks that came too late, getting in, small items."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlm_jax import config as config_lib
from vlm_jax import curriculum, evaluate, sft, startup, train
from vlm_jax.checkpoint import Checkpointer
from vlm_jax.data import pipeline as pl
from vlm_jax.data import rows as row_lib
from vlm_jax.data import prepare as prep
from vlm_jax.rl import policy, rewards, sampler

ROOT = Path(__file__).resolve().parents[1]
N_IMAGE_ROWS, N_TEXT_ROWS = 6, 2


def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), color).save(buf, "PNG")
    return buf.getvalue()


def write_hf_parquet(folder: Path, n_image: int = N_IMAGE_ROWS, n_text: int = N_TEXT_ROWS,
                     missing: int = 0) -> Path:
    """`folder/train.parquet` as Hugging Face `datasets` writes images opened from files: a list of
    `{"bytes": None, "path": ...}` structs, the path relative to the folder the dataset was made
    from (`folder`'s parent), i.e. `<folder name>/images/k.png`. `missing` extra rows name absent files."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    problems, answers, images = [], [], []
    colors = ["red", "blue", "green"]
    for k in range(n_image + missing):
        if k < n_image:
            (folder / "images" / f"{k}.png").write_bytes(_png(colors[k % 3]))
        problems.append("<image>What color is the shape?")
        answers.append(colors[k % 3])
        images.append([{"bytes": None, "path": f"{folder.name}/images/{k}.png"}])
    for k in range(n_text):
        problems.append(f"What is {k} + 2?")
        answers.append(str(k + 2))
        images.append([])
    image_type = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"problem": pa.array(problems), "answer": pa.array(answers),
                      "images": pa.array(images, type=image_type)})
    path = folder / "train.parquet"
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from vlm_jax.models.tiny import build_tiny_model

    d = tmp_path_factory.mktemp("userdata")
    build_tiny_model(d / "model", seed=0)
    parquet = write_hf_parquet(d / "mydata")
    # a JSONL in the same layout, text only, easy_to_hard by difficulty: 2 rows over any prompt limit,
    # and a last line that is not JSON (dropped on reading, reported)
    rows = [{"problem": "x " * 400 + "?", "answer": "1", "difficulty": 0} for _ in range(2)]
    rows += [{"problem": f"What is {k} + 1?", "answer": str(k + 1), "difficulty": 1} for k in range(6)]
    jsonl = d / "text.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{a broken line\n")
    (d / "rewards.py").write_text(
        "def compute_score(predict, ground_truth):\n"
        "    return {'overall': float(ground_truth in predict), 'format': 1.0}\n"
        "def flaky(responses, answers, **fields):\n"
        "    if responses[0].startswith('<think>check</think>'):\n"
        "        return [0.0] * len(responses)\n"
        "    raise RuntimeError('flaky reward broke')\n"
    )
    return {"dir": d, "model": d / "model", "parquet": parquet, "jsonl": jsonl, "rewards": d / "rewards.py"}


def stage(name, objective, dataset, steps=1, **extra):
    st = {"name": name, "capability": "perception" if objective == "grpo" else "textual_reasoning",
          "objective": objective, "datasets": [{"name": str(dataset)}], "steps": steps, "batch_size": 2,
          "optimizer": {"lr": 1e-3}}
    if objective == "grpo":
        st["grpo"] = {"num_samples": 2, "max_new_tokens": 4, "kl_coef": 0.0}
    for key, value in extra.items():
        st[key] = value
    return st


def make_config(assets, stages, **data):
    return config_lib.config_from_dict({
        "model": {"path": str(assets["model"])},
        # preflight off: these tests drive runs into bad rows on purpose, which the start-up data
        # check (tests/test_data_check.py) would refuse first
        "data": {"length_buckets": [256], "max_prompt_len": 256, "max_pixels_per_image": 12544,
                 "min_pixels_per_image": 3136, "preflight_rows": 0, **data},
        "stages": stages,
        "checkpoint": {"every": 1, "async_save": False},
        "logging": {"progress": False, "tensorboard": False},
        "compilation_cache_dir": "",
    })


def write_config_file(path: Path, cfg) -> Path:
    path.write_text("from vlm_jax.config import config_from_dict\n"
                    f"def get_config():\n    return config_from_dict({config_lib.config_to_dict(cfg)!r})\n")
    return path


def jit_cache_sizes():
    return (policy.grpo_step._cache_size(), sft.sft_step._cache_size(), sampler._generate._cache_size())


def run_cli(cfg_or_file, workdir, capsys, *extra):
    path = cfg_or_file if isinstance(cfg_or_file, Path) else write_config_file(
        Path(workdir).parent / f"{Path(workdir).name}_cfg.py", cfg_or_file)
    rc = train.main(["--config", str(path), "--workdir", str(workdir), *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------------------------------------------
# 1. an SFT stage without its target field / with every row unusable: fail fast, never hang
# ------------------------------------------------------------------------------------------------


def test_sft_stage_without_target_fails_before_anything_runs_naming_the_field(assets, tmp_path, capsys):
    """EasyR1-style data has no `solution` (the default sft.target): stage 2's problem is found
    before stage 1 runs, naming the field, the columns that exist and the fix."""
    cfg = make_config(assets, [stage("see", "grpo", assets["parquet"]),
                               stage("think", "sft", assets["parquet"])])
    before = jit_cache_sizes()
    rc, _, err = run_cli(cfg, tmp_path / "wd", capsys)
    assert rc == 2
    assert err.startswith("error: stages.1.sft.target:")
    assert "'solution'" in err and "answer, problem" in err and "--config.stages.1.sft.target=answer" in err
    assert jit_cache_sizes() == before
    assert not (tmp_path / "wd" / "metrics.jsonl").exists()


def _next_in_thread(it, timeout):
    box = {}

    def target():
        try:
            box["batch"] = next(it)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    start = time.time()
    t.start()
    t.join(timeout)
    return box, time.time() - start, t.is_alive()


def test_iterator_with_every_row_skipped_raises_with_counts(assets):
    from vlm_jax.data.processor import Processor

    processor = Processor.from_pretrained(assets["model"])
    source = prep.load(str(assets["jsonl"]))  # 8 rows, 2 over any prompt limit
    it = pl.make_dataset([(source, 1.0)], processor, batch_size=2, shard_index=0, shard_count=1,
                         length_buckets=(256,), max_prompt_len=8)  # every prompt is over 8 tokens
    box, seconds, hung = _next_in_thread(it, timeout=30)
    assert not hung, "the iterator waited forever on data that has no usable row"
    err = box["error"]
    assert isinstance(err, pl.NoUsableRowsError)
    skipped = it.stats["skipped"][row_lib.PROMPT_TOO_LONG]
    assert skipped >= len(source) and sum(it.stats["skipped"].values()) == skipped
    assert f"prompt_too_long {skipped}" in str(err) and "data.max_prompt_len" in str(err)
    assert it.stats["rows"] == 0 and seconds < 30


def test_stage_with_every_row_over_max_prompt_len_fails_at_start_up(assets, tmp_path, capsys):
    cfg = make_config(assets, [stage("think", "sft", assets["jsonl"], sft={"target": "answer"})],
                      max_prompt_len=8)
    before = jit_cache_sizes()
    start = time.time()
    rc, _, err = run_cli(cfg, tmp_path / "wd", capsys)
    assert rc == 2 and time.time() - start < 60
    assert err.startswith("error: stages.0.datasets: stage 'think'") and "prompt_too_long" in err
    assert jit_cache_sizes() == before


def test_strict_bad_row_mid_run_is_one_line_naming_the_row(assets, tmp_path, capsys):
    rows = [{"problem": f"What is {k} + 1?", "answer": str(k + 1), "difficulty": 0} for k in range(6)]
    rows.append({"problem": "x " * 400, "answer": "1", "difficulty": 1})  # reached at step 4
    data = tmp_path / "strict.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_config(assets, [stage("think", "sft", data, steps=5, order="easy_to_hard",
                                     sft={"target": "answer"})], max_prompt_len=128, strict=True)
    rc, _, err = run_cli(cfg, tmp_path / "wd", capsys)
    assert rc == 2
    assert err == f"error: stages.0.datasets: stage 'think': {data}: row 6: prompt_too_long (" + \
        err.split(": prompt_too_long (", 1)[1]
    assert err.count("\n") == 1 and "Traceback" not in err
    steps = [json.loads(line)["step"] for line in (tmp_path / "wd" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


# ------------------------------------------------------------------------------------------------
# 1. SIGTERM while the loader waits for rows: the run stops within seconds (exit 0, checkpointed)
# ------------------------------------------------------------------------------------------------

STALL_SCRIPT = r"""
import sys, time
from pathlib import Path
from vlm_jax import startup, train

trigger = Path(sys.argv[1])
real_open = startup.open_sources

class Stalling:
    # the real rows until `trigger` exists, then every read stalls (a hung network mount)
    def __init__(self, source):
        self.source, self.name = source, getattr(source, "name", "stalling")
    def __len__(self):
        return len(self.source)
    def __getitem__(self, i):
        while trigger.exists():
            time.sleep(0.05)
        return self.source[i]

startup.open_sources = lambda cfg: {k: Stalling(v) for k, v in real_open(cfg).items()}
train.main = (lambda main: lambda: main(sys.argv[2:]))(train.main)
getattr(train, "cli", lambda: sys.exit(train.main()))()
"""


@pytest.mark.slow
def test_sigterm_during_a_data_wait_exits_within_10_seconds(assets, tmp_path):
    cfg = make_config(assets, [stage("think", "sft", assets["jsonl"], steps=1000, sft={"target": "answer"})])
    cfg_file = write_config_file(tmp_path / "cfg.py", cfg)
    trigger, wd = tmp_path / "stall", tmp_path / "wd"
    cmd = [sys.executable, "-c", STALL_SCRIPT, str(trigger), "--config", str(cfg_file), "--workdir", str(wd)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (wd / "checkpoints" / "1").is_dir():  # step 1 trained and its checkpoint committed
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        trigger.write_text("stall")  # from now on every row read hangs
        time.sleep(3)  # the prefetched rows are used up; the loader is waiting
        proc.send_signal(15)
        start = time.time()
        try:
            out = proc.communicate(timeout=10)[0].decode()
        except subprocess.TimeoutExpired:
            pytest.fail("the run did not stop within 10 s of SIGTERM during a data wait")
        assert time.time() - start < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    assert "run preempted" in out
    meta = Checkpointer(wd / "checkpoints").restore_meta()
    steps = [json.loads(line)["step"] for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert meta["global_step"] == max(steps) and meta["stage_step"] == max(steps)


# ------------------------------------------------------------------------------------------------
# 2. one data directory: prepare -> train -> evaluate without data-dir flags, from any folder
# ------------------------------------------------------------------------------------------------


def test_prepare_train_evaluate_share_one_data_dir_from_another_folder(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLM_JAX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VLM_JAX_DATA_DIR", raising=False)
    elsewhere = tmp_path / "somewhere_else"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert prep.main(["--input", str(assets["parquet"]), "--name", "mydata"]) == 0
    out = capsys.readouterr().out
    assert f"data dir: {tmp_path / 'home' / 'data'}" in out
    assert (tmp_path / "home" / "data" / "mydata").is_dir()
    cfg = make_config(assets, [stage("see", "grpo", "mydata")])  # no data_dir anywhere
    assert cfg.data.data_dir == ""
    sources = startup.open_sources(cfg)
    assert len(sources[("mydata", "train")]) == N_IMAGE_ROWS + N_TEXT_ROWS
    # evaluate: `--data mydata` takes its only split; with two splits it says which exist
    res = tmp_path / "eval.json"
    assert evaluate.main(["--model", str(assets["model"]), "--data", "mydata", "--out", str(res),
                          "--max_new_tokens", "2", "--batch_size", "8"]) == 0
    assert json.loads(res.read_text())["datasets"]["mydata[train]"]["n"] == N_IMAGE_ROWS + N_TEXT_ROWS
    assert prep.main(["--input", str(assets["parquet"]), "--name", "mydata", "--split", "test"]) == 0
    capsys.readouterr()
    assert evaluate.main(["--model", str(assets["model"]), "--data", "mydata", "--out", str(res)]) == 2
    assert "has the splits ['test', 'train']; name one" in capsys.readouterr().err


def test_relative_defaults_do_not_depend_on_the_current_folder(tmp_path, monkeypatch):
    from vlm_jax import paths

    monkeypatch.setenv("VLM_JAX_HOME", str(tmp_path / "h"))
    monkeypatch.delenv("VLM_JAX_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    a = (paths.data_dir(""), paths.cache_dir(config_lib.Config.__dataclass_fields__[
        "compilation_cache_dir"].default))
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert (paths.data_dir(""), paths.cache_dir("default")) == a == (tmp_path / "h" / "data",
                                                                      tmp_path / "h" / "jax_cache")
    monkeypatch.setenv("VLM_JAX_DATA_DIR", str(tmp_path / "mine"))
    assert paths.data_dir(None) == tmp_path / "mine" and paths.data_dir("x") == tmp_path / "sub" / "x"


def test_processes_sharing_a_workdir_check_it_without_racing(tmp_path):
    """The processes of a multi-host run check one shared workdir at the same moment: one's probe
    file must never be removed by another (CI saw `workdir ... not writable (No such file or
    directory)` from a fixed probe name)."""
    import threading

    from vlm_jax import startup

    errors, start = [], threading.Barrier(8)

    def check():
        start.wait()
        for _ in range(200):
            try:
                startup.check_workdir(tmp_path / "wd")
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

    threads = [threading.Thread(target=check) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and list((tmp_path / "wd").iterdir()) == []

# ------------------------------------------------------------------------------------------------
# 3. rows dropped silently: datasets-written parquet paths, evaluate's denominator
# ------------------------------------------------------------------------------------------------


def test_datasets_parquet_with_relative_image_paths_keeps_its_rows(tmp_path):
    parquet = write_hf_parquet(tmp_path / "ds", missing=1)
    report = prep.prepare(parquet, "ds", data_dir=tmp_path / "data")
    assert report.written == N_IMAGE_ROWS + N_TEXT_ROWS
    assert report.skipped == {"unreadable_image": [N_IMAGE_ROWS]}  # the one row whose file is absent
    summary = report.summary()
    assert f"ds/images/{N_IMAGE_ROWS}.png" in summary and "tried" in summary
    assert str(tmp_path / "ds" / "ds" / "images" / f"{N_IMAGE_ROWS}.png") in summary  # path(s) tried
    src = prep.load("ds", split="train", data_dir=tmp_path / "data")
    assert sum(len(src[i]["images"]) for i in range(len(src))) == N_IMAGE_ROWS
    # --image_dir, when given, is the only place looked in
    with pytest.raises(prep.BadRowError, match="tried .*elsewhere"):
        prep.prepare(parquet, "ds", data_dir=tmp_path / "data", image_dir=tmp_path / "elsewhere", strict=True)


def test_evaluate_reports_skipped_rows_and_its_denominator(assets, tmp_path, capsys):
    lines = [json.dumps({"problem": f"What is {k} + 1?", "answer": str(k + 1), "task": "add"}) for k in range(37)]
    for k in (3, 10, 20, 30):
        lines.insert(k, "{not json")
    data = tmp_path / "bench.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval.json"
    assert evaluate.main(["--model", str(assets["model"]), "--data", str(data), "--out", str(out),
                          "--max_new_tokens", "2", "--batch_size", "16"]) == 0
    console = capsys.readouterr().out
    r = json.loads(out.read_text())["datasets"][str(data)]
    assert (r["n"], r["rows"], r["skipped"]) == (37, 41, {"invalid_json": 4})
    assert "n=37 of the data's 41 rows" in r["note"]
    assert "(n=37 of 41 rows)" in console and "warning:" in console


# ------------------------------------------------------------------------------------------------
# 4. user rewards: signature checked at start-up, EasyR1 adapter, errors counted, readable keys
# ------------------------------------------------------------------------------------------------


def test_wrong_signature_reward_stops_the_run_before_step_1(assets, tmp_path, capsys):
    spec = f"{assets['rewards']}:compute_score"  # per-sample (predict, ground_truth): wrong signature
    cfg = make_config(assets, [stage("see", "grpo", assets["parquet"], reward=[[spec, 1.0]])])
    before = jit_cache_sizes()
    rc, _, err = run_cli(cfg, tmp_path / "wd", capsys)
    assert rc == 2 and err.startswith("error: stages.0.reward.0.0:")
    assert "TypeError: compute_score() got an unexpected keyword argument" in err and f"'easyr1:{spec}'" in err
    assert err.count("Traceback (most recent call last)") == 1
    assert jit_cache_sizes() == before and not (tmp_path / "wd" / "metrics.jsonl").exists()


def test_easyr1_adapter_and_readable_reward_names(assets):
    fn = rewards.get(f"easyr1:{assets['rewards']}:compute_score")
    np.testing.assert_array_equal(fn(["it is red", "blue?"], ["red", "green"]), [1.0, 0.0])
    combined = rewards.build_reward([(f"easyr1:{assets['rewards']}:compute_score", 1.0), ("format", 0.1)])
    assert combined.metric_names == {f"easyr1:{assets['rewards']}:compute_score": "compute_score",
                                     "format": "format"}
    rewards.check_reward(f"easyr1:{assets['rewards']}:compute_score", {"answer": "red"})  # passes


def test_run_counts_reward_errors_and_skipped_rows_in_metrics_and_summary(assets, tmp_path, capsys):
    """GRPO with a reward that fails on every sample, then SFT; 2 of the file's rows are too long.
    Also: a resume prints where it resumed from."""
    rewards.reset_reward_errors()
    flaky = f"{assets['rewards']}:flaky"
    cfg = make_config(assets, [
        stage("see", "grpo", assets["jsonl"], steps=2, order="easy_to_hard", reward=[[flaky, 1.0]]),
        stage("think", "sft", assets["jsonl"], steps=1, order="easy_to_hard", sft={"target": "answer"}),
    ], max_prompt_len=128)
    wd = tmp_path / "wd"
    assert curriculum.run(cfg, wd, stop_after=1) == "preempted"
    assert curriculum.run(cfg, wd) == "finished"
    out = capsys.readouterr().out
    assert "resumed from step 1: stage 0 (see), stage step 1" in out
    assert f"warning: {assets['jsonl']}: kept 8 rows, skipped 1\n  skipped 1 x invalid_json (rows 8)" in out
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    grpo = [r for r in rows if r["stage"] == "see"]
    assert [r["reward/errors"] for r in grpo] == [2 * 2, 2 * 2]  # batch 2 x 2 samples, every one failed
    assert all("reward/flaky" in r and not any(k.startswith("reward//") for k in r) for r in grpo)
    # easy_to_hard: the 2 too-long rows come first in each stage, so each stage skipped exactly 2
    assert all(r["data/skipped/prompt_too_long"] == 2 and r["data/skipped"] == 2 for r in rows if "loss" in r)
    assert "stage see: 2/2 steps; data rows used 4, skipped 2 (prompt_too_long 2)" in out
    assert "stage think: 1/1 steps; data rows used 2, skipped 2 (prompt_too_long 2)" in out


# ------------------------------------------------------------------------------------------------
# 5. checks that came too late; clean shutdown on an error
# ------------------------------------------------------------------------------------------------


def test_unknown_reward_of_a_later_sft_stage_fails_at_start_up(assets, tmp_path, capsys):
    cfg = make_config(assets, [stage("see", "grpo", assets["parquet"]),
                               stage("think", "sft", assets["parquet"], sft={"target": "answer"},
                                     reward=[["no_such_reward", 1.0]])])
    rc, _, err = run_cli(cfg, tmp_path / "wd", capsys)
    assert rc == 2 and err.startswith("error: stages.1.reward:") and "no_such_reward" in err
    assert not (tmp_path / "wd" / "metrics.jsonl").exists()


def test_model_without_tokenizer_and_unwritable_places_fail_at_start_up(assets, tmp_path, capsys):
    bare = tmp_path / "bare_model"
    shutil.copytree(assets["model"], bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    cfg = make_config(assets, [stage("see", "grpo", assets["parquet"])])
    cfg_bare = config_lib.config_from_dict({**config_lib.config_to_dict(cfg), "model": {"path": str(bare)}})
    rc, _, err = run_cli(cfg_bare, tmp_path / "wd", capsys)
    assert rc == 2 and err.startswith("error: model.path:") and "tokenizer.json or tokenizer_config.json" in err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    rc, _, err = run_cli(write_config_file(tmp_path / "c.py", cfg), blocker / "wd", capsys)  # under a file
    assert rc == 2 and err.startswith("error: workdir:") and "not writable" in err
    start = time.time()
    rc = evaluate.main(["--model", str(assets["model"]), "--data", str(assets["jsonl"]),
                        "--out", str(blocker / "eval.json")])
    assert rc == 2 and "cannot be written" in capsys.readouterr().err
    assert time.time() - start < 5  # before loading the model or evaluating anything


def test_error_mid_run_shuts_down_cleanly(assets, tmp_path, capsys, monkeypatch):
    cfg = make_config(assets, [stage("think", "sft", assets["jsonl"], steps=4, sft={"target": "answer"})])
    cfg = config_lib.config_from_dict({**config_lib.config_to_dict(cfg),
                                       "checkpoint": {"every": 1, "async_save": True}})
    real, calls = curriculum.train_step, []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in step 3")
        return real(*args, **kwargs)

    monkeypatch.setattr(curriculum, "train_step", failing_step)
    wd = tmp_path / "wd"
    rc, _, err = run_cli(cfg, wd, capsys)
    assert rc == 1
    assert err.startswith("error: RuntimeError: boom in step 3\n")
    assert err.count("Traceback (most recent call last)") == 1
    assert "Event loop is closed" not in err and "cannot schedule new futures" not in err
    assert not list((wd / "checkpoints").glob("*tmp*"))
    ckpt = Checkpointer(wd / "checkpoints")
    assert ckpt.latest_step() == 2 and ckpt.restore_meta()["stage_step"] == 2
    ckpt.close()


FAIL_SCRIPT = r"""
import sys
from vlm_jax import curriculum, train
real, calls = curriculum.train_step, []
def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        raise RuntimeError("boom in step 3")
    return real(*args, **kwargs)
curriculum.train_step = failing
train.main = (lambda main: lambda: main(sys.argv[1:]))(train.main)
getattr(train, "cli", lambda: sys.exit(train.main()))()
"""


@pytest.mark.slow
def test_error_mid_run_in_a_real_process_exits_without_cascades(assets, tmp_path):
    """The same error in `python -m vlm_jax.train`'s process: what the interpreter prints on its way
    out (async checkpoint threads, event loops, reader threads) is checked too."""
    cfg = make_config(assets, [stage("think", "sft", assets["jsonl"], steps=5, sft={"target": "answer"})])
    cfg = config_lib.config_from_dict({**config_lib.config_to_dict(cfg),
                                       "checkpoint": {"every": 1, "async_save": True}})
    wd = tmp_path / "wd"
    cmd = [sys.executable, "-c", FAIL_SCRIPT, "--config", str(write_config_file(tmp_path / "c.py", cfg)),
           "--workdir", str(wd)]
    r = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: RuntimeError: boom in step 3"]
    assert r.stderr.count("Traceback (most recent call last)") == 1, r.stderr[-3000:]
    for cascade in ("Event loop is closed", "cannot schedule new futures", "Exception ignored"):
        assert cascade not in r.stderr, r.stderr[-3000:]
    assert not list((wd / "checkpoints").glob("*tmp*"))
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir()) == [1, 2]


# ------------------------------------------------------------------------------------------------
# 6. getting in: the package, its commands, an environment script that leaves the shell alone
# ------------------------------------------------------------------------------------------------


def test_package_declares_dependencies_and_console_commands():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["build-system"]["build-backend"] == "setuptools.build_meta"
    assert meta["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    import importlib

    scripts = meta["project"]["scripts"]
    assert {"vlm-jax-train", "vlm-jax-evaluate", "vlm-jax-export", "vlm-jax-prepare", "vlm-jax-filter"} <= set(scripts)
    for target in scripts.values():
        module, fn = target.split(":")
        assert callable(getattr(importlib.import_module(module), fn)), target


def test_sourcing_env_sh_keeps_the_callers_shell_options():
    venv = Path(sys.prefix)
    if not list(venv.glob(".installed-*")):
        pytest.skip("not a venv made by scripts/env.sh")
    script = (f'set +euo pipefail; source "{ROOT}/scripts/env.sh" test; rc=$?; echo "rc=$rc opts=$-"; '
              'shopt -qo pipefail && echo pipefail-on; false; echo still-here')
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "VLM_JAX_VENV": str(venv)})
    assert "rc=0" in r.stdout and "still-here" in r.stdout and "pipefail-on" not in r.stdout, r.stderr
    opts = r.stdout.split("opts=")[1].split()[0]
    assert "e" not in opts and "u" not in opts


# ------------------------------------------------------------------------------------------------
# 7. small items
# ------------------------------------------------------------------------------------------------


def test_report_has_no_duplicate_row_for_data_without_task():
    from vlm_jax import report

    ev = lambda when, acc: {"name": "mine[test]", "stage": "s", "when": when, "step": 0, "accuracy": acc,
                            "mean_response_length": 3.0, "n": 4,
                            "per_task": {evaluate.NO_TASK: {"accuracy": acc, "mean_response_length": 3.0, "n": 4}}}
    table = report.stage_table([ev("before", 0.25), ev("after", 0.5)], ["s"])
    body = [line for line in table.splitlines() if line.startswith("| mine")]
    assert len(body) == 1 and "(all)" in body[0]


def test_eval_metric_keys_are_readable():
    from vlm_jax.metrics import metric_name

    assert metric_name("dots[validation]") == "dots.validation"
    assert metric_name("synthetic_perception[test[:10]]") == "synthetic_perception.test_10"
    assert metric_name("data/geo.jsonl") == "data_geo.jsonl"


def test_exported_files_are_readable_by_others(tmp_path):
    from vlm_jax import export

    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    os.chmod(f, 0o600)
    old = os.umask(0o022)
    try:
        export.share_files(tmp_path)
    finally:
        os.umask(old)
    assert f.stat().st_mode & 0o777 == 0o644


def test_stage_start_eval_record_is_not_repeated_on_resume(tmp_path):
    from vlm_jax.metrics import MetricsWriter

    w = MetricsWriter(tmp_path, tensorboard=False, progress=False, is_main=True)
    w.write(3, "a", 3, {"loss": 1.0})
    w.write_eval(3, "a", "x[test]", {"accuracy": 0.5, "mean_response_length": 2.0, "when": "after"})
    w.write_eval(3, "b", "x[test]", {"accuracy": 0.5, "mean_response_length": 2.0, "when": "before"},
                 stage_step=0)
    assert w.drop_records(3, "b") == 1  # the resumed run evaluates stage b's start again
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], "loss" in r) for r in rows] == [("a", True), ("a", False)]
    assert "eval/x.test/accuracy" in rows[1]
    w.close()

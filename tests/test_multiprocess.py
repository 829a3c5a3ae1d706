"""Real multi-process runs: 2 JAX processes x 4 CPU devices joined with gloo collectives.

One spawn of `multiprocess_worker.py` per process does all the work (sharded HF load + forward,
save_pretrained, data-pipeline sharding); the tests here check what the workers wrote against
single-process references computed in this process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from hf_reference import build_reference, make_batch
from vlm_jax import models
from vlm_jax.models.tiny import build_tiny_model

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # minutes of process start-up: CI runs -m slow

WORKER = Path(__file__).with_name("multiprocess_worker.py")
REPO = WORKER.parent.parent
NUM_PROCESSES = 2
NUM_ROWS = 20
TIMEOUT_S = 300
FAILURE_GRACE_S = 10
# 8 rows, so the batch dim splits over data x fsdp = 4: each process holds half of the rows.
BATCH = make_batch([[], [(6, 10)], [(6, 10), (4, 4)], [(4, 4)]] * 2, padding="left", seed=0)
BATCH_QWEN3 = make_batch([[], [(6, 10)], [(6, 10), (4, 4)], [(4, 4)]] * 2, padding="left", seed=0, patch=16)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def worker_env() -> dict[str, str]:
  """The parent's environment minus its 8-device XLA flag (each worker sets its own 4)."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  return env


def spawn(tmp: Path, ckpt: Path, tiny: Path, *extra: str) -> list[tuple[subprocess.Popen, Path, Path]]:
  port = free_port()
  np.savez(tmp / "batch.npz", **BATCH)
  np.savez(tmp / "batch_qwen3.npz", **BATCH_QWEN3)
  procs = []
  for i in range(NUM_PROCESSES):
    log = tmp / f"worker{i}.log"
    cmd = [sys.executable, str(WORKER), "--process-id", str(i), "--port", str(port),
           "--ckpt", str(ckpt), "--batch", str(tmp / "batch.npz"), "--save-dir", str(tmp / "saved"),
           "--num-rows", str(NUM_ROWS), "--tiny", str(tiny), "--out", str(tmp / f"result{i}.json"),
           "--train-assets", str(tmp / "train"), "--ckpt-qwen3", str(tmp / "ckpt_qwen3"),
           "--batch-qwen3", str(tmp / "batch_qwen3.npz"), *extra]
    with log.open("w") as f:
      proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=worker_env(), cwd=REPO)
    procs.append((proc, tmp / f"result{i}.json", log))
  return procs


def collect(procs, deadline: float) -> list[dict[str, Any]]:
  """Each worker's result JSON (+ its logits). Waits until all exit, the deadline passes, or one
  fails (its peer then gets `FAILURE_GRACE_S` to report), then kills whatever still runs."""
  try:
    while time.monotonic() < deadline:
      codes = [proc.poll() for proc, _, _ in procs]
      if all(c is not None for c in codes):
        break
      if any(c not in (None, 0) for c in codes):
        deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
      time.sleep(0.2)
  finally:
    for proc, _, _ in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  results, problems = [], []
  for i, (proc, out, log) in enumerate(procs):
    tail = log.read_text()[-3000:] if log.exists() else ""
    result = json.loads(out.read_text()) if out.exists() else None
    if result is None:
      problems.append(f"worker {i} wrote no result (exit {proc.returncode}; -9: killed at the "
                      f"{TIMEOUT_S}s timeout or {FAILURE_GRACE_S}s after its peer failed); "
                      f"log tail:\n{tail}")
    elif not result["ok"]:
      problems.insert(0, f"worker {i} failed:\n{result['error']}\nlog tail:\n{tail}")
    elif proc.returncode != 0:
      problems.append(f"worker {i} exited with {proc.returncode}; log tail:\n{tail}")
    else:
      if Path(str(out) + ".npz").exists():  # not in a `--bucket` run
        with np.load(str(out) + ".npz") as f:
          result["logits"] = f["logits"]
          result["logits_qwen3"] = f["logits_qwen3"]
      results.append(result)
  if problems:  # a worker's own error first: its peer usually just hung in a collective
    pytest.fail("\n\n".join(problems))
  return results


TRAIN_CONFIG = """
from vlm_jax.config import (CheckpointConfig, Config, DataConfig, DatasetSpec, GRPOConfig, LoggingConfig,
                            MeshConfig, ModelConfig, OptimizerConfig, StageConfig)


def get_config():
    data = (DatasetSpec(name="synthetic_perception"),)
    sft = StageConfig(name="sft", capability="perception", objective="sft", datasets=data, steps=2,
                      batch_size=8, optimizer=OptimizerConfig(lr=1e-3))
    grpo = StageConfig(name="grpo", capability="perception", objective="grpo", datasets=data, steps=2,
                       batch_size=8, optimizer=OptimizerConfig(lr=1e-3),
                       grpo=GRPOConfig(num_samples=4, max_new_tokens=8, kl_coef=0.1, dynamic_sampling=True),
                       reward=(("{reward}:distinct_chars", 1.0),))
    return Config(model=ModelConfig(path="{model}"), mesh=MeshConfig(data=-1, fsdp=1, tensor=1),
                  data=DataConfig(data_dir="{data}", max_prompt_len=128, length_buckets=(192,), shards=2,
                                  min_pixels_per_image=28 * 28 * 4, max_pixels_per_image=112 * 112),
                  stages=(sft, grpo), checkpoint=CheckpointConfig(every=1, keep=2, async_save=False),
                  logging=LoggingConfig(every=1, tensorboard=False, progress=False), seed=0)
"""


# A user reward that varies with what a random tiny model writes, so the GRPO stage has non-zero
# advantages (a task reward is 0 for every sample of an untrained model).
REWARD = """
import numpy as np


def distinct_chars(responses, answers, **fields):
    return np.array([len(set(r)) / 32 for r in responses], np.float32)
"""


def write_train_assets(d: Path) -> None:
  """Data, a tiny model with weights, a user reward and the config (2 SFT + 2 GRPO steps) for the
  2-process training run."""
  from vlm_jax.data import build_synthetic

  build_synthetic(str(d / "data"), sizes={"train": 32, "validation": 4, "test": 4}, seed=0)
  build_tiny_model(d / "model", seed=0)
  (d / "reward.py").write_text(REWARD)
  (d / "config.py").write_text(TRAIN_CONFIG.format(model=d / "model", data=d / "data", reward=d / "reward.py"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Spawns both workers once; computes the single-process reference while they run."""
  tmp = tmp_path_factory.mktemp("multiprocess")
  ckpt = tmp / "ckpt"
  ref_model = build_reference(ckpt, seed=0)
  build_reference(tmp / "ckpt_qwen3", seed=0, family="qwen3_vl")
  tiny = build_tiny_model(tmp / "tiny", weights=False)
  write_train_assets(tmp / "train")
  deadline = time.monotonic() + TIMEOUT_S
  procs = spawn(tmp, ckpt, tiny)
  try:
    with jax.default_matmul_precision("highest"):
      model, params = models.from_pretrained(ckpt)
      want = np.asarray(models.forward(model, params, BATCH))
      model, params = models.from_pretrained(tmp / "ckpt_qwen3")
      want_qwen3 = np.asarray(models.forward(model, params, BATCH_QWEN3))
  except BaseException:
    collect(procs, time.monotonic())  # kill the workers before failing
    raise
  results = collect(procs, deadline)
  return dict(tmp=tmp, ckpt=ckpt, saved=tmp / "saved", ref_model=ref_model, want=want,
              want_qwen3=want_qwen3, results=results)


def test_workers_form_one_8_device_runtime(run):
  for i, r in enumerate(run["results"]):
    assert (r["process_index"], r["process_count"]) == (i, 2)
    assert (r["device_count"], r["local_device_count"]) == (8, 4)


def test_sharded_load_and_forward_match_single_process(run):
  m = BATCH["attention_mask"].astype(bool)
  for r in run["results"]:
    # the logits were a global array spanning both processes, not a per-process copy
    assert r["logits_fully_addressable"] is False
    got = r["logits"]
    assert got.shape == run["want"].shape
    assert np.abs(got - run["want"])[m].max() <= 1e-5
    # q_proj [embed, heads*head_dim] is split over (fsdp, tensor): every device holds a quarter
    assert r["q_proj_spec"] == ["fsdp", "tensor"]
    rows, cols = r["q_proj_shape"]
    assert r["q_proj_local_shard_shapes"] == [[rows // 2, cols // 2]]
  # both processes gathered the same global logits
  np.testing.assert_array_equal(run["results"][0]["logits"], run["results"][1]["logits"])
  # and a Qwen3-VL checkpoint on the same 2-process mesh equals one process too
  m = BATCH_QWEN3["attention_mask"].astype(bool)
  for r in run["results"]:
    assert np.abs(r["logits_qwen3"] - run["want_qwen3"])[m].max() <= 1e-5


def test_save_pretrained_from_two_processes(run):
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration

  saved = run["saved"]
  # process 0 wrote one complete file set; no temporary shard left behind by either process
  assert sorted(p.name for p in saved.iterdir()) == sorted(
      ["config.json", "generation_config.json", "model.safetensors"])
  orig, new = load_file(run["ckpt"] / "model.safetensors"), load_file(saved / "model.safetensors")
  assert sorted(new) == sorted(orig)
  for name, arr in orig.items():
    assert new[name].dtype == arr.dtype and new[name].shape == arr.shape, name
    assert new[name].tobytes() == arr.tobytes(), f"{name} differs from the original"

  hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(saved, dtype=torch.float32)
  ref = run["ref_model"].state_dict()
  got = hf.state_dict()
  assert sorted(got) == sorted(ref)
  for name, t in ref.items():
    assert torch.equal(got[name], t), name


def test_data_pipeline_shards_are_disjoint_and_cover_the_split(run):
  seen = [r["data"]["indices"] for r in run["results"]]
  for r in run["results"]:
    assert sum(r["data"]["stats"]["skipped"].values()) == 0
  assert all(len(s) == len(set(s)) for s in seen)  # no row twice within a process
  assert set(seen[0]).isdisjoint(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(NUM_ROWS))
  # 20 rows over 2 processes: 10 each
  assert len(seen[0]) == len(seen[1]) == NUM_ROWS // 2


def test_two_process_training_run_matches_one_process(run):
  """`curriculum.run` (2 SFT steps, then 2 GRPO steps: sampling, rewards, policy update) over
  2 processes x 4 devices (collectives over gloo), each process reading only its own data shard,
  finishes, writes metrics once, samples the same rollouts and trains the same parameters as one
  process with 8 devices reading both shards."""
  import multiprocess_worker
  from vlm_jax import config as config_lib, curriculum
  from vlm_jax.workdir import restore_for_export

  assert all(r["train"] == "finished" for r in run["results"])
  d = run["tmp"] / "train"
  records = [json.loads(line) for line in (d / "workdir" / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if "loss" in r]
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4] and np.all(np.isfinite(losses))
  grpo = [r for r in records if r.get("stage") == "grpo" and "loss" in r]
  assert all(r["adv/std"] > 0.5 and r["pg_loss"] != 0 for r in grpo), grpo  # a real policy update
  with multiprocess_worker.recording_training_rows() as single_rows:
    assert curriculum.run(config_lib.load_config(str(d / "config.py"), []), d / "single") == "finished"
  # each process read only its shard (data.shards=2: shard k holds the rows k, k+2, ...), and every
  # batch of the one-process run is process 0's rows of it, then process 1's
  per_process = [r["train_rows"] for r in run["results"]]
  assert len(per_process[0]) == len(per_process[1]) == len(single_rows) >= 4
  for k, drawn in enumerate(per_process):
    assert all(index % 2 == k for batch in drawn for _, index in batch["rows"]), k
  for a, b, one in zip(*per_process, single_rows):
    assert a["stage"] == b["stage"] == one["stage"]
    assert len(a["rows"]) == len(b["rows"]) == 4
    assert a["rows"] + b["rows"] == one["rows"]
  sft_rows = [tuple(row) for drawn in per_process for batch in drawn if batch["stage"] == "sft"
              for row in batch["rows"]]
  assert len(sft_rows) == len(set(sft_rows)) == 16  # 2 steps x 8 rows: no row read twice
  single = [json.loads(line) for line in (d / "single" / "metrics.jsonl").read_text().splitlines()]
  for key in ("reward/mean", "reward/std", "entropy"):  # same rollouts as with one process
    np.testing.assert_allclose([r[key] for r in grpo],
                               [r[key] for r in single if r.get("stage") == "grpo" and "loss" in r],
                               rtol=1e-5, err_msg=key)
  _, got, _ = restore_for_export(d / "workdir")
  _, want, _ = restore_for_export(d / "single")
  _, init = models.from_pretrained(d / "model")
  # Same samples, but gradients summed in another order; Adam (lr 1e-3) turns a round-off-sized
  # gradient of a barely used weight into an update of up to ~lr, so compare at a fraction of lr
  # (measured: 2.1e-4 at most, while training moved weights by 4e-3; SFT alone agreed to 1e-5).
  moved = 0.0
  for g, w, i in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(init)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=5e-4, rtol=0)
    moved = max(moved, float(np.abs(np.asarray(w) - np.asarray(i)).max()))
  assert moved > 2e-3, "the run did not update the parameters"


def test_two_processes_resume_past_a_damaged_latest_checkpoint(run):
  """After the training run, its newest checkpoint (the final step, 4) is truncated and the run
  repeated: both processes skip step 4, resume from step 3 and log the same step 4 again."""
  for r in run["results"]:
    d = r["damaged_resume"]
    assert d["status"] == "finished" and d["damaged_step"] == 4
    assert d["set_aside"] == ["4.damaged"]
    after, before = ({k: v for k, v in rec.items() if k != "time"} for rec in (d["last_after"], d["last_before"]))
    assert after == before and after["step"] == 4  # the same floats: loss, rewards, grad norm, ...
    assert "loss" in after and "reward/mean" in after


# ------------------------------------------------------------------------------------------------
# the same training run with its workdir in a bucket (the `gcs` storage server of this process)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bucket_run(gcs, tmp_path_factory):
  """Both workers train the run above with a `gs://` workdir, then resume it past a truncated
  newest checkpoint there. They reach this process's storage server through the environment:
  gcsfs's plain HTTP filesystem (`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`), anonymous
  (`FSSPEC_GS_TOKEN=anon`), and the conftest's emulator endpoints."""
  tmp = tmp_path_factory.mktemp("multiprocess_bucket")
  write_train_assets(tmp / "train")
  wd = f"{gcs}/multiprocess/run"
  env = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "FSSPEC_GS_TOKEN": "anon", "FSSPEC_GCS_TOKEN": "anon"}
  with pytest.MonkeyPatch.context() as mp:
    for k, v in env.items():
      mp.setenv(k, v)
    procs = spawn(tmp, tmp / "unused", tmp / "unused", "--bucket", wd)
    results = collect(procs, time.monotonic() + 3 * TIMEOUT_S)  # two runs, every file over HTTP (~8 min on 2 busy cores)
  return {"tmp": tmp, "wd": wd, "results": sorted(results, key=lambda r: r["process_index"])}


def test_two_processes_write_their_shares_to_a_bucket_and_only_process_0_the_rest(bucket_run):
  """Each checkpoint step in the bucket holds both processes' array data (orbax's per-process
  OCDBT databases, written by tensorstore) and each step's metrics once; every other object
  (metrics, report, plots, evaluation, checkpoint metadata) is written by process 0 alone; the
  run resumes past a damaged newest checkpoint there as on a shared disk."""
  from vlm_jax import paths

  wd = paths.resolve(bucket_run["wd"])
  first, second = bucket_run["results"]
  assert first["train"] == second["train"] == "finished"
  steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [3, 4]  # keep=2
  for step in steps:
    state = wd / "checkpoints" / str(step) / "state"
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= {p.name for p in state.iterdir()}, step
    assert {p.name for p in (state / "array_metadatas").iterdir()} == {"process_0", "process_1"}, step
  records = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # step 4 redone after the damage, logged once
  assert (wd / "report.md").read_text().startswith("# Run report")
  root = str(wd)[len("gs://"):]
  others = [p for p in second["written"] if ".vlm_jax_write_check." not in p
            and not p.endswith("/state/array_metadatas/process_1")]
  assert others == [], others  # process 1: its start-up write probes and its arrays' metadata only
  mine = {p[len(root) + 1:] for p in first["written"] if p.startswith(root)}
  assert {"metrics.jsonl", "report.md", "config.json"} <= mine, sorted(mine)
  for r in bucket_run["results"]:
    d = r["damaged_resume"]
    assert d["status"] == "finished" and d["damaged_step"] == 4 and d["set_aside"] == ["4.damaged"]
    after, before = ({k: v for k, v in rec.items() if k != "time"} for rec in (d["last_after"], d["last_before"]))
    assert after == before and after["step"] == 4

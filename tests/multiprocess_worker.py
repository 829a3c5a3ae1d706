"""One JAX process of a real 2-process run (4 CPU devices each, gloo collectives).

Spawned twice by `tests/test_multiprocess.py`; not a test module itself. Each process joins the
distributed runtime, then:

1. loads `--ckpt` sharded on a (data=2, fsdp=2, tensor=2) mesh over all 8 devices and runs `forward`
   on the batch in `--batch` (npz), gathering the logits to the host;
2. saves the loaded parameters with `save_pretrained` to `--save-dir` (process 0 writes);
3. iterates the grain pipeline over `--num-rows` synthetic perception rows (seed 0) with the default
   shard_index/shard_count and records the source index of every real row;
4. trains the curriculum of `--train-assets` (recording the rows each process reads), then truncates its newest checkpoint and reruns it
   (resume from the step before).

With `--bucket gs://...` (the storage server of the parent test, reached through the environment)
it does only 4, with that workdir, and records the objects it wrote.

Results go to `--out` (JSON) and `--out`.npz (logits); a failure writes its traceback into the JSON
so the test can show it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

NUM_PROCESSES = 2
LOCAL_DEVICES = 4


def _init_distributed(process_id: int, port: int) -> None:
  """Joins the 2-process CPU runtime; must run before anything touches a JAX backend."""
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  import jax
  jax.config.update("jax_threefry_partitionable", True)
  from vlm_jax import sharding  # what `python -m vlm_jax.train` uses: gloo, timeouts, failure watch
  sharding.initialize_distributed(f"127.0.0.1:{port}", NUM_PROCESSES, process_id,
                                  initialization_timeout_s=60)


def sharded_forward(ckpt: Path, batch_file: Path):
  """(model, params, logits as a full host array, facts about the sharding) for the checkpoint
  loaded on the (data=2, fsdp=2, tensor=2) mesh over both processes' devices."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from vlm_jax import models, sharding
  from vlm_jax.config import MeshConfig

  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  with np.load(batch_file) as f:
    batch = {k: f[k] for k in f.files}
  with jax.default_matmul_precision("highest"):
    model, params = models.from_pretrained(ckpt, mesh=mesh)
    logits = models.forward(model, params, batch)
  q = params["language_model"]["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
  host = np.asarray(multihost_utils.process_allgather(logits, tiled=True))
  return model, params, host, {
      "logits_fully_addressable": bool(logits.is_fully_addressable),
      "q_proj_spec": [str(a) for a in q.sharding.spec],
      "q_proj_shape": list(q.shape),
      "q_proj_local_shard_shapes": sorted({tuple(s.data.shape) for s in q.addressable_shards}),
  }


def data_indices(num_rows: int, tiny_dir: Path) -> dict[str, Any]:
  """Source indices of the real rows this process's pipeline shard yields (one epoch)."""
  from vlm_jax.data.pipeline import make_dataset
  from vlm_jax.data.prepare import RowsSource
  from vlm_jax.data.processor import Processor
  from vlm_jax.data.synthetic import generate

  rows = generate("perception", num_rows, seed=0)
  processor = Processor.from_pretrained(tiny_dir)
  it = make_dataset([(RowsSource(rows, name="synthetic"), 1.0)], processor, batch_size=4,
                    num_epochs=1, seed=3, num_threads=1, prefetch_buffer_size=2)
  indices = [int(i) for batch in it for i, real in zip(batch["index"], batch["row_mask"]) if real]
  return {"indices": indices, "stats": it.stats}


class _Recorder:
  """Wraps a stage's data iterator; logs the (source, row index) of each real row it yields."""

  def __init__(self, inner, log: list, stage: str):
    self._inner, self._log, self._stage = inner, log, stage

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._inner)
    rows = [[int(s), int(i)] for s, i, real in zip(batch["source"], batch["index"], batch["row_mask"]) if real]
    self._log.append({"stage": self._stage, "rows": rows})
    return batch

  def __getattr__(self, name):
    return getattr(self._inner, name)


@contextlib.contextmanager
def recording_training_rows():
  """Within: every row the curriculum's training steps read (not the start-up checks' first
  batches) is logged, per batch drawn, in the list yielded."""
  from vlm_jax import curriculum

  log: list = []
  step = curriculum.train_step

  def recorded(env, stage, *args, **kwargs):
    inner = stage.iterator
    stage.iterator = _Recorder(inner, log, stage.cfg.name)
    try:
      return step(env, stage, *args, **kwargs)
    finally:
      stage.iterator = inner

  curriculum.train_step = recorded
  try:
    yield log
  finally:
    curriculum.train_step = step


def train(assets: Path, workdir: Path, record: list | None = None) -> str:
  """The SFT + GRPO curriculum of `assets/config.py` over the 8-device, 2-process mesh, checkpointed
  in `workdir`; returns the run status. `record`: gets the rows each training step read."""
  from vlm_jax import config as config_lib, curriculum

  cfg = config_lib.load_config(str(assets / "config.py"), [])
  if record is None:
    return curriculum.run(cfg, workdir)
  with recording_training_rows() as log:
    status = curriculum.run(cfg, workdir)
  record.extend(log)
  return status


def resume_past_damage(assets: Path, workdir) -> dict[str, Any]:
  """Truncates the array data of the newest checkpoint of the finished run (process 0, the
  processes share the directory), reruns it: both processes must agree to skip that step, resume
  from the one before and log the same last step again. `workdir`: a local folder or a URL."""
  import jax
  from jax.experimental import multihost_utils

  from vlm_jax import paths

  workdir = paths.as_path(workdir)
  ckpts = workdir / "checkpoints"
  records = (workdir / "metrics.jsonl").read_text().splitlines()
  latest = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  if jax.process_index() == 0:
    size = lambda p: p.stat().length if paths.is_url(p) else p.stat().st_size  # noqa: E731
    victim = max((ckpts / str(latest) / "state" / "d").iterdir(), key=size)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # a bucket object is replaced whole; a file too
  multihost_utils.sync_global_devices("damaged")
  status = train(assets, workdir)
  return {"status": status, "damaged_step": latest, "last_before": json.loads(records[-1]),
          "last_after": json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1]),
          "set_aside": sorted(p.name for p in ckpts.iterdir() if "damaged" in p.name)}


@contextlib.contextmanager
def recording_bucket_writes():
  """Within: the name of every object this process writes through gcsfs (every file in a bucket
  but orbax's arrays, which tensorstore writes)."""
  import gcsfs.core

  written: list[str] = []
  close = gcsfs.core.GCSFile.close

  def recorded(self, *args, **kwargs):
    if "w" in self.mode and not self.closed:
      written.append(self.path)
    return close(self, *args, **kwargs)

  gcsfs.core.GCSFile.close = recorded
  try:
    yield written
  finally:
    gcsfs.core.GCSFile.close = close


def bucket_run(assets: Path, workdir: str) -> dict[str, Any]:
  """The training run of `train` with a bucket workdir, then the damaged-checkpoint resume there;
  records the objects this process wrote."""
  with recording_bucket_writes() as written:
    result = {"train": train(assets, workdir)}
    result["damaged_resume"] = resume_past_damage(assets, workdir)
  result["written"] = sorted(set(written))
  return result


class _Done(Exception):
  """A shorter run (`--bucket`) ended."""


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--process-id", type=int, required=True)
  p.add_argument("--port", type=int, required=True)
  p.add_argument("--ckpt", type=Path, required=True)
  p.add_argument("--batch", type=Path, required=True)
  p.add_argument("--save-dir", type=Path, required=True)
  p.add_argument("--num-rows", type=int, required=True)
  p.add_argument("--tiny", type=Path, required=True)
  p.add_argument("--out", type=Path, required=True)
  p.add_argument("--train-assets", type=Path, required=True)
  p.add_argument("--ckpt-qwen3", type=Path, required=True, help="a Qwen3-VL checkpoint, sharded load too")
  p.add_argument("--batch-qwen3", type=Path, required=True)
  p.add_argument("--bucket", default="", help="only train in this gs:// workdir (and resume past damage there)")
  args = p.parse_args(argv)

  result: dict[str, Any] = {"process_id": args.process_id, "seconds": {}}
  clock = time.monotonic()

  def lap(name: str) -> None:
    nonlocal clock
    now = time.monotonic()
    result["seconds"][name] = round(now - clock, 2)
    clock = now

  try:
    _init_distributed(args.process_id, args.port)
    lap("init")
    import jax
    import numpy as np

    from vlm_jax import models
    result.update(process_index=jax.process_index(), process_count=jax.process_count(),
                  device_count=jax.device_count(), local_device_count=jax.local_device_count())
    lap("imports")
    if args.bucket:
      result.update(bucket_run(args.train_assets, args.bucket))
      lap("bucket_run")
      raise _Done
    model, params, logits, info = sharded_forward(args.ckpt, args.batch)
    result.update(info)
    _, _, logits_qwen3, _ = sharded_forward(args.ckpt_qwen3, args.batch_qwen3)
    np.savez(str(args.out) + ".npz", logits=logits, logits_qwen3=logits_qwen3)
    lap("load_forward")
    models.save_pretrained(model, params, args.save_dir)
    lap("save")
    result["data"] = data_indices(args.num_rows, args.tiny)
    lap("data")
    result["train_rows"] = []
    result["train"] = train(args.train_assets, args.train_assets / "workdir", result["train_rows"])
    lap("train")
    result["damaged_resume"] = resume_past_damage(args.train_assets, args.train_assets / "workdir")
    lap("damaged_resume")
    result["ok"] = True
  except _Done:
    result["ok"] = True
  except BaseException:  # noqa: BLE001 - report everything to the parent test
    result["ok"] = False
    result["error"] = traceback.format_exc()
  args.out.write_text(json.dumps(result))
  sys.stdout.flush()
  if not result["ok"]:
    # Skip jax.distributed.shutdown's barrier: a failed peer would make it hang until the timeout.
    os._exit(1)
  import jax
  jax.distributed.shutdown()  # both processes leave together, so the coordinator outlives process 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Per-process data shards (`vlm_jax.data.shards`): a batch is every shard's rows in order, a
process reads only its shards, positions resume per shard, and the pieces a process builds from its
own rows (padding, empty vision inputs) give the same model inputs as the whole batch would.

The two-process run that reads half the data per process is in `tests/test_multiprocess.py`
(`-m slow`); here one process reads both shards, which must give the same batches."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vlm_jax import config as config_lib, models, startup
from vlm_jax.data import pipeline as pl
from vlm_jax.data import prepare as prep
from vlm_jax.data.processor import Processor
from vlm_jax.data.schema import normalize_row
from vlm_jax.data.shards import ShardCountError, ShardedBatches, join_batches
from vlm_jax.models.tiny import build_tiny_model
from vlm_jax.rl import sampler


def _png(seed: int, size: tuple[int, int]) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "PNG")
  return buf.getvalue()


def _rows(n: int) -> list[dict]:
  """Rows of varied length: text-only ones and rows with one or two images of several sizes."""
  out = []
  for i in range(n):
    kind = i % 3
    if kind == 0:
      row = {"problem": "What is " + " plus ".join(["2"] * (1 + i % 5)) + "?", "images": []}
    elif kind == 1:
      row = {"problem": "<image> Which colour?", "images": [_png(i, (56, 56 + 28 * (i % 2)))]}
    else:
      row = {"problem": "Compare <image> and <image>.", "images": [_png(i, (56, 56)), _png(i + 1, (84, 56))]}
    out.append(normalize_row({**row, "answer": str(i)}))
  return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  path = build_tiny_model(tmp_path_factory.mktemp("shards_tiny"))
  proc = Processor.from_pretrained(path)
  model, params = models.from_pretrained(path)
  return model, params, proc, prep.RowsSource(_rows(24), name="toy")


def shard_iterator(proc, source, k: int, count: int, rows: int, sft: bool = False):
  return pl.make_dataset([(source, 1.0)], proc, batch_size=rows, shard_index=k, shard_count=count, seed=5,
                         length_buckets=tuple(range(8, 257, 8)), target_field="answer" if sft else None,
                         num_threads=1, prefetch_buffer_size=2)


def sharded(proc, source, count: int, rows: int, sft: bool = False) -> ShardedBatches:
  return ShardedBatches(lambda k: shard_iterator(proc, source, k, count, rows, sft), shard_count=count,
                        padding_side="right" if sft else "left", pad_token_id=int(proc.pad_token_id))


@pytest.mark.parametrize("sft", [False, True])
def test_a_batch_is_each_shards_rows_in_order_and_resumes_per_shard(env, sft):
  _, _, proc, source = env
  it = sharded(proc, source, 2, 3, sft)
  alone = [shard_iterator(proc, source, k, 2, 3, sft) for k in range(2)]
  key = "loss_mask" if sft else "attention_mask"
  lengths = set()
  for _ in range(3):
    batch, parts = next(it), [next(a) for a in alone]
    assert batch["index"] == parts[0]["index"] + parts[1]["index"]
    assert batch["shard"] == [0] * 3 + [1] * 3
    assert all(i % 2 == k for k, p in enumerate(parts) for i in p["index"])  # shard k: rows k, k+2, ...
    L = batch["input_ids"].shape[1]
    lengths |= {p["input_ids"].shape[1] for p in parts}
    for r in range(6):  # each row's real tokens (and target mask) are its shard's, re-padded
      p, pr = parts[r // 3], r % 3
      real = p["attention_mask"][pr].astype(bool)
      got = batch["attention_mask"][r].astype(bool)
      np.testing.assert_array_equal(batch["input_ids"][r][got], p["input_ids"][pr][real])
      np.testing.assert_array_equal(batch[key][r][got], p[key][pr][real])
      assert got[-1 if not sft else 0] and got.sum() == real.sum() and len(got) == L
    np.testing.assert_array_equal(batch["image_grid_thw"][: batch["num_images"]], np.concatenate(
        [p["image_grid_thw"][: p["num_images"]] for p in parts]))
    np.testing.assert_array_equal(batch["pixel_values"][: batch["num_patches"]], np.concatenate(
        [p["pixel_values"][: p["num_patches"]] for p in parts]))
  assert len(lengths) > 1  # the shards' batches had different lengths: the join re-padded them
  state = it.get_state()
  assert state["shard_count"] == 2 and len(state["shards"]) == 2
  assert it.stats["rows"] == 18 and it.stats["batches"] == 3
  want = next(it)
  again = sharded(proc, source, 2, 3, sft)
  again.set_state(state)
  got = next(again)
  assert got["index"] == want["index"]
  np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
  assert again.stats["rows"] == 24
  with pytest.raises(ShardCountError, match="2 data shards, this run 1; resume it with data.shards=2"):
    sharded(proc, source, 1, 6).set_state(state)
  for i in (it, again, *alone):
    i.close()


def test_a_joined_batch_gives_the_model_inputs_of_its_rows(env):
  """The joined shards' rows give the same sampler inputs as the same rows collated by the
  reference row surgery (`rollout.concat_batches`), and the same logits."""
  from vlm_jax.rl.rollout import concat_batches

  model, params, proc, source = env
  parts = [next(shard_iterator(proc, source, k, 2, 3)) for k in range(2)]
  joined = join_batches(parts, length=max(p["input_ids"].shape[1] for p in parts), padding_side="left",
                        pad_token_id=int(proc.pad_token_id))
  ref = concat_batches(parts, proc.image_token_id)
  a = sampler.prepare_prompts(model, joined, pad_id=proc.pad_token_id, num_patches=128)
  b = sampler.prepare_prompts(model, ref, pad_id=proc.pad_token_id, num_patches=128)
  for x, y in zip(models.jax.tree.leaves(a), models.jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert int(np.asarray(a.vision[-1]).sum()) > 0  # merged image tokens per row: the rows have images


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_empty_vision_inputs_leave_text_rows_unchanged(tmp_path, family):
  """A process whose rows are all text still builds vision inputs (all padding) when another
  process's rows of the batch have images: its logits equal the text-only forward's."""
  path = build_tiny_model(tmp_path / family, family=family)
  proc = Processor.from_pretrained(path)
  model, params = models.from_pretrained(path)
  batch = proc(["Count to three.", "What is two plus two?"], None, padding_side="left")
  plain = model.prepare(batch)
  assert plain.vision is None
  padded = model.prepare(batch, num_patches=64, with_vision=True)
  assert padded.vision is not None and int(np.asarray(padded.vision[-1]).sum()) == 0
  with models.jax.default_matmul_precision("highest"):
    want = np.asarray(models._forward(model.graphdef, params, plain))
    got = np.asarray(models._forward(model.graphdef, params, padded))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="with_vision needs num_patches"):
    model.prepare(batch, with_vision=True)


def test_data_shards_must_split_every_stages_batch():
  from vlm_jax import sharding

  base = config_lib.Config(stages=(config_lib.StageConfig(name="s", capability="perception", objective="sft",
                                                          datasets=(config_lib.DatasetSpec(name="x"),),
                                                          steps=1, batch_size=6),))
  mesh = sharding.make_mesh()
  startup.check_data_shards(base, mesh)  # one shard per process: fine
  bad = config_lib.Config(stages=base.stages, data=config_lib.DataConfig(shards=4))
  with pytest.raises(config_lib.ConfigError, match="batch_size 6 does not split over 4 data shards") as e:
    startup.check_data_shards(bad, mesh)
  assert e.value.key == "stages.0.batch_size"
  with pytest.raises(config_lib.ConfigError, match="shards"):
    config_lib.DataConfig(shards=-1)


def test_row_owners_follow_the_mesh_even_when_it_interleaves_processes():
  """Which rows of a batch each process's devices hold, for a device order that interleaves two
  hosts (as a TPU slice's can): host 0 owns mesh positions 0, 1, 4, 5. Its rows are placed, and
  gathered back, in that order; an uneven split is refused."""
  import jax

  from vlm_jax import sharding
  from vlm_jax.config import MeshConfig

  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  mesh = sharding.make_mesh(MeshConfig(data=4, fsdp=2, tensor=1), devices=jax.devices()[:8])
  position = {d: i for i, d in enumerate(mesh.devices.flat)}
  host = lambda d: (position[d] // 2) % 2  # noqa: E731
  owners = sharding.row_owners(mesh, 16, process_of=host, process_count=2)
  np.testing.assert_array_equal(owners[0], [0, 1, 2, 3, 8, 9, 10, 11])
  np.testing.assert_array_equal(owners[1], [4, 5, 6, 7, 12, 13, 14, 15])
  batch = np.arange(16) * 10
  np.testing.assert_array_equal(sharding.assemble_rows([batch[o] for o in owners], owners), batch)
  with pytest.raises(ValueError, match="unevenly"):
    sharding.row_owners(mesh, 16, process_of=lambda d: int(position[d] >= 5), process_count=2)
  # one process: every row, in order
  np.testing.assert_array_equal(sharding.process_rows(mesh, 16), np.arange(16))

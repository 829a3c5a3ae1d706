"""Sharded loading on a mesh of 8 fake CPU devices, sharding rules, and clear errors on bad input."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from hf_reference import build_reference, make_batch
from vlm_jax import models, sharding
from vlm_jax.config import LOGICAL_AXIS_RULES, MeshConfig
from vlm_jax.models import CheckpointError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    build_reference(d, seed=0, hidden=64, heads=4, kv_heads=2)
    return d


ROWS = [[], [(6, 10)], [(6, 10), (4, 4)], [(4, 4)]] * 2
BATCH = make_batch(ROWS, padding="left", seed=0)


@pytest.fixture(scope="module")
def qwen3_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref_qwen3")
    build_reference(d, seed=0, family="qwen3_vl")
    return d


def logits(path, mesh=None, batch=BATCH):
    with jax.default_matmul_precision("highest"):
        model, params = models.from_pretrained(path, mesh=mesh)
        return model, params, np.asarray(models.forward(model, params, batch))


@pytest.mark.parametrize(
    "family,shape",
    [
        ("qwen2_5_vl", (8, 1, 1)),
        ("qwen2_5_vl", (1, 8, 1)),
        ("qwen2_5_vl", (2, 2, 2)),
        ("qwen3_vl", (1, 8, 1)),
        ("qwen3_vl", (2, 2, 2)),
    ],
)
def test_mesh_logits_match_single_device(request, family, shape):
    assert jax.device_count() == 8
    ckpt = request.getfixturevalue("ckpt" if family == "qwen2_5_vl" else "qwen3_ckpt")
    batch = BATCH if family == "qwen2_5_vl" else make_batch(ROWS, padding="left", seed=0, patch=16)
    _, _, want = logits(ckpt, batch=batch)
    mesh = sharding.make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]))
    model, params, got = logits(ckpt, mesh, batch)
    m = batch["attention_mask"].astype(bool)
    assert np.abs(got - want)[m].max() <= 1e-5

    # every parameter follows the rules table
    rules = dict(LOGICAL_AXIS_RULES)
    for path, var in nnx.to_flat_state(params):
        names = var.get_metadata()["out_sharding"]
        spec = var[...].sharding.spec
        for dim, (name, size) in enumerate(zip(names, var.shape)):
            target = rules.get(name)
            axes = (target,) if isinstance(target, str) else tuple(target or ())
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            got_axes = spec[dim] if dim < len(spec) else None
            got_axes = (got_axes,) if isinstance(got_axes, str) else tuple(got_axes or ())
            n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
            if axes and size % n == 0 and not any(a in str(spec[:dim]) for a in axes):
                assert got_axes == axes, (path, name, spec)
            else:
                assert got_axes == (), (path, name, spec)


def test_tensor_parallel_shards_are_split(ckpt):
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=8))
    model, params = models.from_pretrained(ckpt, mesh=mesh)
    q = params["language_model"]["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
    assert q.sharding.spec == P(None, "tensor")
    shard_shapes = {s.data.shape for s in q.addressable_shards}
    assert shard_shapes == {(64, 64 // 8)}  # each device holds 1/8 of the heads, nobody the whole


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        models.from_pretrained(tmp_path / "nope")


def test_missing_safetensors(ckpt, tmp_path):
    shutil.copy(ckpt / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        models.from_pretrained(tmp_path)


def test_truncated_safetensors(ckpt, tmp_path):
    shutil.copy(ckpt / "config.json", tmp_path / "config.json")
    data = (ckpt / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        models.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[:20])  # not even a whole header
    with pytest.raises(CheckpointError, match="model.safetensors"):
        models.from_pretrained(tmp_path)


def test_unsupported_model_type(ckpt, tmp_path):
    raw = json.loads((ckpt / "config.json").read_text())
    raw["model_type"] = "llava"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="unsupported model_type 'llava'.*qwen2_5_vl"):
        models.from_pretrained(tmp_path)


def test_shape_disagrees_with_config(ckpt, tmp_path):
    raw = json.loads((ckpt / "config.json").read_text())
    raw["text_config"]["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").symlink_to(ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight.*\(128, 64\)"):
        models.from_pretrained(tmp_path)


def test_missing_tensor(ckpt, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(ckpt / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(ckpt / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        models.from_pretrained(tmp_path)


def test_image_token_mismatch_is_a_clear_error(ckpt):
    model, params = models.from_pretrained(ckpt)
    bad = dict(BATCH)
    bad["image_grid_thw"] = BATCH["image_grid_thw"].copy()
    bad["image_grid_thw"][0] = (1, 4, 4)
    with pytest.raises(ValueError, match="image tokens"):
        models.forward(model, params, bad)

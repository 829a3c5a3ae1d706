"""The path layer (`vlm_jax.paths`) against a storage server on loopback (the `gcs` fixture):
bucket paths are never turned into local folders, writability is probed where the data goes, and
errors name the path and the cause. The end-to-end runs on a bucket (train, resume, evaluate,
export, model and data read from a bucket, hub ids) are in test_curriculum.py, beside the local
run they are compared with."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from vlm_jax import paths


def test_local_paths_stay_pathlib_and_urls_never_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.resolve("a/b") == tmp_path / "a" / "b" and isinstance(paths.resolve("a/b"), Path)
    url = paths.resolve("gs://bucket/runs/demo")
    assert str(url) == "gs://bucket/runs/demo" and str(url / "checkpoints") == "gs://bucket/runs/demo/checkpoints"
    assert str(paths.data_dir("gs://bucket/data")) == "gs://bucket/data"
    assert str(paths.cache_dir("gs://bucket/jax_cache")) == "gs://bucket/jax_cache"
    assert paths.is_url("gs://b/x") and not paths.is_url("gs:/b/x") and not paths.is_url("./gs:/b")
    assert not (tmp_path / "gs:").exists()


def test_bucket_write_check_text_files_and_errors(gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths.check_writable(f"{gcs}/storage/wd")
    assert not list(paths.resolve(f"{gcs}/storage/wd").glob(".vlm_jax_write_check*"))
    with pytest.raises(OSError, match="no such bucket"):
        paths.check_writable("gs://no-such-bucket/runs/demo")
    target = paths.resolve(f"{gcs}/storage/wd/a.json")
    paths.write_text_atomic(target, json.dumps({"x": 1}))
    assert json.loads(target.read_text()) == {"x": 1}
    local = tmp_path / "tree"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "b.bin").write_bytes(b"\x00\x01" * 1000)
    (local / "c.txt").write_text("c")
    paths.copy_tree(local, f"{gcs}/storage/tree")
    back = paths.local_files(f"{gcs}/storage/tree", ["c.txt", "missing.txt"])
    assert (back / "c.txt").read_text() == "c" and not (back / "missing.txt").exists()
    assert paths.resolve(f"{gcs}/storage/tree/sub/b.bin").read_bytes() == b"\x00\x01" * 1000
    with paths.staged_dir(f"{gcs}/storage/staged") as d:
        (d / "x.txt").write_text("staged")
    assert paths.resolve(f"{gcs}/storage/staged/x.txt").read_text() == "staged"
    assert not (tmp_path / "gs:").exists()


def test_remote_safetensors_reads_row_ranges(gcs, tmp_path):
    from safetensors.numpy import save_file

    from vlm_jax.models import hf_io

    arrays = {"a": np.arange(60, dtype=np.float32).reshape(5, 3, 4), "b": np.arange(7, dtype=np.int64)}
    save_file(arrays, str(tmp_path / "model.safetensors"))
    paths.copy_file(tmp_path / "model.safetensors", f"{gcs}/storage/st/model.safetensors")
    with hf_io.RemoteSafetensors(paths.resolve(f"{gcs}/storage/st/model.safetensors")) as f:
        assert sorted(f.keys()) == ["a", "b"]
        sl = f.get_slice("a")
        assert sl.get_shape() == [5, 3, 4]
        np.testing.assert_array_equal(sl[1:4, :, 2:3], arrays["a"][1:4, :, 2:3])
        np.testing.assert_array_equal(sl[slice(0, 5), slice(0, 3)], arrays["a"])
        np.testing.assert_array_equal(f.get_slice("b")[2:5], arrays["b"][2:5])

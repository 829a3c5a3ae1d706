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

from test_checkpoint import DAMAGE  # the damage a checkpoint step can take, on disk or in a bucket
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


# --- checkpoints in a bucket: damage, partial saves


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_in_a_bucket_falls_back_to_the_previous_one(gcs, damage, caplog):
    """As on disk (test_checkpoint): the newest step that does not restore is skipped and set aside
    as `<step>.damaged` (copied in the bucket, then removed), the previous step is restored
    bitwise, and the step can be written again; a half-written step (no `commit_success.txt`) is
    never listed at all."""
    from test_checkpoint import abstract, host_bytes, make_state, scale_params

    from vlm_jax.checkpoint import Checkpointer

    import jax

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    state = make_state(mesh)
    url = f"{gcs}/damage/{damage}"
    root = paths.resolve(url)
    with Checkpointer(url, keep=3, async_save=False) as ckpt:
        for step in (2, 4, 6):
            ckpt.save(step, scale_params(state, float(step)), {"step": step})
    DAMAGE[damage](root / "6")
    with Checkpointer(url, keep=3) as ckpt:
        assert ckpt.all_steps() == ([2, 4] if damage == "half_written" else [2, 4, 6])
        step, restored, meta = ckpt.restore_newest(lambda m: abstract(state))
        assert (step, meta) == (4, {"step": 4})
        assert host_bytes(restored) == host_bytes(scale_params(state, 4.0))
        assert ckpt.all_steps() == [2, 4]
        if damage != "half_written":
            assert "checkpoint step 6" in caplog.text and "does not restore" in caplog.text
            assert sorted(p.name for p in root.iterdir()) == ["2", "4", "6.damaged"]
            assert (root / "6.damaged" / "_CHECKPOINT_METADATA").exists()  # kept for inspection
        assert ckpt.save(6, scale_params(state, 7.0), {"step": 66})
        ckpt.wait()
    with Checkpointer(url, keep=3) as ckpt:
        step, restored, meta = ckpt.restore_newest(lambda m: abstract(state))
        assert (step, meta) == (6, {"step": 66}) and host_bytes(restored) == host_bytes(scale_params(state, 7.0))


# --- the persistent compilation cache in a bucket


def test_compilation_cache_in_a_bucket_is_written_and_read_back(gcs):
    """JAX's persistent cache takes a `gs://` directory itself (through etils.epath): a compile
    writes its entry to the bucket and, with JAX's in-memory caches cleared, is read back from it."""
    import jax
    import jax.numpy as jnp
    from jax._src import compilation_cache as cc

    url = f"{gcs}/jax_cache"
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    saved = {k: getattr(jax.config, k) for k in keys}
    try:
        for k, v in zip(keys, (url, 0, 0)):
            jax.config.update(k, v)
        cc.reset_cache()

        def fn(x):
            return jnp.sin(x) * 3.0 + 1.0

        expected = jax.jit(fn)(jnp.arange(5.0))
        entries = [p.name for p in paths.resolve(url).iterdir() if p.name.startswith("jit_fn-")]
        assert len(entries) == 1, entries
        jax.clear_caches()
        cc.reset_cache()
        hits = []
        real_get = cc.get_executable_and_time
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cc, "get_executable_and_time",
                       lambda *a, **k: hits.append(out := real_get(*a, **k)) or out)
            again = jax.jit(fn)(jnp.arange(5.0))
        assert any(h[0] is not None for h in hits), hits  # an executable came from the bucket
        np.testing.assert_array_equal(np.asarray(again), np.asarray(expected))
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
        jax.clear_caches()
        cc.reset_cache()
    assert not Path("gs:").exists()

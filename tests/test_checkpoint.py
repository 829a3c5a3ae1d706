"""Checkpointer round trips (sharded, bitwise), retention, atomicity, and preemption handling."""
import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from vlm_jax import paths
from vlm_jax.checkpoint import (BYTES_TAG, CheckpointDamagedError, Checkpointer, CheckpointWriteError,
                                PreemptionGuard, decode_meta, encode_meta, params_finite)

REPO = Path(__file__).resolve().parents[1]


# --- fixtures


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)


class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.proj = nnx.Linear(4, 8, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)


def make_state(mesh, seed: int = 0):
    """Params sharded on the 2x2x2 mesh, adam state after one update, a typed key and its data."""
    _, params = nnx.split(Tiny(nnx.Rngs(seed)), nnx.Param)
    specs = {2: P("fsdp", "tensor"), 1: P("tensor")}
    params = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, specs[x.ndim])), params)
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)
    grads = jax.tree.map(lambda x: jnp.sin(x * 3.0 + seed), params)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    key = jax.random.key(seed + 17)
    return {"params": params, "opt_state": opt_state, "key": key,
            "key_data": jax.random.key_data(key), "step": jnp.int32(seed)}


def abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def host_bytes(tree) -> list[tuple[str, str, bytes]]:
    """(path, dtype, raw bytes) of every leaf; typed keys as their uint32 data."""
    def raw(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x).tobytes()
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(p), str(x.dtype), raw(x)) for p, x in flat]


def scale_params(state, factor):
    return {**state, "params": jax.tree.map(lambda x: x * factor, state["params"])}


# --- round trips


def test_round_trip_bitwise_into_target_shardings(tmp_path, mesh):
    state = make_state(mesh)
    expected = host_bytes(state)
    meta = {"step": 7, "stage": 1, "data": {"pos": 3}, "iter": b"\x00\xffgrain", "skipped": 2}
    with Checkpointer(tmp_path, keep=2) as ckpt:
        target = abstract(state)
        assert ckpt.save(7, state, meta)
        # The device->host copy is done when save returns: the trainer may donate the state.
        jax.tree.map(lambda x: x.delete(), state)
        restored, restored_meta = ckpt.restore(target=target)
    assert host_bytes(restored) == expected
    assert restored_meta == meta
    assert isinstance(restored["params"], nnx.State)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert jnp.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert got.sharding == want.sharding
    kernel = restored["params"]["proj"]["kernel"][...]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (2, 4)


def test_restore_into_different_sharding(tmp_path, mesh):
    state = make_state(mesh)
    replicated = NamedSharding(mesh, P())
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state, {})
        restored, meta = ckpt.restore(1, target=target)
    assert meta == {}
    assert host_bytes(restored) == host_bytes(state)
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(restored))


def test_meta_encoding_by_hand_and_errors():
    arr = np.arange(6, dtype=np.uint32).reshape(2, 3)
    meta = {"b": b"hi", "n": np.int64(5), "t": (1, 2.5), "rng": arr, "big": 2**100, "none": None}
    doc = encode_meta(meta)
    assert doc["b"] == {BYTES_TAG: base64.b64encode(b"hi").decode()} == {BYTES_TAG: "aGk="}
    assert doc["n"] == 5 and type(doc["n"]) is int and doc["t"] == [1, 2.5]
    back = decode_meta(doc)
    assert back["b"] == b"hi" and back["big"] == 2**100 and back["none"] is None
    np.testing.assert_array_equal(back["rng"], arr)
    assert back["rng"].dtype == np.uint32
    with pytest.raises(TypeError, match=r"meta\['data'\]\['obj'\]"):
        encode_meta({"data": {"obj": object()}})
    with pytest.raises(TypeError, match="key 3 is not a str"):
        encode_meta({"data": {3: 1}})
    with pytest.raises(ValueError, match="reserved"):
        encode_meta({BYTES_TAG: "x"})


def test_bad_meta_raises_before_writing(tmp_path, mesh):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError, match=r"meta\['iter'\]"):
            ckpt.save(1, make_state(mesh), {"iter": {1, 2}})
        assert ckpt.latest_step() is None
    assert not list(tmp_path.iterdir())


# --- steps, retention, atomicity


def test_keep_last_n_latest_and_specific_step(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path, keep=2) as ckpt:
        assert ckpt.latest_step() is None
        for step in (2, 4, 6):
            assert ckpt.save(step, scale_params(state, float(step)), {"step": step})
        ckpt.wait()
        assert ckpt.all_steps() == [4, 6] and ckpt.latest_step() == 6
        assert sorted(p.name for p in tmp_path.iterdir()) == ["4", "6"]
        restored, meta = ckpt.restore(4, target=abstract(state))
        assert meta == {"step": 4}
        assert host_bytes(restored) == host_bytes(scale_params(state, 4.0))
        assert ckpt.restore_meta() == {"step": 6}
        with pytest.raises(FileNotFoundError, match=r"step 2 .*saved steps: \[4, 6\]"):
            ckpt.restore(2, target=abstract(state))
        # Not newer than the latest: skipped unless forced (which replaces that step).
        assert not ckpt.save(6, state, {"step": -1})
        assert not ckpt.save(5, state, {"step": -1})
        assert ckpt.save(6, state, {"step": 66}, force=True)
        assert ckpt.restore_meta(6) == {"step": 66}
    # A new manager on the same directory sees the same steps.
    with Checkpointer(tmp_path, keep=2) as again:
        assert again.latest_step() == 6


def test_empty_directory_restore_raises(tmp_path, mesh):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint in"):
            ckpt.restore(target=abstract(make_state(mesh)))


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state, {"step": 3})
    # What a crash mid-save of step 5 leaves behind: an uncommitted orbax tmp directory.
    for name in ("5.orbax-checkpoint-tmp-1712345678", "5.orbax-checkpoint-tmp"):
        partial = tmp_path / name / "state"
        partial.mkdir(parents=True)
        (partial / "garbage").write_bytes(b"half written")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [3]
        restored, meta = ckpt.restore(target=abstract(state))
        assert meta == {"step": 3} and host_bytes(restored) == host_bytes(state)
        assert ckpt.save(5, scale_params(state, 2.0), {"step": 5})  # the leftover does not block
        ckpt.wait()
        assert ckpt.latest_step() == 5
        assert ckpt.restore_meta() == {"step": 5}


# --- finiteness guard


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_params_refused(tmp_path, mesh, bad, caplog):
    state = make_state(mesh)
    assert params_finite(state)
    kernel = state["params"]["out"]["kernel"]
    poisoned = {**state, "params": jax.tree.map(lambda x: x, state["params"])}
    poisoned["params"]["out"]["kernel"].value = kernel[...].at[7, 1].set(bad)  # one element of 16
    assert not params_finite(poisoned)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(1, poisoned, {}) is False
        assert ckpt.latest_step() is None
    assert "NaN/inf" in caplog.text
    # Only params are checked: an optimizer state may legitimately hold inf.
    assert params_finite({"params": state["params"], "best": jnp.array(jnp.inf)})


def test_restore_target_without_sharding_is_an_error(tmp_path, mesh):
    state = make_state(mesh)
    target = abstract(state)
    target["step"] = jax.ShapeDtypeStruct((), jnp.int32)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {})
        with pytest.raises(ValueError, match=r"\['step'\] has no sharding"):
            ckpt.restore(target=target)


# --- preemption


def _wait_for(predicate, timeout=2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_preemption_guard_sets_flag_and_restores_handler():
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: calls.append(s))
    try:
        with PreemptionGuard() as guard:
            assert not guard.requested and not guard.should_stop()
            os.kill(os.getpid(), signal.SIGTERM)
            assert _wait_for(lambda: guard.requested)  # and the process is still alive
            assert guard.signal_received == signal.SIGTERM and guard.should_stop()
            assert calls == []
        os.kill(os.getpid(), signal.SIGTERM)  # the handler from before the guard is back
        assert _wait_for(lambda: calls == [signal.SIGTERM])
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_preemption_guard_sigint_and_manual_request():
    before = signal.getsignal(signal.SIGINT)
    with PreemptionGuard(signals=(signal.SIGTERM, signal.SIGINT)) as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert _wait_for(lambda: guard.requested) and guard.signal_received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C still aborts
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)
    assert signal.getsignal(signal.SIGINT) is before
    manual = PreemptionGuard()
    assert not manual.requested
    manual.request()
    assert manual.requested and manual.signal_received is None


# A tiny training loop: numpy "data iterator" state in meta, jax key in the state, checkpoint every
# EVERY steps and on SIGTERM at the next step boundary. Prints the final params' bytes.
LOOP = r'''
import sys, time
import jax, jax.numpy as jnp, numpy as np, optax
from vlm_jax.checkpoint import Checkpointer, PreemptionGuard

workdir, total, every, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
opt = optax.adam(0.05)

@jax.jit
def train_step(state, x):
    key, sub = jax.random.split(state["key"])
    noise = 0.01 * jax.random.normal(sub, x.shape[:1])
    loss = lambda w: jnp.mean((x @ w - 1.0 - noise) ** 2)
    updates, opt_state = opt.update(jax.grad(loss)(state["params"]), state["opt_state"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
            "key": key}

params = jnp.linspace(-1.0, 1.0, 3)
state = {"params": params, "opt_state": opt.init(params), "key": jax.random.key(0)}
data = np.random.default_rng(123)
done = 0
with Checkpointer(workdir, keep=2) as ckpt, PreemptionGuard() as guard:
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(target=state)
        done = meta["step"]
        data.bit_generator.state = meta["data"]
        print("resumed from", done, flush=True)
    while done < total:
        state = train_step(state, jnp.asarray(data.standard_normal((5, 3)), jnp.float32))
        done += 1
        print("step", done, flush=True)
        time.sleep(pause)
        if done % every == 0 or guard.should_stop():
            ckpt.save(done, state, {"step": done, "data": data.bit_generator.state})
        if guard.should_stop():
            print("preempted at", done, flush=True)
            sys.exit(0)
print("final", np.asarray(state["params"]).tobytes().hex(), flush=True)
'''


def _loop(tmp_path: Path, workdir: Path, pause: float, log_name: str) -> subprocess.Popen:
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.Popen(
        [sys.executable, str(script), str(workdir), "10", "4", str(pause)], env=env, text=True,
        stdout=subprocess.PIPE, stderr=(tmp_path / log_name).open("w"))


def _finish(proc: subprocess.Popen, tmp_path: Path, log_name: str) -> str:
    out, _ = proc.communicate(timeout=60)
    stderr = (tmp_path / log_name).read_text()[-3000:]
    assert proc.returncode == 0, f"rc={proc.returncode}\n{out}\n{stderr}"
    return out


def _final(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("final ")]
    assert len(lines) == 1, out
    return lines[0].split()[1]


def test_sigterm_saves_exits_zero_and_resume_is_bitwise(tmp_path):
    ref = _loop(tmp_path, tmp_path / "ref", 0.0, "ref.log")
    reference = _final(_finish(ref, tmp_path, "ref.log"))

    workdir = tmp_path / "run"
    proc = _loop(tmp_path, workdir, 0.3, "run.log")
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.strip() == "step 3":
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(seen) + _finish(proc, tmp_path, "run.log")
    assert "final" not in out, out
    stopped = int(out.split("preempted at")[1].split()[0])
    assert 3 <= stopped < 10
    with Checkpointer(workdir) as ckpt:  # saved at the step boundary, even though 3 % 4 != 0
        assert ckpt.latest_step() == stopped
        assert ckpt.restore_meta()["step"] == stopped

    out = _finish(_loop(tmp_path, workdir, 0.0, "resume.log"), tmp_path, "resume.log")
    assert out.splitlines()[0] == f"resumed from {stopped}"
    assert _final(out) == reference


# --- damaged checkpoints and failing writes


def _truncate_largest_array_file(step_dir) -> None:
    """Halves the largest array data file (orbax merges the per-process OCDBT databases into
    ``state/d/`` when a save commits; restores read from there). A local path or a bucket's
    (`etils.epath`): objects cannot be truncated in place, so the file is rewritten."""
    victim = max((step_dir / "state" / "d").iterdir(), key=lambda p: len(p.read_bytes()))
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])


def _half_written(step_dir) -> None:
    """What a save killed mid-write leaves where a step is not renamed into place (a filesystem
    without atomic renames, or a bucket, where orbax writes a step in place): the step under its
    final name, its metadata item missing, the array data not yet there, no `commit_success.txt`."""
    paths.rmtree(step_dir / "meta")
    for data in (step_dir / "state").glob("ocdbt.process_*"):
        paths.rmtree(data)
    (step_dir / "commit_success.txt").unlink()


DAMAGE = {
    "truncated_array_file": _truncate_largest_array_file,
    "meta_removed": lambda d: (d / "meta" / "metadata").unlink(),
    "array_manifest_removed": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "half_written": _half_written,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_restore_newest_skips_a_damaged_latest_step(tmp_path, mesh, damage, caplog):
    state = make_state(mesh)
    with Checkpointer(tmp_path, keep=3, async_save=False) as ckpt:
        for step in (2, 4, 6):
            ckpt.save(step, scale_params(state, float(step)), {"step": step})
    DAMAGE[damage](tmp_path / "6")
    targets = []
    with Checkpointer(tmp_path, keep=3) as ckpt:
        assert ckpt.all_steps() == [2, 4, 6]  # orbax still lists the damaged step
        step, restored, meta = ckpt.restore_newest(lambda m: targets.append(m) or abstract(state))
        assert (step, meta) == (4, {"step": 4})
        assert host_bytes(restored) == host_bytes(scale_params(state, 4.0))
        assert "checkpoint step 6" in caplog.text and "does not restore" in caplog.text
        # the damaged step is set aside (kept for inspection), so step 6 can be written again
        assert ckpt.all_steps() == [2, 4]
        assert ckpt.save(6, scale_params(state, 7.0), {"step": 66})
        ckpt.wait()
        assert ckpt.restore_meta(6) == {"step": 66}
    assert (tmp_path / "6.damaged").is_dir()
    with Checkpointer(tmp_path, keep=3) as ckpt:
        assert ckpt.restore_newest(lambda m: abstract(state))[0] == 6


def test_restore_newest_with_every_step_damaged_raises_instead_of_starting_over(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path, keep=3, async_save=False) as ckpt:
        assert ckpt.restore_newest(lambda m: abstract(state)) is None  # empty: a fresh run
        for step in (2, 4):
            ckpt.save(step, state, {"step": step})
    _truncate_largest_array_file(tmp_path / "4")
    (tmp_path / "2" / "meta" / "metadata").unlink()
    with Checkpointer(tmp_path, keep=3) as ckpt:
        with pytest.raises(CheckpointDamagedError, match=r"no checkpoint in .* restores: step 4: .*; step 2: "):
            ckpt.restore_newest(lambda m: abstract(state))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "4"]  # nothing renamed or deleted


@contextlib.contextmanager
def disk_full(limit_bytes: int = 4096):
    """Writes past `limit_bytes` fail with EFBIG ("File too large") in this process, as on a full
    disk (RLIMIT_FSIZE; SIGXFSZ ignored so the write returns an error instead of killing us)."""
    import resource
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


@pytest.mark.parametrize("async_save", [False, True])
def test_failing_write_is_reported_and_previous_checkpoint_stays_restorable(tmp_path, mesh, async_save):
    state = make_state(mesh)
    big = {**state, "params": jax.tree.map(lambda x: jnp.tile(x, (64,) + (1,) * (x.ndim - 1)),
                                           state["params"])}
    target = abstract(big)
    ckpt = Checkpointer(tmp_path, keep=1, async_save=async_save)
    ckpt.save(3, big, {"step": 3})
    ckpt.wait()
    with pytest.raises(CheckpointWriteError) as err, disk_full():
        ckpt.save(5, scale_params(big, 2.0), {"step": 5})
        ckpt.wait()  # an async save fails here (or in the next save)
    ckpt._manager.close()
    message = str(err.value)
    assert f"writing checkpoint step 5 to {tmp_path} failed" in message
    assert "File too large" in message and "the newest intact checkpoint is step 3" in message
    with Checkpointer(tmp_path, keep=1) as again:  # keep=1 did not delete step 3 for the failed 5
        assert again.all_steps() == [3]
        step, restored, meta = again.restore_newest(lambda m: target)
        assert (step, meta) == (3, {"step": 3}) and host_bytes(restored) == host_bytes(big)

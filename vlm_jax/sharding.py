"""Mesh construction and logical-axis sharding.

Parameters carry logical axis names (`vocab`, `embed`, `heads`, ...); one rules table (in the config)
maps each name to a mesh axis (or several, or None). Batches shard over (`data`, `fsdp`).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, Any]]

log = logging.getLogger(__name__)


def make_mesh(mesh_cfg=None, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh from a `MeshConfig`-like object (None: all devices on `data`)."""
    from vlm_jax.config import MeshConfig

    devices = jax.devices() if devices is None else list(devices)
    shape = (mesh_cfg or MeshConfig()).shape(len(devices))
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def default_rules() -> tuple:
    from vlm_jax.config import LOGICAL_AXIS_RULES  # the one rules table lives with the config

    return tuple(LOGICAL_AXIS_RULES)


def logical_to_spec(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules | None = None
) -> P:
    """PartitionSpec for one array. A dim whose size the mesh axes do not divide, or a mesh axis
    already used by an earlier dim, stays replicated (logged once per name)."""
    table = dict(default_rules() if rules is None else rules)
    used: set[str] = set()
    out = []
    for name, size in zip(names, shape):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1 and a not in used)
        n = math.prod(mesh.shape[a] for a in axes)
        if axes and size % n:
            log.info("dim %s of size %d is not divisible by mesh axes %s; replicated", name, size, axes)
            axes = ()
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def param_specs(abstract_state: nnx.State, mesh: Mesh, rules: Rules | None = None) -> nnx.State:
    """PartitionSpecs for an abstract (eval_shape) parameter state, from its logical axis names."""

    def spec(var):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        return logical_to_spec(names, var.shape, mesh, rules)

    return jax.tree.map(spec, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Rules | None = None) -> nnx.State:
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s),
        param_specs(abstract_state, mesh, rules),
        is_leaf=lambda x: isinstance(x, P),
    )


def batch_spec(ndim: int, batch_axis: int = 0) -> P:
    spec = [None] * ndim
    spec[batch_axis] = ("data", "fsdp")
    return P(*spec)


def batch_constraint(mesh: Mesh | None):
    """A function that pins an array's leading (batch) dim to the batch axes (data, fsdp) inside a
    jit, the rest replicated; identity without a mesh or when the axes do not divide the batch."""
    if mesh is None or mesh.shape["data"] * mesh.shape["fsdp"] == 1:
        return lambda x: x
    n = mesh.shape["data"] * mesh.shape["fsdp"]

    def constrain(x):
        if x.ndim == 0 or x.shape[0] % n:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, batch_spec(x.ndim)))

    return constrain


def shard_batch(tree, mesh: Mesh, batch_axis_of=lambda path, x: 0, *, local: bool = False):
    """Places numpy arrays on the mesh, batch dim over (data, fsdp) when it divides, else replicated.

    Default: each array is the global value, the same on every process; each process fills only its
    own devices' slices (no cross-process copy or equality check, so it works with several processes).
    `local=True`: each array holds only this process's rows (`process_rows`, in that order; every
    process the same number), and the global array is made of every process's rows; arrays without
    a batch dim (scalars) must be the same on every process. With one process both are the same."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    procs = jax.process_count() if local else 1

    def put(path, x):
        x = np.asarray(x)
        axis = batch_axis_of(path, x)
        rows = None if axis is None or x.ndim == 0 else x.shape[axis] * procs
        if rows is None or rows % n:
            if procs > 1 and rows is not None:
                raise ValueError(f"{jax.tree_util.keystr(path) or 'array'}: {rows} rows over {procs} "
                                 f"processes do not split over the {n} batch shards of the mesh")
            spec = P()
        else:
            spec = batch_spec(x.ndim, axis)
        sharding = NamedSharding(mesh, spec)
        if procs > 1 and rows is not None:
            shape = x.shape[:axis] + (rows,) + x.shape[axis + 1:]
            return jax.make_array_from_process_local_data(sharding, x, shape)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map_with_path(put, tree)


def row_owners(mesh: Mesh | None, n: int, *, process_of=lambda device: device.process_index,
               process_count: int | None = None) -> list[np.ndarray]:
    """For each process, the rows (ascending) of a batch of `n` rows split over the mesh's batch axes
    that its devices hold: where `shard_batch(local=True)` puts a process's rows, in their order
    (`jax.make_array_from_process_local_data` maps local rows onto the process's slices in
    increasing order). Blocks need not be contiguous (a TPU slice's device order can interleave
    hosts); every process must hold the same number of rows (else ValueError)."""
    count = jax.process_count() if process_count is None else process_count
    if mesh is None or count == 1:
        return [np.arange(n)]
    rows = [set() for _ in range(count)]
    for device, index in NamedSharding(mesh, batch_spec(1)).devices_indices_map((n,)).items():
        rows[process_of(device)].update(range(*index[0].indices(n)))
    out = [np.asarray(sorted(r), np.int64) for r in rows]
    if len({len(r) for r in out}) != 1:
        raise ValueError(f"the mesh splits a batch of {n} rows unevenly over the processes "
                         f"({[len(r) for r in out]} rows)")
    return out


def process_rows(mesh: Mesh | None, n: int) -> np.ndarray:
    """This process's rows of a batch of `n` rows split over the mesh (see `row_owners`): all of
    them for one process."""
    return row_owners(mesh, n)[jax.process_index()]


def gather_rows(x, mesh: Mesh | None) -> np.ndarray:
    """The whole batch from every process's rows (a collective): `x` (numpy, the same shape on every
    process) holds this process's rows in `process_rows` order; the result is in global row order.
    `x` itself with one process."""
    x = np.asarray(x)
    count = jax.process_count()
    if count == 1:
        return x
    return assemble_rows(allgather(x), row_owners(mesh, x.shape[0] * count))


def assemble_rows(parts, owners: list[np.ndarray]) -> np.ndarray:
    """The batch whose rows `owners[p]` are `parts[p]` (every process's rows, see `row_owners`)."""
    parts = [np.asarray(part) for part in parts]
    out = np.empty((sum(len(r) for r in owners),) + parts[0].shape[1:], parts[0].dtype)
    for rows, part in zip(owners, parts, strict=True):
        out[rows] = part
    return out


def allgather(x) -> np.ndarray:
    """`x` of every process stacked in process order (a collective; `x[None]` with one process)."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def agree_max(*values: int) -> tuple[int, ...]:
    """Each value's maximum over all processes (a collective; the values themselves with one
    process): e.g. the padded length or patch bucket every process must use for one global array."""
    if jax.process_count() == 1:
        return tuple(int(v) for v in values)
    got = allgather(np.asarray(values, np.int64))
    return tuple(int(v) for v in got.max(axis=0))


def gather_json(obj) -> list:
    """`obj` (JSON-serialisable) of every process, in process order (a collective); `[obj]` with one
    process. For small host state, e.g. data iterator positions."""
    import json

    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = allgather(np.asarray(len(data), np.int64))
    padded = allgather(np.pad(data, (0, int(sizes.max()) - len(data))))
    return [json.loads(bytes(row[:size]).decode()) for row, size in zip(padded, sizes)]


def to_host(tree):
    """Numpy copies of a tree of arrays; arrays spread over several processes are gathered (a
    collective: every process must call it)."""
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)


def to_memory(tree, kind: str):
    """`tree` with every array moved to memory `kind` of its own devices ("pinned_host": the hosts'
    RAM, e.g. the KL reference between its uses; "device": back to the accelerator), keeping
    its sharding otherwise. Arrays already there are not copied."""
    def put(x):
        sh = x.sharding
        return x if sh.memory_kind == kind else jax.device_put(x, sh.with_memory_kind(kind))

    return jax.tree.map(put, tree)


# ------------------------------------------------------------------------------------------------
# multi-process start-up and failure propagation
# ------------------------------------------------------------------------------------------------

# JAX's coordination service (started by `jax.distributed.initialize`) already ends the job when a
# process dies: every process heartbeats to it, and a process silent for `heartbeat_timeout_s` is
# declared dead; the service then reports the error to every other process, which terminates
# (exit code 134, "The following tasks are unhealthy (stopped sending heartbeats): <ids>"). When
# the coordinator process (0) itself dies the others terminate at once ("Failed to send RPC to
# coordination service ... the leader task was preempted/died").
#
# A process that *raises* is still alive: its exit would run JAX's shutdown barrier (waiting up to
# `shutdown_timeout_s` for peers blocked in a collective) and the peers would only learn that the
# barrier failed, not why. So `fail_job` publishes the error in the coordination service's
# key-value store and exits at once, skipping that barrier; `watch_for_failures` (a thread in each
# process) reads it and ends its process with the same message. The heartbeat stays the backstop.

FAILURE_KEY = "vlm_jax/failure"
FAILURE_SEEN_KEY = "vlm_jax/failure_seen/"
HEARTBEAT_TIMEOUT_S = 100  # JAX's defaults; `python -m vlm_jax.train --heartbeat_timeout=...`
SHUTDOWN_TIMEOUT_S = 300
INITIALIZATION_TIMEOUT_S = 300
_ACK_WAIT_S = 5.0  # how long process 0 (which hosts the service) waits for peers to see a failure
_POLL_S = 1.0  # how often each process asks the coordination service for a published failure
_failure_lock = None
_heartbeat_timeout_s = HEARTBEAT_TIMEOUT_S  # this job's, set by `initialize_distributed`
# What a host collective (gloo) raises when a peer process is gone (exited or killed).
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer")


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
    shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S,
    initialization_timeout_s: int = INITIALIZATION_TIMEOUT_S,
) -> None:
    """`jax.distributed.initialize` with explicit timeouts (all None: TPU auto-detection), then
    starts `watch_for_failures`. Explicit addresses (CPU/GPU clusters) use gloo CPU collectives."""
    if coordinator_address is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=int(initialization_timeout_s),
        heartbeat_timeout_seconds=int(heartbeat_timeout_s),
        shutdown_timeout_seconds=int(shutdown_timeout_s),
    )
    global _heartbeat_timeout_s
    _heartbeat_timeout_s = int(heartbeat_timeout_s)
    log.info("process %d of %d joined (heartbeat timeout %ds)", jax.process_index(), jax.process_count(),
             heartbeat_timeout_s)
    watch_for_failures()


def _client():
    from jax._src import distributed  # the runtime client jax.distributed.initialize created

    return distributed.global_state.client


def watch_for_failures() -> None:
    """A daemon thread that ends this process (exit 1, the failure on stderr) as soon as another
    process publishes a failure with `fail_job`. Nothing for a single process. It polls the
    coordination service every `_POLL_S` and is stopped (joined) at interpreter exit, before JAX
    shuts the distributed runtime down, so no call of it is in flight then."""
    import atexit
    import threading

    global _failure_lock
    client = _client()
    if client is None or jax.process_count() == 1:
        return
    _failure_lock = threading.Lock()
    me = jax.process_index()
    stop = threading.Event()

    def watch():
        while not stop.wait(_POLL_S) and _client() is not None:  # None: jax.distributed.shutdown ran
            try:
                message = client.key_value_try_get(FAILURE_KEY)
            except Exception:  # noqa: BLE001 - no failure published (NOT_FOUND) or no service now
                continue
            _end_process(client, me, message, code=1, publish=False)

    thread = threading.Thread(target=watch, name="vlm_jax-failure-watch", daemon=True)
    thread.start()

    def stop_watching():
        stop.set()
        thread.join(timeout=10)

    atexit.register(stop_watching)  # runs before jax's own exit hook (registered earlier)


def fail_job(exc: BaseException, code: int = 1, *, show_traceback: bool = True) -> None:
    """Ends this process (exit `code`) after telling every other process why, so none of them waits
    in a collective for it. Single process: returns and the caller reports normally."""
    client = _client()
    if client is None or jax.process_count() == 1:
        return
    import sys
    import traceback

    if show_traceback:
        traceback.print_exception(exc, file=sys.stderr)
    me = jax.process_index()
    message = f"process {me} of {jax.process_count()} failed: {type(exc).__name__}: {exc}"
    if any(s in str(exc) for s in _PEER_LOST):
        _await_cause(client)
    _end_process(client, me, message, code=code, publish=True)


def _await_cause(client) -> None:
    """This process failed only because a peer is gone (a host collective lost its connection): wait
    for the cause - the peer's published failure (reported by `_end_process`, or the failure watcher
    ends this process with it) or, for a peer that died without a word, the coordination service's
    heartbeat verdict naming it (JAX then ends this process) - up to the heartbeat timeout."""
    import time

    deadline = time.monotonic() + _heartbeat_timeout_s + _ACK_WAIT_S
    while time.monotonic() < deadline:
        try:
            if client.key_value_try_get(FAILURE_KEY):
                return
        except Exception:  # noqa: BLE001 - nothing published yet (NOT_FOUND)
            pass
        time.sleep(_POLL_S / 4)


def _end_process(client, me: int, message: str, *, code: int, publish: bool) -> None:
    import os
    import sys
    import time

    if _failure_lock is not None and not _failure_lock.acquire(blocking=False):
        time.sleep(3600)  # another thread of this process is already ending it
    if publish:
        try:
            client.key_value_set(FAILURE_KEY, message)
        except Exception:  # noqa: BLE001 - another process failed first (key taken) or no service
            try:
                first = client.key_value_try_get(FAILURE_KEY)
            except Exception:  # noqa: BLE001 - no service any more
                first = None
            if first and first != message:
                # Another process failed first and this one only failed after it (typically a host
                # collective whose peer had just exited): the first failure is the cause to report.
                print(f"process {me}: {message.split(': ', 1)[-1]} (after another process failed)",
                      file=sys.stderr, flush=True)
                message, publish = first, False
    what = "stopping the job" if publish else f"stopping process {me} too"
    print(f"error: {message}; {what}", file=sys.stderr, flush=True)
    try:
        client.key_value_set(FAILURE_SEEN_KEY + str(me), "1")
    except Exception:  # noqa: BLE001 - no service any more
        pass
    if me == 0:  # the coordination service lives here: give the others time to read the failure
        deadline = time.monotonic() + _ACK_WAIT_S
        for pid in range(1, jax.process_count()):
            left = int(1000 * (deadline - time.monotonic()))
            if left <= 0:
                break
            try:
                client.blocking_key_value_get(FAILURE_SEEN_KEY + str(pid), left)
            except Exception:  # noqa: BLE001 - a dead or failing process never acknowledges
                pass
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)  # skip JAX's shutdown barrier: the peers are not coming

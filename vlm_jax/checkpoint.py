"""Checkpointing (orbax) and preemption handling for the trainer.

One checkpoint per step directory holds two items:

* ``state``: the array pytree (params as an ``nnx.State``, optax state, typed or raw PRNG keys,
  ...), saved with ``StandardSave`` and restored with ``StandardRestore`` straight into the
  shardings of a target tree, so a 7B state never gathers on one device.
* ``meta``: a JSON document with host-side metadata (global step, stage, stage step, data-iterator
  state, numpy RNG state, counters). ``bytes`` and numpy arrays are encoded as tagged base64 objects
  (see :func:`encode_meta`) because grain iterator states may be bytes.

Saves are asynchronous (the device-to-host copy happens before :meth:`Checkpointer.save` returns, so
the trainer may donate the state right after) and atomic: orbax writes into
``<step>.orbax-checkpoint-tmp*`` and renames on commit, and ignores such directories when listing
steps, so a crash mid-save leaves the previous checkpoints intact. The last ``keep`` steps are kept.

Damage: :meth:`Checkpointer.restore_newest` resumes from the newest step that restores completely
(array state and metadata); a newer step that does not (truncated file, removed metadata, a
half-written directory) is logged, renamed to ``<step>.damaged`` (kept for inspection, no longer a
step) and skipped. It raises :class:`CheckpointDamagedError` when every step is damaged, rather
than silently starting from scratch. A save that fails (disk full, permission) raises
:class:`CheckpointWriteError` naming the step and the newest intact step, which stays restorable.

Preemption: :class:`PreemptionGuard` turns SIGTERM into a flag; the trainer checks it at each step
boundary, saves and exits 0. See its docstring for multi-host use.
"""
from __future__ import annotations

import base64
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from types import FrameType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vlm_jax import paths

log = logging.getLogger(__name__)

PyTree = Any
Meta = dict[str, Any]

STATE_ITEM = "state"
META_ITEM = "meta"
BYTES_TAG = "__bytes_b64__"
NDARRAY_TAG = "__ndarray_b64__"
_RESERVED_KEYS = (BYTES_TAG, NDARRAY_TAG)
DAMAGED_SUFFIX = ".damaged"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message names the step, the cause and the newest
    intact step."""


class CheckpointDamagedError(RuntimeError):
    """Every checkpoint in a directory fails to restore; the message names each step and why."""


# --- metadata <-> JSON


def encode_meta(meta: Mapping[str, Any]) -> Meta:
    """A JSON-safe copy of ``meta``; raises TypeError naming the first unsupported value's key path.

    Supported: dict (str keys), list/tuple (tuples come back as lists), str, bool, int (any size),
    float, None, numpy scalars (as Python scalars), ``bytes``/``bytearray`` (as
    ``{BYTES_TAG: base64}``) and numpy arrays (as ``{NDARRAY_TAG: base64, "dtype", "shape"}``).
    """
    if not isinstance(meta, Mapping):
        raise TypeError(f"checkpoint meta must be a dict, got {type(meta).__name__}")
    return _encode(meta, "meta")


def _encode(value: Any, path: str) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.generic) and not isinstance(value, (np.void, np.object_)):
        return value.item()
    if isinstance(value, (bytes, bytearray)):
        return {BYTES_TAG: base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"checkpoint meta {path}: numpy array of dtype {value.dtype} is not "
                            "supported (bool/int/uint/float only)")
        data = base64.b64encode(np.ascontiguousarray(value).tobytes()).decode("ascii")
        return {NDARRAY_TAG: data, "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"checkpoint meta {path}: key {key!r} is not a str")
            if key in _RESERVED_KEYS:
                raise ValueError(f"checkpoint meta {path}: key {key!r} is reserved for encoding")
            out[key] = _encode(item, f"{path}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_encode(item, f"{path}[{i}]") for i, item in enumerate(value)]
    raise TypeError(f"checkpoint meta {path}: value of type {type(value).__name__} is not "
                    "JSON-serialisable (use dict/list/str/int/float/bool/None/bytes/np.ndarray)")


def decode_meta(doc: Mapping[str, Any]) -> Meta:
    """Inverse of :func:`encode_meta` (tagged objects back to ``bytes`` / numpy arrays)."""
    return _decode(doc)


def _decode(value: Any) -> Any:
    if isinstance(value, Mapping):
        if BYTES_TAG in value:
            return base64.b64decode(value[BYTES_TAG])
        if NDARRAY_TAG in value:
            raw = base64.b64decode(value[NDARRAY_TAG])
            flat = np.frombuffer(raw, dtype=np.dtype(value["dtype"]))
            return flat.reshape(value["shape"]).copy()
        return {key: _decode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item) for item in value]
    return value


# --- finiteness guard


def _params_of(state: PyTree) -> PyTree:
    """The parameter subtree checked for finiteness: ``state["params"]`` or ``state.params`` when
    present, else the whole state. Optimizer states may legitimately hold inf (e.g. a best-so-far
    loss), so they are not checked."""
    if isinstance(state, Mapping) and "params" in state:
        return state["params"]
    if hasattr(state, "params"):
        return state.params
    return state


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    """One scalar: every element of every leaf is finite (a fused reduction, one host sync)."""
    ok = jnp.array(True)
    for leaf in leaves:
        ok = ok & jnp.all(jnp.isfinite(leaf))
    return ok


def params_finite(state: PyTree) -> bool:
    """True when every floating-point parameter of ``state`` is finite (see :func:`_params_of`)."""
    leaves = [x for x in jax.tree.leaves(_params_of(state))
              if isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return True
    ok = _all_finite(leaves)
    # The reduced scalar is replicated; read the local copy (works when not fully addressable).
    return bool(np.asarray(ok.addressable_data(0)))


# --- restore target


def _restore_target(target: PyTree) -> PyTree:
    """``target`` with every jax array replaced by a ``ShapeDtypeStruct`` carrying its sharding.

    ``ShapeDtypeStruct`` leaves must carry a sharding (orbax would otherwise put the array on one
    device); numpy leaves restore as numpy arrays.
    """
    def convert(path, leaf):
        if isinstance(leaf, jax.Array):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
            raise ValueError(f"restore target leaf {jax.tree_util.keystr(path)} has no sharding; "
                             "build the target with jax.eval_shape of the jitted, sharded init "
                             "or pass ShapeDtypeStruct(..., sharding=...)")
        return leaf

    return jax.tree_util.tree_map_with_path(convert, target)


# --- checkpointer


class Checkpointer:
    """Async, atomic, keep-last-N checkpoints of (array state, JSON metadata) under ``directory``.

    Every process of a multi-host job must make the same calls (orbax synchronises them).

    Example::

        with Checkpointer(workdir / "checkpoints", keep=3) as ckpt:
            if (step := ckpt.latest_step()) is not None:
                state, meta = ckpt.restore(step, target=abstract_state)
            ...
            ckpt.save(step, state, {"stage": 1, "data": it.get_state()})
    """

    def __init__(self, directory: epath.PathLike, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep={keep} must be >= 1")
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(STATE_ITEM, META_ITEM))
        self._in_flight: int | None = None  # step of the last save started (async: maybe unwritten)

    @contextlib.contextmanager
    def _write_errors(self, step: int):
        """Turns an orbax/filesystem failure while writing ``step`` (or the async save before it,
        whose error surfaces in the next call) into a CheckpointWriteError."""
        try:
            yield
        except Exception as err:  # OSError, tensorstore ValueError, ...
            previous, self._in_flight = self._in_flight, None
            intact = self._steps_on_disk()
            failed = previous if previous is not None and previous not in intact else step
            newest = (f"the newest intact checkpoint is step {intact[-1]}" if intact
                      else "there is no earlier checkpoint")
            raise CheckpointWriteError(
                f"writing checkpoint step {failed} to {self.directory} failed: {type(err).__name__}: "
                f"{_first_line(err)}; {newest}") from err

    def _steps_on_disk(self) -> list[int]:
        """Committed steps as orbax lists them from the directory now (not its cached list)."""
        try:
            self._manager.reload()
            return sorted(self._manager.all_steps())
        except Exception:  # noqa: BLE001 - only used to word an error message
            return []

    def save(self, step: int, state: PyTree, meta: Mapping[str, Any], *,
             force: bool = False) -> bool:
        """Start saving ``state`` and ``meta`` as ``step``; True when a save was started.

        Refused (warning, False): non-finite parameters; a step that is not newer than the latest
        saved step, unless ``force`` (which replaces a checkpoint of the same step). Raises
        TypeError for metadata that is not JSON-serialisable, before anything is written.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
        step = int(step)
        doc = encode_meta(meta)
        if not params_finite(state):
            log.warning("not saving step %d to %s: parameters contain NaN/inf",
                        step, self.directory)
            return False
        latest = self._manager.latest_step()
        if latest is not None and step <= latest:
            if not force:
                log.warning("not saving step %d to %s: latest saved step is %d (use force=True)",
                            step, self.directory, latest)
                return False
            if step in self._manager.all_steps():
                self._manager.wait_until_finished()
                self._manager.delete(step)
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                     META_ITEM: ocp.args.JsonSave(doc)})
        # Our own checks above decide; orbax's interval policy must not skip the save. A failure
        # of the previous async save surfaces here too (orbax waits for it first).
        with self._write_errors(step):
            started = bool(self._manager.save(step, args=args, force=True))
        if started:
            self._in_flight = step
        return started

    def all_steps(self) -> list[int]:
        """Saved steps, ascending (including a save still in flight)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step (including a save still in flight), or None when there is none."""
        return self._manager.latest_step()

    def restore(self, step: int | None = None, *, target: PyTree) -> tuple[PyTree, Meta]:
        """``(state, meta)`` of ``step`` (default: the latest), bitwise equal to what was saved.

        ``target`` is the abstract state (``jax.ShapeDtypeStruct`` leaves with ``.sharding``) or a
        concrete state; arrays are read directly into its shardings and its tree structure.
        """
        step = self._resolve_step(step)
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(_restore_target(target)),
                                     META_ITEM: ocp.args.JsonRestore()})
        restored = self._manager.restore(step, args=args)
        return restored[STATE_ITEM], decode_meta(restored[META_ITEM])

    def restore_meta(self, step: int | None = None) -> Meta:
        """Only the metadata of ``step`` (default: latest), e.g. to pick the stage before building
        the abstract state."""
        step = self._resolve_step(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{META_ITEM: ocp.args.JsonRestore()}))
        return decode_meta(restored[META_ITEM])

    def restore_newest(self, target_for: Callable[[Meta], PyTree], *,
                       set_aside: bool = True) -> tuple[int, PyTree, Meta] | None:
        """``(step, state, meta)`` of the newest step that restores completely, or None when there
        is no checkpoint. ``target_for(meta)`` gives the restore target for that step's metadata.

        A newer step that fails to restore is logged and, with ``set_aside`` (for a run that will
        write that step again), renamed ``<step>.damaged``; read-only users (export, evaluation)
        pass False. Raises :class:`CheckpointDamagedError` when every step fails.
        Multi-host: collective; all processes agree on each step (one failing reader fails it).
        """
        self.wait()
        damaged: list[tuple[int, str]] = []
        found = None
        for step in reversed(self.all_steps()):
            try:
                meta = self.restore_meta(step)
                state, meta = self.restore(step, target=target_for(meta))
                error = None
            except Exception as err:  # noqa: BLE001 - any reader error means "not restorable"
                error = f"{type(err).__name__}: {_first_line(err)}"
            error = _agree(error)
            if error is None:
                found = (step, state, meta)
                break
            log.warning("checkpoint step %d in %s does not restore (%s): skipping it", step, self.directory, error)
            damaged.append((step, error))
        if damaged and found is None:
            raise CheckpointDamagedError(
                f"no checkpoint in {self.directory} restores: "
                + "; ".join(f"step {s}: {e}" for s, e in damaged)
                + ". Move the directory away to start from scratch.")
        if damaged and set_aside:
            self._quarantine([s for s, _ in damaged])
            log.warning("resuming from step %d of %s instead (damaged steps renamed *%s)",
                        found[0], self.directory, DAMAGED_SUFFIX)
        return found

    def _quarantine(self, steps: list[int]) -> None:
        """Renames damaged step directories so orbax no longer lists them (process 0 renames)."""
        if jax.process_index() == 0:
            for step in steps:
                src = self.directory / str(step)
                dst = self.directory / f"{step}{DAMAGED_SUFFIX}"
                n = 1
                while dst.exists():
                    n += 1
                    dst = self.directory / f"{step}{DAMAGED_SUFFIX}{n}"
                paths.move_tree(src, dst)  # a bucket has no folder rename: copied, then removed
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("vlm_jax_checkpoint_quarantine")
        paths.forget_listings(self.directory)  # a bucket: the other processes' cached listings are stale
        self._manager.reload()

    def _resolve_step(self, step: int | None) -> int:
        self.wait()  # a step still in flight is not readable yet
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                    f"saved steps: {steps}")
        return step

    def wait(self) -> None:
        """Block until every started save is committed; CheckpointWriteError if one failed."""
        with self._write_errors(self._in_flight if self._in_flight is not None else -1):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release orbax's resources (CheckpointWriteError if a save
        failed; the resources are released either way)."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:500] if text else repr(err)


def _agree(error: str | None) -> str | None:
    """``error`` of this process, or of the first process that had one (collective when several
    processes run): a step restores only if it restores everywhere."""
    if jax.process_count() == 1:
        return error
    from jax.experimental import multihost_utils
    failed = multihost_utils.process_allgather(np.array([error is not None]))
    if error is None and np.any(failed):
        return f"failed to restore on process {int(np.argmax(failed))}"
    return error


# --- preemption


class PreemptionGuard:
    """Context manager that turns SIGTERM (and optionally SIGINT) into a flag.

    The handler only records the signal; the trainer checks :meth:`should_stop` (or
    :attr:`requested`) at each step boundary, saves a checkpoint and exits 0. The previous handlers
    are restored on exit. A second SIGINT raises KeyboardInterrupt, so a person at a terminal can
    still abort a stuck run.

    Multi-host: on a TPU preemption every host receives SIGTERM, but not at the same moment, so
    processes could see the flag at different steps and then save different steps (a hang).
    :meth:`should_stop` therefore combines the flags of all processes (any-reduce); it is a
    collective: every process must call it at the same step boundaries. With one process it is just
    the local flag.
    """

    def __init__(self, signals: Iterable[signal.Signals] = (signal.SIGTERM,)):
        self._signals = tuple(signal.Signals(s) for s in signals)
        if not self._signals:
            raise ValueError("PreemptionGuard needs at least one signal")
        self._previous: dict[signal.Signals, Any] = {}
        self._received: signal.Signals | None = None
        self._manual = False

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered in the main thread "
                               "(Python only delivers signals there)")
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if sig == signal.SIGINT and self._received == signal.SIGINT:
            raise KeyboardInterrupt
        self._received = sig
        log.warning("received %s: will checkpoint and stop at the next step boundary", sig.name)

    @property
    def requested(self) -> bool:
        """A stop was requested on this process (signal received or :meth:`request` called)."""
        return self._manual or self._received is not None

    @property
    def signal_received(self) -> signal.Signals | None:
        """The last signal received, or None."""
        return self._received

    def request(self) -> None:
        """Request a stop without a signal (e.g. a wall-clock budget ran out)."""
        self._manual = True

    def should_stop(self) -> bool:
        """Whether any process requested a stop. Collective when ``jax.process_count() > 1``."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.array([self.requested]))
        return bool(np.any(flags))

"""Metric sinks for a run: `metrics.jsonl`, evaluation JSON files, TensorBoard and a console bar.

One `MetricsWriter` per run, owned by the curriculum loop. Layout under the workdir:

- `metrics.jsonl`: one JSON object per `write`/`write_eval` call with `step` (global), `stage`,
  `stage_step`, `time` (Unix seconds) and the metric keys. Numpy/JAX scalars become Python numbers;
  NaN and +-inf become `null`, so every line is strict JSON. Each line is flushed as it is written,
  so a killed run loses nothing already logged. On resume the file is appended to, after
  `truncate_after(step)` has dropped the lines the resumed run will log again.
- `eval/{step:07d}_{stage}_{name}.json`: one file per evaluation (`write_eval`).
- `tensorboard/`: event files. Tags are the metric keys themselves (`loss`, `reward/mean`,
  `eval/<name>/accuracy`) against the *global* step, so one curve runs continuously across stages
  (TensorBoard groups tags by their prefix before `/`; `<name>` is `NAME.SPLIT` for `NAME[SPLIT]`); the stage of a step is in the JSONL.

Only the main process (JAX process 0) writes; on the others every method is a no-op, so the loop
can call them unconditionally.

The workdir may be a bucket (`gs://...`, through `vlm_jax.paths`): objects cannot be appended to,
so `metrics.jsonl` is uploaded whole at each flush (it stays small: one line per logged step), and
the TensorBoard event files are written in a local temporary folder and uploaded every
`_TB_FLUSH_SECS` and at `flush` / `close`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from vlm_jax import paths

METRICS_FILE = "metrics.jsonl"
EVAL_DIR = "eval"
TENSORBOARD_DIR = "tensorboard"
RESERVED_KEYS: tuple[str, ...] = ("step", "stage", "stage_step", "time")
EVAL_WHEN: tuple[str, ...] = ("before", "during", "after")
_TB_FLUSH_SECS = 10

# Metric key -> short label shown in the progress bar, in display order.
_PROGRESS_KEYS: tuple[tuple[str, str], ...] = (
    ("loss", "loss"),
    ("reward/mean", "reward"),
    ("accuracy", "acc"),
    ("response_length/mean", "len"),
)
_UNSAFE_FILENAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")

Number = int | float | None


def to_number(key: str, value: Any) -> Number:
    """Convert one metric value (Python, numpy or JAX scalar) to `int`, `float` or `None`.

    Non-finite floats map to `None` (JSON `null`). A value with more than one element or a
    non-numeric type raises, naming `key`, rather than logging something unreadable.
    """
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if hasattr(value, "__array__"):  # 0-d / size-1 numpy or JAX arrays
        array = np.asarray(value)
        if array.size != 1:
            raise ValueError(f"metric {key!r}: expected a scalar, got an array of shape {array.shape}")
        if array.dtype.kind == "V":  # ml_dtypes floats (bfloat16, float8_*) report kind "V"
            try:
                array = array.astype(np.float32)
            except (TypeError, ValueError):
                pass
        if array.dtype.kind not in "biuf":
            raise TypeError(f"metric {key!r}: expected a number, got an array of dtype {array.dtype}")
        return to_number(key, array.reshape(()).item())
    raise TypeError(f"metric {key!r}: expected a number, got {type(value).__name__}: {value!r}")


def safe_name(name: str) -> str:
    """`name` with every character outside `[A-Za-z0-9_.-]` replaced by `_` (file names, tags);
    eval dataset names may be file paths such as `data/geo.jsonl`."""
    if not name:
        raise ValueError("eval name must be non-empty")
    return _UNSAFE_FILENAME_CHARS.sub("_", name)


def metric_name(name: str) -> str:
    """Readable metric-key form of an eval name: `dots[validation]` -> `dots.validation`,
    `data/geo.jsonl` -> `data_geo.jsonl` (other unsafe characters -> `_`)."""
    if name.endswith("]") and "[" in name:
        base, split = name[:-1].split("[", 1)
        name = f"{base}.{split}"
    return re.sub("_+", "_", safe_name(name)).strip("_") or "_"


def eval_filename(step: int, stage: str, name: str) -> str:
    """File name of one evaluation result under `workdir/eval/`."""
    return f"{step:07d}_{safe_name(stage)}_{safe_name(name)}.json"


def _default_is_main() -> bool:
    import jax  # Lazy: keeps this module importable (and cheap) before the backend starts.

    return jax.process_index() == 0


class StageProgress:
    """Console progress of one stage: a tqdm bar with ETA and the main metrics in its postfix.

    With `enabled=False` (non-main process, or progress off) every method does nothing.
    """

    def __init__(self, stage: str, total_steps: int, initial: int = 0, *, enabled: bool = True,
                 file: IO[str] | None = None, mininterval: float = 1.0):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial, desc=stage, unit="step",
                             dynamic_ncols=True, mininterval=mininterval,
                             file=file if file is not None else sys.stderr)

    @property
    def n(self) -> int:
        """Steps counted so far (including `initial`); 0 when disabled."""
        return int(self._bar.n) if self._bar is not None else 0

    def update(self, metrics: Mapping[str, Any] | None = None, steps: int = 1) -> None:
        """Advance by `steps` and show the loss/reward/accuracy/length found in `metrics`."""
        if self._bar is None:
            return
        if metrics:
            self._bar.set_postfix(progress_postfix(metrics), refresh=False)
        self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def progress_postfix(metrics: Mapping[str, Any]) -> dict[str, str]:
    """Short labels -> formatted values for the metrics the progress bar shows, when present."""
    shown: dict[str, str] = {}
    for key, label in _PROGRESS_KEYS:
        if key in metrics:
            value = to_number(key, metrics[key])
            shown[label] = "nan" if value is None else f"{value:.4g}"
    return shown


class MetricsWriter:
    """Writes a run's metrics to JSONL, TensorBoard and the console (see the module docstring).

    `is_main=None` asks JAX for `process_index() == 0`; pass a bool to decide yourself (tests,
    tools that run without JAX). Usable as a context manager; `close()` flushes everything.
    """

    def __init__(self, workdir: str | os.PathLike[str], *, tensorboard: bool = True,
                 progress: bool = True, is_main: bool | None = None):
        self.workdir = paths.as_path(workdir)
        self.is_main = _default_is_main() if is_main is None else bool(is_main)
        self.tensorboard = tensorboard
        self.progress = progress
        self._file: IO[str] | None = None
        self._tb: Any = None
        self._tb_local: str | None = None  # a bucket workdir: the local folder of the event files
        self._tb_uploaded = 0.0
        self._purge_step: int | None = None
        if self.is_main:
            paths.makedirs(self.workdir)

    @property
    def metrics_path(self) -> Path:
        return self.workdir / METRICS_FILE

    @property
    def eval_dir(self) -> Path:
        return self.workdir / EVAL_DIR

    # ----------------------------------------------------------------------------------- JSONL
    def _jsonl(self) -> IO[str]:
        if self._file is None:
            self._file = (_ObjectAppender(self.metrics_path) if paths.is_url(self.metrics_path)
                          else open(self.metrics_path, "a", encoding="utf-8"))
        return self._file

    def _summary_writer(self) -> Any:
        """The TensorBoard writer, created on first use so that a preceding `truncate_after` can
        pass its step as `purge_step` (TensorBoard then hides the stale events of the killed run)."""
        if self._tb is None:
            from tensorboardX import SummaryWriter

            # A unique suffix: tensorboardX names files by the second and opens them with "wb", so
            # two writers started within one second (resume, reopen) would clobber each other.
            suffix = f".{os.getpid()}.{uuid.uuid4().hex[:8]}"
            logdir = self.workdir / TENSORBOARD_DIR
            if paths.is_url(logdir):  # events written locally, uploaded by `_upload_tb`
                self._tb_local = tempfile.mkdtemp(prefix="vlm_jax_tb_")
                self._tb_uploaded = time.time()
                logdir = self._tb_local
            self._tb = SummaryWriter(str(logdir), purge_step=self._purge_step,
                                     flush_secs=_TB_FLUSH_SECS, filename_suffix=suffix)
        return self._tb

    def _upload_tb(self, *, force: bool) -> None:
        """A bucket workdir: copies the local event files to `workdir/tensorboard` (every
        `_TB_FLUSH_SECS`, or now with `force`)."""
        if self._tb_local is None or (not force and time.time() - self._tb_uploaded < _TB_FLUSH_SECS):
            return
        if self._tb is not None:
            self._tb.flush()
        paths.copy_tree(Path(self._tb_local), self.workdir / TENSORBOARD_DIR)
        self._tb_uploaded = time.time()

    def _append(self, step: int, stage: str, stage_step: int | None,
                metrics: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(stage, str) or not stage:
            raise ValueError(f"stage must be a non-empty string, got {stage!r}")
        step = _check_step("step", step)
        if stage_step is not None:
            stage_step = _check_step("stage_step", stage_step)
        record: dict[str, Any] = {"step": step, "stage": stage, "stage_step": stage_step,
                                  "time": time.time()}
        for key, value in metrics.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"metric keys must be non-empty strings, got {key!r}")
            if key in RESERVED_KEYS:
                raise ValueError(f"metric key {key!r} is reserved (reserved: {RESERVED_KEYS})")
            record[key] = to_number(key, value)
        f = self._jsonl()
        f.write(json.dumps(record, allow_nan=False) + "\n")
        f.flush()
        if self.tensorboard:
            tb = self._summary_writer()
            for key in metrics:
                if record[key] is not None:
                    tb.add_scalar(key, record[key], global_step=step)
            self._upload_tb(force=False)
        return record

    def write(self, step: int, stage: str, stage_step: int, metrics: Mapping[str, Any]) -> None:
        """Log one step's metrics (numbers or numpy/JAX scalars; NaN/inf -> null)."""
        if self.is_main:
            self._append(step, stage, stage_step, metrics)

    def write_eval(self, step: int, stage: str, name: str, result: Mapping[str, Any], *,
                   stage_step: int | None = None) -> Path | None:
        """Save one evaluation of dataset `name` and log its headline numbers.

        `result` needs `accuracy` and `mean_response_length` (tokens); `when` ("before" | "during"
        | "after" the stage, default "during"), `per_task` and `n` are kept as given. The file gets
        `step`, `stage`, `name` added and is written atomically; `eval/<name>/accuracy` and
        `eval/<name>/response_length` go to the JSONL and TensorBoard. Returns the file's path
        (None on non-main processes).
        """
        for key in ("accuracy", "mean_response_length"):
            if key not in result:
                raise KeyError(f"eval result for {name!r} at step {step} lacks {key!r}; "
                               f"has {sorted(result)}")
        when = result.get("when", "during")
        if when not in EVAL_WHEN:
            raise ValueError(f"eval result for {name!r}: 'when' must be one of {EVAL_WHEN}, "
                             f"got {when!r}")
        if not self.is_main:
            return None
        step = _check_step("step", step)
        content = {**_jsonable(dict(result)), "step": step, "stage": stage, "name": name,
                   "when": when}
        paths.makedirs(self.eval_dir)
        path = self.eval_dir / eval_filename(step, stage, name)
        _atomic_write_text(path, json.dumps(content, indent=2, allow_nan=False) + "\n")
        tag = f"eval/{metric_name(name)}"
        self._append(step, stage, stage_step, {
            f"{tag}/accuracy": result["accuracy"],
            f"{tag}/response_length": result["mean_response_length"],
        })
        return path

    def truncate_after(self, step: int) -> int:
        """Prepare to resume at `step`: drop JSONL lines with `step >= step` (and an unreadable
        last line left by a kill mid-write), so the resumed run logs no duplicates. Eval files are
        left alone: a re-run evaluation overwrites its file. Returns the number of lines dropped."""
        step = _check_step("step", step)
        self._purge_step = step
        if self._tb is not None:  # Reopen so the purge marker is written at the resume point.
            self._close_tb()
        lines = self._lines_to_rewrite()
        kept: list[str] = []
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    continue  # A partial line from a run killed mid-write.
                raise ValueError(f"{self.metrics_path}:{i + 1}: not valid JSON: {line[:80]!r}")
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError(f"{self.metrics_path}:{i + 1}: no integer 'step': {line[:80]!r}")
            if record["step"] < step:
                kept.append(line)
        return self._rewrite(lines, kept)

    def drop_records(self, step: int, stage: str) -> int:
        """Drop the JSONL lines of `stage` at global `step` (a stage-start evaluation that a resume at
        that stage's start logs again). Returns the number of lines dropped."""
        lines = self._lines_to_rewrite()
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not (record.get("step") == step and record.get("stage") == stage):
                kept.append(line)
        return self._rewrite(lines, kept)

    def _lines_to_rewrite(self) -> list[str]:
        """The JSONL file's lines, its append handle closed for a rewrite ([] where this process
        writes no file or there is none yet)."""
        if not self.is_main or not self.metrics_path.exists():
            return []
        if self._file is not None:
            self._file.close()
            self._file = None
        return self.metrics_path.read_text(encoding="utf-8").splitlines()

    def _rewrite(self, lines: list[str], kept: list[str]) -> int:
        """Replace the JSONL file by `kept` (atomically); returns how many of `lines` were dropped."""
        if len(kept) < len(lines):
            _atomic_write_text(self.metrics_path, "".join(f"{line}\n" for line in kept))
        return len(lines) - len(kept)

    # -------------------------------------------------------------------------------- Console
    @contextlib.contextmanager
    def stage_progress(self, stage: str, total_steps: int, initial: int = 0) -> Iterator[StageProgress]:
        """A progress bar for one stage (`initial` = steps already done on resume); closed on exit."""
        bar = StageProgress(stage, total_steps, initial, enabled=self.is_main and self.progress)
        try:
            yield bar
        finally:
            bar.close()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()
            self._upload_tb(force=True)

    def close(self) -> None:
        """Flush and close every sink; the writer may be used again afterwards (files reopen)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._close_tb()

    def _close_tb(self) -> None:
        self._tb.close()
        self._upload_tb(force=True)
        self._tb = None
        if self._tb_local is not None:
            shutil.rmtree(self._tb_local, ignore_errors=True)
            self._tb_local = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_step(what: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}: {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return int(value)


def _jsonable(value: Any, key: str = "result") -> Any:
    """Nested dicts/lists of numbers and strings with numpy/JAX scalars converted (NaN -> null)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{key}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, str):
        return value
    return to_number(key, value)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename (an object in a bucket: one upload), so readers never
    see a half-written file."""
    paths.write_text_atomic(path, text)


class _ObjectAppender:
    """`open(path, "a")` for an object in a bucket: the text so far is kept and the whole object is
    uploaded again at each `flush` (objects are immutable)."""

    def __init__(self, path):
        self.path = path
        self._text = path.read_text(encoding="utf-8") if path.exists() else ""
        self._dirty = False

    def write(self, text: str) -> int:
        self._text += text
        self._dirty = True
        return len(text)

    def flush(self) -> None:
        if self._dirty:
            self.path.write_text(self._text, encoding="utf-8")
            self._dirty = False

    def close(self) -> None:
        self.flush()

"""Where vlm_jax keeps data and caches when a command is not told: one place for every command.

- Data directory (prepared datasets, read by `train`, `evaluate`, `filter`; written by `prepare`,
  `filter` and the demo set-up): the `--data_dir` flag or `data.data_dir` config key when given,
  else `$VLM_JAX_DATA_DIR`, else `$VLM_JAX_HOME/data` (`VLM_JAX_HOME` defaults to `~/vlm_jax`).
- Persistent compilation cache: `compilation_cache_dir` when set to a path, else
  `$VLM_JAX_HOME/jax_cache`.

Relative paths are made absolute against the current directory once, when resolved, and the
commands print the data directory they use. No JAX here (imported by every CLI before the backend).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

DATA_DIR_ENV = "VLM_JAX_DATA_DIR"
HOME_ENV = "VLM_JAX_HOME"
DEFAULT_HOME = "~/vlm_jax"


def home() -> Path:
    """`$VLM_JAX_HOME` or `~/vlm_jax`, absolute."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().resolve()


def data_dir(value: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: `value` if given (non-empty), else `$VLM_JAX_DATA_DIR`, else
    `$VLM_JAX_HOME/data`; absolute, `~` expanded."""
    chosen = str(value) if value else os.environ.get(DATA_DIR_ENV) or str(home() / "data")
    return Path(chosen).expanduser().resolve()


def cache_dir(value: str | None = None) -> Path | None:
    """The compilation cache: None when `value` is "" (off), `value` when a path, else the default
    `$VLM_JAX_HOME/jax_cache` (for `value` None or "default")."""
    if value == "":
        return None
    if value is None or value == "default":
        return home() / "jax_cache"
    return Path(value).expanduser().resolve()


def describe_data_dir(value: str | os.PathLike[str] | None = None) -> str:
    """One line naming the data directory and where the choice came from."""
    where = ("--data_dir / data.data_dir" if value else
             f"${DATA_DIR_ENV}" if os.environ.get(DATA_DIR_ENV) else f"default (${HOME_ENV}/data)")
    return f"data dir: {data_dir(value)} (from {where})"


def check_writable(folder: Path) -> None:
    """Creates `folder` (with its parents) and writes then removes a probe file in it; raises OSError
    when it cannot. The probe has a unique name, so processes of one run that share the folder (a
    multi-host workdir) never remove each other's probe."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".vlm_jax_write_check.", dir=folder)
    try:
        os.write(fd, b"ok")
    finally:
        os.close(fd)
        os.unlink(probe)

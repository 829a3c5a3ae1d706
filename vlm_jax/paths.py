"""Where vlm_jax keeps data and caches when a command is not told, and the one path layer every
user-given path goes through (local or a URL such as `gs://bucket/dir`).

- Data directory (prepared datasets, read by `train`, `evaluate`, `filter`; written by `prepare`,
  `filter` and the demo set-up): the `--data_dir` flag or `data.data_dir` config key when given,
  else `$VLM_JAX_DATA_DIR`, else `$VLM_JAX_HOME/data` (`VLM_JAX_HOME` defaults to `~/vlm_jax`).
- Persistent compilation cache: `compilation_cache_dir` when set to a path, else
  `$VLM_JAX_HOME/jax_cache`.

Paths: `resolve(value)` gives a `pathlib.Path` for a local path (made absolute against the current
directory once, `~` expanded: local paths behave as they always did) and an `etils.epath.Path` for a
URL (`gs://`, `s3://`, ...; read and written through fsspec: gcsfs for `gs://`), never `pathlib` on a
URL. Both have the same methods (`/`, `open`, `read_text`, `write_text`, `exists`, `is_dir`,
`glob`, `iterdir`, `mkdir`, `unlink`, `rename`). What a URL cannot do like a disk (append, atomic
rename, a library that needs a local file) is done here: `write_text_atomic`, `move_tree`,
`local_files`, `staged_dir`. Storage errors become one line naming the path and the cause (`describe_error`). See
docs/storage.md for the credentials and settings the storage clients read. No JAX here (imported by
every CLI before the backend).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Union

DATA_DIR_ENV = "VLM_JAX_DATA_DIR"
HOME_ENV = "VLM_JAX_HOME"
DEFAULT_HOME = "~/vlm_jax"

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

AnyPath = Union[Path, "epath.Path"]  # noqa: F821 - etils' Path, imported lazily


def is_url(value: str | os.PathLike[str] | None) -> bool:
    """True for `gs://bucket/...` and other `scheme://` paths (never handed to pathlib)."""
    return value is not None and bool(_URL.match(os.fspath(value) if not isinstance(value, str) else value))


def resolve(value: str | os.PathLike[str]) -> AnyPath:
    """A user-given path: an `etils.epath.Path` for a URL, else an absolute `pathlib.Path` (`~`
    expanded, relative to the current directory)."""
    text = value if isinstance(value, str) else os.fspath(value)
    if is_url(text):
        from etils import epath

        return epath.Path(text)
    return Path(text).expanduser().resolve()


def as_path(value: str | os.PathLike[str]) -> AnyPath:
    """Like `resolve`, but a local path is kept as given (not made absolute); a path object is
    returned as it is."""
    if is_url(value):
        return value if hasattr(value, "_uri_scheme") else resolve(value)
    return value if isinstance(value, Path) else Path(value)


def home() -> Path:
    """`$VLM_JAX_HOME` or `~/vlm_jax`, absolute."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().resolve()


def data_dir(value: str | os.PathLike[str] | None = None) -> AnyPath:
    """The data directory: `value` if given (non-empty), else `$VLM_JAX_DATA_DIR`, else
    `$VLM_JAX_HOME/data`; absolute, `~` expanded (a URL as given)."""
    chosen = str(value) if value else os.environ.get(DATA_DIR_ENV) or str(home() / "data")
    return resolve(chosen)


def cache_dir(value: str | None = None) -> AnyPath | None:
    """The compilation cache: None when `value` is "" (off), `value` when a path (local or URL), else
    the default `$VLM_JAX_HOME/jax_cache` (for `value` None or "default")."""
    if value == "":
        return None
    if value is None or value == "default":
        return home() / "jax_cache"
    return resolve(value)


def describe_data_dir(value: str | os.PathLike[str] | None = None) -> str:
    """One line naming the data directory and where the choice came from."""
    where = ("--data_dir / data.data_dir" if value else
             f"${DATA_DIR_ENV}" if os.environ.get(DATA_DIR_ENV) else f"default (${HOME_ENV}/data)")
    return f"data dir: {data_dir(value)} (from {where})"


# ------------------------------------------------------------------------------- errors


def describe_error(err: BaseException) -> str:
    """The cause of a storage error in a few words and its first line: "no such bucket", "permission
    denied", "no credentials", "no such file" (for local paths: the OS's own words)."""
    if isinstance(err, OSError) and err.strerror and not is_url(str(err.filename or "")):
        return err.strerror
    text = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    code = getattr(err, "code", None) or getattr(err, "status", None)
    name = type(err).__name__
    if "DefaultCredentialsError" in name or "RefreshError" in name or "credentials" in text.lower():
        return f"no credentials ({text}); see docs/storage.md"
    if code in (401, 403) or isinstance(err, PermissionError):
        return f"permission denied ({text})"
    if code == 404 or isinstance(err, FileNotFoundError):
        bucket_missing = "/upload/" in text or "bucket" in text.lower()  # a write: only the bucket can be missing
        return f"{'no such bucket' if bucket_missing else 'no such file'} ({text})"
    return f"{name}: {text}"


def check_writable(folder: str | os.PathLike[str]) -> None:
    """Creates `folder` (with its parents; a URL needs no folders) and writes then removes a probe
    file in it; raises OSError naming the cause when it cannot. The probe has a unique name, so
    processes of one run that share the folder (a multi-host workdir) never remove each other's
    probe."""
    if is_url(folder):
        probe = resolve(folder) / f".vlm_jax_write_check.{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except Exception as e:  # noqa: BLE001 - gcsfs / google-auth errors are not OSErrors
            raise OSError(describe_error(e)) from e
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".vlm_jax_write_check.", dir=folder)
    try:
        os.write(fd, b"ok")
    finally:
        os.close(fd)
        os.unlink(probe)


# ------------------------------------------------------------------------- reading, writing


def write_text_atomic(path: AnyPath, text: str) -> None:
    """Readers never see a half-written file: a local file is written beside and renamed; an object
    in a bucket is replaced whole by one upload (objects are immutable)."""
    if is_url(path):
        path.write_text(text, encoding="utf-8")
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def makedirs(path: AnyPath) -> None:
    """`mkdir -p` for a local folder; nothing for a URL (a bucket has no folders, and creating one
    through gcsfs could create a bucket)."""
    if not is_url(path):
        Path(path).mkdir(parents=True, exist_ok=True)


def rmtree(path: AnyPath) -> None:
    """Removes a folder and everything under it (missing is fine)."""
    if is_url(path):
        if path.exists():
            path.rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def copy_tree(src: AnyPath, dst: AnyPath) -> None:
    """Copies the files under `src` to `dst` (either may be a URL), replacing files of the same
    names; one file at a time, so a large file is streamed, never held whole."""
    src = as_path(src)
    dst = as_path(dst)
    for item in src.iterdir():
        target = dst / item.name
        if item.is_dir():
            makedirs(target)
            copy_tree(item, target)
        else:
            copy_file(item, target)


def move_tree(src: AnyPath, dst: AnyPath) -> None:
    """Moves the folder `src` to `dst` (which must not exist; both local or both URLs). Local: one
    atomic rename. URL: every object is copied server-side (no download), then `src` is removed,
    its orbax commit marker `commit_success.txt` first (so a move cut short never leaves a step that
    looks committed). Not gcsfs's `mv`, which first tries GCS's object-move API and retries it with
    back-off (about 10 s per object) where the server lacks it, as storage emulators do."""
    if not is_url(src):
        os.rename(src, dst)
        return
    from etils.epath import backend

    fs = backend.fsspec_backend.fs(str(src))  # the instance etils (and orbax) list through: its cache
    root, target = (fs._strip_protocol(str(p)).rstrip("/") for p in (src, dst))
    files = fs.find(root)
    for name in files:
        fs.copy(name, target + name[len(root):])
    marker = f"{root}/commit_success.txt"
    if marker in files:
        fs.rm_file(marker)
    fs.rm([f for f in files if f != marker])
    for name in (root, target, root.rsplit("/", 1)[0], target.rsplit("/", 1)[0]):
        fs.invalidate_cache(name)


def forget_listings(path: AnyPath) -> None:
    """Drops this process's cached folder listings of a URL's filesystem (gcsfs keeps them for the
    life of the process): after another process of a multi-host run moved or removed objects there,
    the next listing reads the bucket again. Nothing for a local path."""
    if is_url(path):
        from etils.epath import backend

        backend.fsspec_backend.fs(str(path)).invalidate_cache()


def copy_file(src: AnyPath, dst: AnyPath) -> None:
    with as_path(src).open("rb") as fi, as_path(dst).open("wb") as fo:
        shutil.copyfileobj(fi, fo, 16 << 20)


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike[str]) -> Iterator[Path]:
    """A local folder to write a directory into: `out` itself when local; for a URL a temporary
    folder whose files are uploaded to `out` when the block ends without an error (for writers that
    need local files: safetensors, TFDS, tokenizers)."""
    if not is_url(out):
        yield Path(out)
        return
    with tempfile.TemporaryDirectory(prefix="vlm_jax_upload_") as tmp:
        yield Path(tmp)
        copy_tree(Path(tmp), resolve(out))


def local_files(folder: str | os.PathLike[str], names: Iterable[str]) -> Path:
    """A local folder holding the files `names` of `folder` that exist: `folder` itself when local,
    else a per-process cache (`$VLM_JAX_HOME/url_cache/...`) they are downloaded into (for small
    files that libraries only read from disk: tokenizer, image processor, chat template)."""
    if not is_url(folder):
        return Path(folder)
    src = resolve(folder)
    text = str(src).rstrip("/")
    cache = home() / "url_cache" / re.sub(r"[^A-Za-z0-9._-]+", "_", text) / f"{os.getpid()}"
    cache.mkdir(parents=True, exist_ok=True)
    for name in names:
        item = src / name
        if item.is_file():
            copy_file(item, cache / name)
    return cache


# ---------------------------------------------------------------------------- model paths

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<revision>[\w./-]+))?$")
HUB_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.txt")  # what a model directory needs


class ModelPathError(ValueError):
    """`model.path` names no model directory and no Hugging Face hub model that can be had."""


def is_hub_id(value: str) -> bool:
    """`ORG/NAME` or `ORG/NAME@REVISION` that is not an existing local path."""
    return bool(_HUB_ID.match(value)) and not Path(value).expanduser().exists()


@functools.lru_cache(maxsize=16)
def _hub_snapshot(repo: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, revision=revision, allow_patterns=list(HUB_PATTERNS)))


def model_dir(value: str | os.PathLike[str]) -> AnyPath:
    """The directory of a model: a URL (`gs://...`, read in place), a local folder (`~` expanded),
    or a Hugging Face hub id `ORG/NAME[@REVISION]` resolved the way transformers resolves it
    (huggingface_hub's cache under `$HF_HOME`, downloaded once when online, `HF_HUB_OFFLINE=1`
    only reads the cache). ModelPathError when a hub id cannot be had."""
    text = value if isinstance(value, str) else os.fspath(value)
    if is_url(text):
        return resolve(text)
    if not is_hub_id(text):
        return Path(text).expanduser()
    m = _HUB_ID.match(text)
    try:
        return _hub_snapshot(m["repo"], m["revision"])
    except Exception as e:  # noqa: BLE001 - hub errors: offline and not cached, no such repo, ...
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        raise ModelPathError(
            f"model directory {text!r} does not exist, and as a Hugging Face hub id it cannot be had"
            f"{' offline (HF_HUB_OFFLINE=1: only the local cache is read)' if offline else ''}: "
            f"{type(e).__name__}: {describe_error(e)}") from None

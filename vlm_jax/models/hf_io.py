"""Reading and writing Hugging Face safetensors directories, family-independent.

Loading never materialises the whole model on one device or as a full host copy: each device shard of
each parameter is read straight from its file slice (`safe_open(...).get_slice`) in
`jax.make_array_from_callback`, cast to the target dtype slice by slice. A directory in a bucket
(`gs://...`) is read the same way: the header of each file, then only the byte ranges of the rows a
shard needs (`RemoteSafetensors`), with no local copy.
"""

from __future__ import annotations

import json
import struct
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from vlm_jax import paths


class CheckpointError(ValueError):
    """A model directory or tensor that cannot be loaded; the message names the file or tensor."""


def read_config(path) -> dict:
    if not path.exists():
        raise CheckpointError(f"model directory not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"model path is not a directory: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"no config.json in {path}")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from e


class SafetensorsIndex:
    """All tensors of a directory: name -> file, with lazily opened handles (use as a context)."""

    def __init__(self, path):
        files = sorted(path.glob("*.safetensors"), key=str)
        index_file = path / "model.safetensors.index.json"
        if index_file.exists():
            weight_map = json.loads(index_file.read_text()).get("weight_map", {})
            listed = [path / f for f in sorted(set(weight_map.values()))]
            missing = [str(f) for f in listed if not f.exists()]
            if missing:
                raise CheckpointError(f"{index_file} lists missing safetensors files: {missing}")
            files = listed
        if not files:
            raise CheckpointError(f"no *.safetensors files in {path}")
        self._stack = ExitStack()
        self.handles: dict[Path, object] = {}
        self.file_of: dict[str, Path] = {}
        for f in files:
            try:
                if paths.is_url(f):
                    handle = self._stack.enter_context(RemoteSafetensors(f))
                else:
                    handle = self._stack.enter_context(safe_open(str(f), framework="numpy"))
            except Exception as e:  # SafetensorError, OSError: truncated file, bad header JSON, ...
                self._stack.close()
                raise CheckpointError(f"safetensors file {f} is truncated or corrupt: {e}") from e
            self.handles[f] = handle
            for name in handle.keys():
                self.file_of[name] = f

    def find(self, names: tuple[str, ...]) -> str | None:
        return next((n for n in names if n in self.file_of), None)

    def get_slice(self, name: str):
        return self.handles[self.file_of[name]].get_slice(name)

    def close(self):
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class RemoteSafetensors:
    """`safe_open(...)` for a safetensors file in a bucket: `keys()` and `get_slice(name)` from the
    header; a slice reads only the byte range of the rows (first axis) it covers."""

    def __init__(self, path):
        self.path = path
        self._file = path.open("rb")
        try:
            (n,) = struct.unpack("<Q", self._file.read(8))
            header = json.loads(self._file.read(n))
        except Exception:
            self._file.close()
            raise
        header.pop("__metadata__", None)
        self._header, self._base = header, 8 + n

    def keys(self):
        return list(self._header)

    def get_slice(self, name: str) -> "_RemoteSlice":
        return _RemoteSlice(self, self._header[name])

    def read(self, offset: int, size: int) -> bytes:
        self._file.seek(self._base + offset)
        return self._file.read(size)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


class _RemoteSlice:
    def __init__(self, owner: RemoteSafetensors, info: dict):
        self._owner, self._info = owner, info
        self._dtype = np.dtype(jnp.dtype(_DTYPES[info["dtype"]]))

    def get_shape(self) -> list[int]:
        return list(self._info["shape"])

    def get_dtype(self) -> str:
        return self._info["dtype"]

    def __getitem__(self, index) -> np.ndarray:
        shape = tuple(self._info["shape"])
        index = index if isinstance(index, tuple) else (index,)
        if not shape:
            rows, rest = slice(None), ()
        else:
            rows, rest = index[0], index[1:]
        start, stop, step = rows.indices(shape[0]) if shape else (0, 1, 1)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self._dtype.itemsize
        begin = self._info["data_offsets"][0] + start * row_bytes
        count = max(stop - start, 0)
        data = self._owner.read(begin, count * row_bytes)
        block = np.frombuffer(data, dtype=self._dtype).reshape((count, *shape[1:]) if shape else ())
        if not shape:
            return block.copy()
        return block[(slice(None, None, step), *rest)].copy()


def load_sharded(
    index: SafetensorsIndex, name: str, spec, shape: tuple[int, ...], dtype, sharding
) -> jax.Array:
    """One parameter, read shard by shard into `sharding` (replicas of a shard are read once)."""
    sl = index.get_slice(name)
    file_shape = tuple(sl.get_shape())
    jax_shape = spec.jax_shape(file_shape)
    if tuple(jax_shape) != tuple(shape):
        raise CheckpointError(
            f"tensor {name} in {index.file_of[name]} has shape {file_shape} "
            f"(-> {tuple(jax_shape)} here) but the config implies {tuple(shape)}"
        )
    np_dtype = jnp.dtype(dtype)
    cache: dict = {}

    def read(idx):
        key = tuple((s.start, s.stop) for s in idx)
        if key not in cache:
            cache[key] = np.asarray(spec.read_slice(sl, idx)).astype(np_dtype)
        return cache[key]

    full = tuple(slice(0, n) for n in shape)
    return jax.make_array_from_callback(
        tuple(shape),
        sharding,
        lambda idx: read(
            tuple(slice(s.start or 0, n if s.stop is None else s.stop) for s, n in zip(idx, shape))
            if idx
            else full
        ),
    )


def to_host(x: jax.Array) -> np.ndarray:
    """Full host copy of one (possibly multi-process) array."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_tensors(
    tensors: Mapping[str, Callable[[], np.ndarray]], out_dir: Path, max_shard_bytes: int = 2 << 30
) -> None:
    """Writes `name -> lazy array` into safetensors files of at most `max_shard_bytes` each (+ an index
    when there are several). Arrays are fetched lazily and a shard is written as soon as it is full, so
    at most one shard is on the host. Every process fetches (collectives); process 0 writes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write = jax.process_index() == 0
    shard: dict[str, np.ndarray] = {}
    written: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
    total = 0

    def flush():
        fname = f"shard-{len(written):05d}.safetensors"
        if write:
            save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        written.append((fname, list(shard)))
        shard.clear()

    size = 0
    for name, make in tensors.items():
        arr = make()
        if shard and size + arr.nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = arr
        size += arr.nbytes
        total += arr.nbytes
    flush()
    if not write:
        return
    n = len(written)
    if n == 1:
        (out_dir / written[0][0]).rename(out_dir / "model.safetensors")
        return
    weight_map = {}
    for i, (fname, names) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (out_dir / fname).rename(out_dir / final)
        weight_map.update({k: final for k in names})
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": int(total)}, "weight_map": weight_map}, indent=2)
    )

"""TFDS builders that write ArrayRecord without TensorFlow, and random-access readers.

Everything here runs with ``tensorflow-datasets`` alone (TensorFlow is not installed):
the features are ``Text`` / ``Scalar`` / ``Tensor(shape=(), dtype=np.object_)`` (raw
bytes) / ``Sequence`` of bytes, which TFDS serializes with its own numpy example
writer; images are stored as their encoded bytes (PNG/JPEG), decoded later by Pillow.
Reading goes through ``tfds.data_source`` (ArrayRecord random access), also TF-free.

Builders:

- ``SyntheticPerception``, ``SyntheticTextualReasoning``, ``SyntheticVisualReasoning``
  (registered as ``synthetic_perception`` / ``synthetic_textual_reasoning`` /
  ``synthetic_visual_reasoning``): rows from ``vlm_jax.data.synthetic.generate`` with
  train / validation / test splits; sizes, seed and generator options are constructor
  kwargs (recorded in the dataset's ``metadata.json``).
- ``LocalFilesBuilder``: a builder with a run-time name, fed already-validated rows by
  ``vlm_jax.data.prepare``; ``write_local_split`` adds or replaces one split of such a
  dataset, keeping its other splits.

Row order is kept as written (``disable_shuffling=True``), so a row's index in the
source is its index in the input file / generator output.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging

from vlm_jax import paths
from vlm_jax.data import schema

DATASET_VERSION = "1.0.0"
SYNTHETIC_CAPABILITIES: tuple[str, ...] = ("perception", "textual_reasoning", "visual_reasoning")
DEFAULT_SYNTHETIC_SIZES: Mapping[str, int] = {"train": 256, "validation": 32, "test": 64}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def row_features() -> tfds.features.FeaturesDict:
    """The TFDS features of one schema row (TensorFlow-free connectors only)."""
    text = tfds.features.Text
    return tfds.features.FeaturesDict(
        {
            "problem": text(),
            "answer": text(),
            "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            "caption": text(),
            "solution": text(),
            "task": text(),
            "capability": text(),
            "answer_type": text(),
            # Stored as float32 (TFDS's example format has no float64); read back by
            # ``TfdsSource`` as the shortest decimal that round-trips, so 0.3 stays 0.3.
            "pass_rate": tfds.features.Scalar(dtype=np.float32),
            "difficulty": tfds.features.Scalar(dtype=np.float32),
        }
    )


@contextlib.contextmanager
def _quiet_build(verbose: bool) -> Iterator[None]:
    """Hide TFDS's build chatter and progress bars unless ``verbose`` (then on stderr).

    Keeps stdout for the caller's own report (``python -m vlm_jax.data.prepare``).
    """
    from tensorflow_datasets.core.utils import tqdm_utils  # noqa: PLC0415

    was_active = getattr(tqdm_utils, "_active", True)
    was_verbosity = absl_logging.get_verbosity()
    tfds.display_progress_bar(verbose)
    if not verbose:  # e.g. "Variant folder ... has no dataset_info.json" while a dataset is being built
        absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr if verbose else io.StringIO()):
            yield
    finally:
        tfds.display_progress_bar(was_active)
        absl_logging.set_verbosity(was_verbosity)


def check_dataset_name(name: str) -> str:
    """Return ``name`` if it is a valid TFDS dataset name (snake_case), else raise."""
    if not _NAME_RE.match(name):
        raise ValueError(
            f"invalid dataset name {name!r}: use lower-case letters, digits and '_', starting with a letter"
        )
    return name


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of this module's builders: no download checksums file.

    TFDS looks up a ``checksums.tsv`` next to a builder's source through
    ``code_path``, which for a builder inside a regular package touches the
    ``importlib_resources`` backport (not installed on Python >= 3.9). These builders
    download nothing, so they declare no code path.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:  # type: ignore[override]
        return None


# --------------------------------------------------------------------------- synthetic


class _SyntheticBuilder(_Builder, skip_registration=True):
    """Rows of one capability from ``vlm_jax.data.synthetic.generate``."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES: ClassVar[dict[str, str]] = {DATASET_VERSION: "Initial release."}
    CAPABILITY: ClassVar[str] = ""

    def __init__(
        self,
        *,
        sizes: Mapping[str, int] = DEFAULT_SYNTHETIC_SIZES,
        seed: int = 0,
        generator_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        bad = {k: v for k, v in sizes.items() if not isinstance(v, (int, np.integer)) or v < 0}
        if bad:
            raise ValueError(f"split sizes must be non-negative ints, got {bad}")
        self._sizes = {k: int(v) for k, v in sizes.items() if v > 0}
        if not self._sizes:
            raise ValueError(f"all split sizes are zero: {dict(sizes)}")
        self._seed = int(seed)
        self._generator_kwargs = dict(generator_kwargs or {})
        super().__init__(**kwargs)

    def settings(self) -> dict[str, Any]:
        """JSON-normalised build settings; a prepared copy is reused only if they match."""
        settings = {"sizes": self._sizes, "seed": self._seed, "generator_kwargs": self._generator_kwargs}
        return json.loads(json.dumps(settings))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Synthetic {self.CAPABILITY} rows from vlm_jax.data.synthetic.",
            features=row_features(),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(self.settings()),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        del dl_manager
        return {split: self._generate_examples(split=split, n=n) for split, n in self._sizes.items()}

    def _generate_examples(self, split: str, n: int) -> Iterator[tuple[int, dict[str, Any]]]:
        from vlm_jax.data import synthetic  # noqa: PLC0415 - generators are only needed to build

        rows = synthetic.generate(self.CAPABILITY, n, seed=self._seed, split=split, **self._generator_kwargs)
        for i, row in enumerate(rows):
            reason = schema.validate_row(row)
            if reason is not None:
                raise ValueError(f"synthetic {self.CAPABILITY} generator produced a bad row {i} ({split}): {reason}")
            yield i, schema.normalize_row(row)


class SyntheticPerception(_SyntheticBuilder):
    """Synthetic perception questions (``synthetic_perception``)."""

    CAPABILITY = "perception"


class SyntheticTextualReasoning(_SyntheticBuilder):
    """Synthetic text-only reasoning problems (``synthetic_textual_reasoning``)."""

    CAPABILITY = "textual_reasoning"


class SyntheticVisualReasoning(_SyntheticBuilder):
    """Synthetic visual reasoning problems (``synthetic_visual_reasoning``)."""

    CAPABILITY = "visual_reasoning"


SYNTHETIC_BUILDERS: Mapping[str, type[_SyntheticBuilder]] = {
    "synthetic_perception": SyntheticPerception,
    "synthetic_textual_reasoning": SyntheticTextualReasoning,
    "synthetic_visual_reasoning": SyntheticVisualReasoning,
}


def build_synthetic(
    data_dir: str | Path,
    *,
    sizes: Mapping[str, int] = DEFAULT_SYNTHETIC_SIZES,
    seed: int = 0,
    generator_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    verbose: bool = False,
) -> dict[str, Path]:
    """Build the three synthetic datasets under ``data_dir``; return name -> version dir.

    ``generator_kwargs`` maps a capability ("perception", ...) to extra keyword arguments of
    ``synthetic.generate`` for that dataset (e.g. ``{"perception": {"max_objects": 1}}``).
    A dataset already prepared with the same sizes, seed and generator options is
    reused; one built with other settings is rebuilt (the data is deterministic).
    """
    per_capability = dict(generator_kwargs or {})
    known = [cls.CAPABILITY for cls in SYNTHETIC_BUILDERS.values()]
    unknown = sorted(set(per_capability) - set(known))
    if unknown:
        raise ValueError(f"generator_kwargs keys must be capabilities {known}, got {unknown}")
    out: dict[str, Path] = {}
    for name, cls in SYNTHETIC_BUILDERS.items():
        kwargs = per_capability.get(cls.CAPABILITY)
        with _quiet_build(verbose):
            builder = cls(data_dir=str(data_dir), sizes=sizes, seed=seed, generator_kwargs=kwargs,
                          file_format="array_record")
            if builder.is_prepared() and _stored_settings(Path(builder.data_dir)) != builder.settings():
                shutil.rmtree(builder.data_dir)
                builder = cls(data_dir=str(data_dir), sizes=sizes, seed=seed, generator_kwargs=kwargs,
                              file_format="array_record")
            builder.download_and_prepare()
        out[name] = Path(builder.data_dir)
    return out


def _stored_settings(version_dir: Path) -> dict[str, Any] | None:
    path = version_dir / "metadata.json"
    return json.loads(path.read_text()) if path.exists() else None


# --------------------------------------------------------------------------- local files


class LocalFilesBuilder(_Builder, skip_registration=True):
    """A dataset named at run time from already-validated schema rows, one iterable per split."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES: ClassVar[dict[str, str]] = {DATASET_VERSION: "Prepared from local files."}

    def __init__(
        self,
        *,
        name: str,
        splits: Mapping[str, Iterable[Mapping[str, Any]]],
        description: str = "",
        **kwargs: Any,
    ):
        self.name = check_dataset_name(name)
        if not splits:
            raise ValueError(f"dataset {name!r}: no splits given")
        self._splits = dict(splits)
        self._description = description or f"Local-file dataset {name}."
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self._description, features=row_features(), disable_shuffling=True
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        del dl_manager
        return {split: self._generate_examples(rows=rows) for split, rows in self._splits.items()}

    def _generate_examples(self, rows: Iterable[Mapping[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
        for i, row in enumerate(rows):
            yield i, schema.normalize_row(row)


def write_local_split(
    name: str,
    split: str,
    rows: Iterable[Mapping[str, Any]],
    data_dir: str | Path,
    *,
    description: str = "",
    verbose: bool = False,
) -> Path:
    """Write ``rows`` as split ``split`` of dataset ``name``; return the version dir.

    Other splits of an existing dataset are kept; an existing split of the same name is
    replaced. The split is first built in a temporary directory inside ``data_dir`` and
    then moved in, so a failure leaves the existing dataset untouched.
    """
    check_dataset_name(name)
    rows = iter(rows)
    first = next(rows, None)
    if first is None:  # TFDS would fail later with an opaque AssertionError
        raise ValueError(f"dataset {name!r}: no rows to write to split {split!r}")
    rows = itertools.chain([first], rows)
    if paths.is_url(data_dir):
        return _write_remote_split(name, split, rows, paths.resolve(data_dir), description=description,
                                   verbose=verbose)
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / name / DATASET_VERSION
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=f".tmp_{name}_") as tmp:
        builder = LocalFilesBuilder(
            name=name, splits={split: rows}, description=description, data_dir=tmp, file_format="array_record"
        )
        with _quiet_build(verbose):
            builder.download_and_prepare()
        built = Path(builder.data_dir)
        if not (target / "dataset_info.json").exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(built), str(target))
            return target
        old_splits = tfds.builder_from_directory(str(target)).info.splits
        new_split = builder.info.splits[split]
        for old_file in target.glob(f"{name}-{split}.array_record-*"):
            old_file.unlink()
        for new_file in built.glob(f"{name}-{split}.array_record-*"):
            shutil.move(str(new_file), str(target / new_file.name))
        merged = [info for key, info in old_splits.items() if key != split] + [new_split]
        tfds.folder_dataset.write_metadata(
            data_dir=str(target),
            features=row_features(),
            split_infos=merged,
            check_data=False,
            description=builder.info.description,
            disable_shuffling=True,
        )
    return target


def _write_remote_split(name, split, rows, data_dir, *, description, verbose):
    """`write_local_split` into a bucket: the dataset (its other splits downloaded first) is built
    in a local temporary folder, then the split's old files are removed and the folder uploaded."""
    target = data_dir / name / DATASET_VERSION
    with tempfile.TemporaryDirectory(prefix=f"vlm_jax_{name}_") as tmp:
        local = Path(tmp) / name / DATASET_VERSION
        if (target / "dataset_info.json").exists():
            local.mkdir(parents=True)
            paths.copy_tree(target, local)
        write_local_split(name, split, rows, tmp, description=description, verbose=verbose)
        for old_file in target.glob(f"{name}-{split}.array_record-*"):
            old_file.unlink()
        paths.copy_tree(local, target)
    return target


# --------------------------------------------------------------------------- reading


def available_datasets(data_dir: str | Path) -> list[str]:
    """Names of the prepared datasets (``NAME/VERSION/dataset_info.json``) in ``data_dir``."""
    root = paths.as_path(data_dir)
    if not root.is_dir():
        return []
    names = {p.parent.parent.name for p in root.glob("*/*/dataset_info.json")}
    return sorted(name for name in names if not name.startswith("."))


def dataset_splits(name: str, data_dir: str | Path) -> dict[str, int]:
    """Split name -> number of rows of a prepared dataset."""
    info = tfds.builder_from_directory(str(_version_dir(name, data_dir))).info
    return {key: int(split.num_examples) for key, split in info.splits.items()}


def _version_dir(name: str, data_dir: str | Path) -> Path:
    root = paths.as_path(data_dir)
    if not root.is_dir():
        raise ValueError(f"data_dir {str(root)!r} does not exist (dataset {name!r} requested)")
    available = available_datasets(root)
    if name not in available:
        raise ValueError(f"unknown dataset {name!r} in data_dir {str(root)!r}; available: {available}")
    versions = sorted((p.parent for p in (root / name).glob("*/dataset_info.json")), key=str)
    return _local_copy(versions[-1]) if paths.is_url(root) else versions[-1]


def _local_copy(version_dir) -> Path:
    """A prepared dataset in a bucket, copied once per host to `$VLM_JAX_HOME/url_cache` (ArrayRecord
    reads local files), again when its `dataset_info.json` changed."""
    cache = paths.home() / "url_cache" / re.sub(r"[^A-Za-z0-9._-]+", "_", str(version_dir))
    info = (version_dir / "dataset_info.json").read_text()
    if (cache / "dataset_info.json").is_file() and (cache / "dataset_info.json").read_text() == info:
        return cache
    paths.home().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp_", dir=paths.home()))
    paths.copy_tree(version_dir, tmp)
    shutil.rmtree(cache, ignore_errors=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(cache)
    return cache


class TfdsSource:
    """Random access to one split of a prepared dataset, rows as schema python types.

    ``split`` may use TFDS slicing (``"test[:100]"``). Works for any dataset written by
    this module, registered or not, without TensorFlow.
    """

    def __init__(self, name: str, split: str, data_dir: str | Path):
        version_dir = _version_dir(name, data_dir)
        splits = dataset_splits(name, data_dir)
        base_split = split.split("[", 1)[0]
        if base_split not in splits:
            raise ValueError(f"dataset {name!r} has no split {base_split!r}; available: {sorted(splits)}")
        builder = tfds.builder_from_directory(str(version_dir))
        self._source = builder.as_data_source(split=split)
        self.name = f"{name}[{split}]"

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} rows")
        row = schema.normalize_row(self._source[int(index) % len(self)])
        for key in schema.FLOAT_FIELDS:
            row[key] = float(str(np.float32(row[key])))
        return row

    def __getitems__(self, indices: Iterable[int]) -> list[dict[str, Any]]:
        return [self[i] for i in indices]

    def __repr__(self) -> str:
        return f"TfdsSource({self.name}, {len(self)} rows)"

"""Local JSON / JSONL / Parquet files -> TFDS ArrayRecord datasets, and ``load`` for any source.

Command line::

    python -m vlm_jax.data.prepare --input FILE --name NAME [--image_dir DIR]
        [--data_dir DIR] [--split train] [--strict]

``--data_dir`` defaults to the one data directory every command uses (``vlm_jax.paths``:
``$VLM_JAX_DATA_DIR``, else ``~/vlm_jax/data``); the command prints it.

Input rows (the layout PyTorch VLM-RL users already have): ``problem`` (text with one
``<image>`` placeholder per image), ``answer``, ``images`` (a list of absolute paths, paths
relative to ``--image_dir``, raw bytes, or ``{"bytes": ..., "path": ...}`` dicts as Hugging
Face datasets write to Parquet), or a single ``image`` field instead of ``images``; optional
schema fields (see ``vlm_jax.data.schema``) are kept. Images are stored as their original
encoded bytes. A relative path is looked up under ``--image_dir`` when given; without it, under
the input file's folder, then under that folder's parents (a path written relative to the
folder the dataset was made from, e.g. ``mydata/images/1.png`` beside ``mydata/train.parquet``);
an unreadable image's reason names the path(s) tried.

A row that cannot be used -- invalid JSON line, missing/blank ``problem`` or
``answer``, a placeholder count different from its image count, an image that is missing
or that Pillow cannot decode, a field of the wrong type -- is skipped; the command prints
the rows written and, per reason, the number skipped with the first few row numbers
(0-based positions in the input; for JSONL the 0-based line index). ``--strict`` stops at
the first bad row with one line naming the row and the reason, and exits 1.

``load(spec, split, data_dir)`` opens a source for training or evaluation:

- ``"NAME"`` or ``"NAME[SPLIT]"``: a prepared dataset in ``data_dir`` (split may use TFDS
  slicing, e.g. ``"mathvista[test[:100]]"``);
- a path to a ``.jsonl`` / ``.json`` / ``.parquet`` file: its usable rows, read into
  memory (for evaluation sets), images relative to ``image_dir`` or the file's folder.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlm_jax import paths
from vlm_jax.data import schema, tfds_builders

SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet")
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
REPORT_ROWS = 5  # row numbers shown per skip reason
_SPEC_RE = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<split>.+)\]$")


class BadRowError(ValueError):
    """A row that cannot be used, raised in strict mode (message names file, row and reason)."""


@dataclasses.dataclass
class PrepareReport:
    """Rows written and rows skipped (reason -> row numbers) for one input file."""

    source: str
    written: int = 0
    skipped: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    first_detail: dict[str, str] = dataclasses.field(default_factory=dict)  # reason -> first row's detail

    @property
    def num_skipped(self) -> int:
        return sum(len(rows) for rows in self.skipped.values())

    def skip(self, row: int, reason: str, detail: str = "") -> None:
        self.skipped.setdefault(reason, []).append(row)
        if detail and reason not in self.first_detail:
            self.first_detail[reason] = f"row {row}: {detail}"

    def summary(self) -> str:
        """Human-readable lines: written count, then one line per skip reason."""
        lines = [f"{self.source}: kept {self.written} rows, skipped {self.num_skipped}"]
        for reason, rows in sorted(self.skipped.items()):
            shown = ", ".join(str(r) for r in rows[:REPORT_ROWS])
            more = ", ..." if len(rows) > REPORT_ROWS else ""
            lines.append(f"  skipped {len(rows)} x {reason} (rows {shown}{more})")
            if reason in self.first_detail:
                lines.append(f"    first: {self.first_detail[reason]}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- reading


def iter_raw_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(row_number, raw_row)`` from a JSON list, JSONL or Parquet file.

    A JSONL line that is not valid JSON yields ``(row_number, _InvalidJson(error))`` so
    the caller can skip or fail on it like any other bad row.
    """
    path = paths.as_path(path)  # a local file or a URL (gs://...)
    if not path.is_file():
        raise FileNotFoundError(f"input file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as err:
                    yield i, _InvalidJson(str(err))
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json input must hold a list of rows, got {type(data).__name__}")
        yield from enumerate(data)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415 - only Parquet inputs need it

        i = 0
        with contextlib.ExitStack() as stack:
            source = stack.enter_context(path.open("rb")) if paths.is_url(path) else str(path)
            for batch in pq.ParquetFile(source).iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    yield i, row
                    i += 1
    else:
        raise ValueError(f"{path}: unsupported input format {suffix!r}; use one of {list(SUFFIXES)}")


@dataclasses.dataclass(frozen=True)
class _InvalidJson:
    error: str


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _image_entries(row: Mapping[str, Any]) -> list[Any] | None:
    """The row's image entries as a list (``[]`` if none), or ``None`` if malformed."""
    value = row.get("images")
    if _is_missing(value):
        value = row.get("image")
    if _is_missing(value):
        return []
    if isinstance(value, (str, bytes, dict)):
        return [value]
    if isinstance(value, (list, tuple, np.ndarray)):
        return list(value)
    return None


PARENT_LOOKUPS = 2  # parents of the data file's folder also tried for a relative image path


@dataclasses.dataclass(frozen=True)
class ImageRoots:
    """Where relative image paths are looked up: ``--image_dir`` only when given, else the data
    file's folder and then up to ``PARENT_LOOKUPS`` of its parents."""

    dirs: tuple[Path, ...]  # local folders or URLs (gs://...)

    @classmethod
    def for_file(cls, data_file: str | Path, image_dir: str | Path | None) -> ImageRoots:
        if image_dir is not None:
            return cls((paths.resolve(image_dir),))
        folder = paths.resolve(data_file).parent
        parents = list(folder.parents)
        if paths.is_url(folder):  # no lookups above the bucket
            parents = [p for p in parents if len(p.parts) >= 3]
        return cls((folder, *parents[:PARENT_LOOKUPS]))

    def find(self, relative: Path) -> Path:
        """The first existing ``root / relative``; FileNotFoundError naming every path tried."""
        tried = [d / relative for d in self.dirs]
        for path in tried:
            if path.is_file():
                return path
        raise FileNotFoundError(f"no file {str(relative)!r}; tried {', '.join(map(str, tried))}"
                                + ("" if len(self.dirs) > 1 else " (--image_dir)"))


def _read_image(entry: Any, image_dir: Path | ImageRoots) -> bytes:
    """Encoded bytes of one image entry; raises ``OSError`` / ``TypeError`` when impossible."""
    if isinstance(entry, dict):
        if entry.get("bytes") is not None:
            entry = entry["bytes"]
        elif entry.get("path"):
            entry = entry["path"]
        else:
            raise TypeError("image dict has neither 'bytes' nor 'path'")
    if isinstance(entry, (bytes, bytearray)):
        return bytes(entry)
    if isinstance(entry, str) and paths.is_url(entry):
        path = paths.resolve(entry)
        if not path.is_file():
            raise FileNotFoundError(f"no file {str(path)!r}")
        return path.read_bytes()
    if isinstance(entry, str):
        path = Path(entry).expanduser()
        if path.is_absolute():
            if not path.is_file():
                raise FileNotFoundError(f"no file {str(path)!r}")
            return path.read_bytes()
        roots = image_dir if isinstance(image_dir, ImageRoots) else ImageRoots((paths.as_path(image_dir),))
        return roots.find(path).read_bytes()
    raise TypeError(f"image entry of type {type(entry).__name__}")


def check_raw_row(raw: Any, image_dir: Path | ImageRoots) -> tuple[dict[str, Any] | None, str | None, str]:
    """Turn one raw input row into a schema row: ``(row, None, "")`` or ``(None, reason, detail)``."""
    if isinstance(raw, _InvalidJson):
        return None, INVALID_JSON, raw.error
    if not isinstance(raw, Mapping):
        return None, NOT_AN_OBJECT, f"got {type(raw).__name__}"
    entries = _image_entries(raw)
    if entries is None:
        return None, schema.BAD_IMAGES, f"'images' is a {type(raw.get('images')).__name__}"
    row = {k: raw[k] for k in schema.FIELDS if k in raw and k != "images" and not _is_missing(raw[k])}
    row["images"] = [b"" for _ in entries]  # placeholders: count checks before any file read
    reason = schema.validate_row(row, check_images=False)
    if reason is not None:
        return None, reason, _detail(row, reason)
    images = []
    for k, entry in enumerate(entries):
        try:
            data = _read_image(entry, image_dir)
        except FileNotFoundError as err:
            return None, schema.UNREADABLE_IMAGE, f"image {k}: {err.args[0] if err.args else err}"
        except (OSError, TypeError) as err:
            return None, schema.UNREADABLE_IMAGE, f"image {k}: {err}"
        if not schema.image_is_readable(data):
            return None, schema.UNREADABLE_IMAGE, f"image {k}: Pillow cannot decode it"
        images.append(data)
    row["images"] = images
    return schema.normalize_row(row), None, ""


def _detail(row: Mapping[str, Any], reason: str) -> str:
    if reason == schema.IMAGE_COUNT_MISMATCH:
        n = schema.count_placeholders(str(row.get("problem", "")))
        return f"{n} {schema.IMAGE_PLACEHOLDER} placeholders but {len(row['images'])} images"
    return ""


def iter_good_rows(
    path: str | Path,
    report: PrepareReport,
    *,
    image_dir: str | Path | None = None,
    strict: bool = False,
) -> Iterator[dict[str, Any]]:
    """Yield the usable schema rows of ``path``; record bad ones in ``report`` (or raise if strict)."""
    image_root = ImageRoots.for_file(path, image_dir)
    for i, raw in iter_raw_rows(path):
        row, reason, detail = check_raw_row(raw, image_root)
        if reason is not None:
            if strict:
                raise BadRowError(f"{path}: row {i}: {reason}" + (f" ({detail})" if detail else ""))
            report.skip(i, reason, detail)
            continue
        report.written += 1
        yield row


# --------------------------------------------------------------------------- prepare


def prepare(
    input_path: str | Path,
    name: str,
    *,
    image_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    split: str = "train",
    strict: bool = False,
    verbose: bool = False,
) -> PrepareReport:
    """Validate ``input_path`` and write its usable rows as split ``split`` of dataset ``name``.

    ``data_dir`` defaults to the data directory of every command (``vlm_jax.paths.data_dir``). Raises ``BadRowError`` on the first bad row
    when ``strict``, ``ValueError`` when no row is usable.
    """
    tfds_builders.check_dataset_name(name)
    report = PrepareReport(source=str(input_path))
    rows = iter_good_rows(input_path, report, image_dir=image_dir, strict=strict)
    try:
        tfds_builders.write_local_split(
            name, split, rows, _data_dir(data_dir), description=f"Prepared from {input_path}.", verbose=verbose
        )
    except ValueError as err:
        if report.written == 0 and not isinstance(err, BadRowError):
            counts = ", ".join(f"{reason}: {len(rows)}" for reason, rows in sorted(report.skipped.items()))
            detail = f"skipped {report.num_skipped}: {counts or 'empty file'}"
            raise ValueError(f"{input_path}: no usable rows ({detail})") from None
        raise
    return report


def _data_dir(data_dir: str | Path | None) -> Path:
    from vlm_jax import paths  # noqa: PLC0415

    return paths.data_dir(data_dir)


# --------------------------------------------------------------------------- loading


class RowsSource:
    """An in-memory random-access source of schema rows (e.g. an evaluation JSONL file)."""

    def __init__(self, rows: Sequence[dict[str, Any]], name: str, report: PrepareReport | None = None):
        self._rows = list(rows)
        self.name = name
        self.report = report

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self._rows[index]
        return {**row, "images": list(row["images"])}

    def __repr__(self) -> str:
        return f"RowsSource({self.name}, {len(self)} rows)"


def load(
    spec: str | Path,
    split: str = "train",
    data_dir: str | Path | None = None,
    *,
    image_dir: str | Path | None = None,
    strict: bool = False,
) -> tfds_builders.TfdsSource | RowsSource:
    """A random-access source (``len``, ``[i]`` -> schema dict of python types) for ``spec``.

    ``spec`` is ``NAME``, ``NAME[SPLIT]`` (overrides ``split``) for a prepared dataset in
    ``data_dir`` (default: ``vlm_jax.paths.data_dir()``), or a path to a ``.jsonl``/``.json``/``.parquet``
    file, read into memory with bad rows skipped (``source.report``) or, when ``strict``,
    raising ``BadRowError``. Unknown names and missing directories raise ``ValueError``
    naming them and listing the available datasets.
    """
    text = str(spec)
    if Path(text).suffix.lower() in SUFFIXES:
        if not paths.as_path(text).is_file():
            raise ValueError(f"data file {text!r} does not exist")
        report = PrepareReport(source=text)
        rows = list(iter_good_rows(text, report, image_dir=image_dir, strict=strict))
        return RowsSource(rows, name=text, report=report)
    match = _SPEC_RE.match(text)
    name, split = (match["name"], match["split"]) if match else (text, split)
    return tfds_builders.TfdsSource(name, split, _data_dir(data_dir))


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vlm_jax.data.prepare``: prints the report; 1 with one error line on failure."""
    parser = argparse.ArgumentParser(prog="python -m vlm_jax.data.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="JSON (list of rows), JSONL or Parquet file")
    parser.add_argument("--name", required=True, help="dataset name (snake_case)")
    parser.add_argument("--image_dir", default=None, help="folder image paths are relative to (default: the input's)")
    parser.add_argument("--data_dir", default=None,
                        help="data directory (default: $VLM_JAX_DATA_DIR, else ~/vlm_jax/data)")
    parser.add_argument("--split", default="train", help="split to write (other splits are kept)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad row")
    parser.add_argument("--verbose", action="store_true", help="show TFDS progress output")
    args = parser.parse_args(argv)
    from vlm_jax import paths  # noqa: PLC0415

    print(paths.describe_data_dir(args.data_dir))
    try:
        report = prepare(
            args.input,
            args.name,
            image_dir=args.image_dir,
            data_dir=args.data_dir,
            split=args.split,
            strict=args.strict,
            verbose=args.verbose,
        )
    except (ValueError, OSError) as err:
        print(f"prepare: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    print(report.summary())
    print(f"dataset {args.name}[{args.split}] in {_data_dir(args.data_dir)}")
    if report.num_skipped:
        print(f"warning: {report.num_skipped} of {report.num_skipped + report.written} rows were skipped "
              f"(see above; --strict stops at the first one)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

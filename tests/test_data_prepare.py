"""Local-file preparation, the row schema, TFDS builders and ``vlm_jax.data.load``."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import vlm_jax.data as data
from vlm_jax.data import prepare as prep
from vlm_jax.data import schema, tfds_builders

ROOT = Path(__file__).resolve().parents[1]


def _encode(color: str, size: tuple[int, int], fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """An image dir (PNG, JPEG, a corrupt file) and rows: 4 good, 5 bad (one of each reason)."""
    root = tmp_path_factory.mktemp("prep")
    img = root / "img"
    img.mkdir()
    png, jpg = _encode("red", (8, 6), "PNG"), _encode("blue", (10, 10), "JPEG")
    (img / "a.png").write_bytes(png)
    (img / "sub").mkdir()
    (img / "sub" / "b.jpg").write_bytes(jpg)
    (img / "broken.png").write_bytes(b"\x89PNG but not really")
    rows = [
        {"problem": "<image>\nWhat color?", "answer": "red", "images": ["a.png"], "pass_rate": 0.25,
         "task": "color", "caption": "A red square.", "answer_type": "text"},          # 0 one image
        {"problem": "Compare <image> with <image>.", "answer": 4, "images": ["a.png", "sub/b.jpg"],
         "difficulty": 2},                                                               # 1 two images
        {"problem": "What is 2+2?", "answer": "4", "solution": "<think>2+2=4</think> \\boxed{4}"},  # 2 text
        {"problem": "<image> broken", "answer": "x", "images": ["broken.png"]},          # 3 unreadable
        {"answer": "x", "images": []},                                                   # 4 no problem
        {"problem": "no answer here", "images": []},                                     # 5 no answer
        {"problem": "<image><image> two?", "answer": "x", "images": ["a.png"]},          # 6 count mismatch
        {"problem": "<image> gone", "answer": "x", "images": ["missing.png"]},           # 7 missing file
        {"problem": "<image> single field", "answer": "y", "image": "sub/b.jpg"},        # 8 `image` field
    ]
    return {"root": root, "img": img, "rows": rows, "png": png, "jpg": jpg}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


EXPECTED_SKIPS = {
    schema.UNREADABLE_IMAGE: [3, 7],
    schema.MISSING_PROBLEM: [4],
    schema.MISSING_ANSWER: [5],
    schema.IMAGE_COUNT_MISMATCH: [6],
}


def test_validate_row_reasons() -> None:
    png = _encode("red", (4, 4), "PNG")
    good = {"problem": "<image> q", "answer": "a", "images": [png]}
    assert schema.validate_row(good) is None
    assert schema.validate_row({**good, "problem": "  "}) == schema.MISSING_PROBLEM
    assert schema.validate_row({**good, "answer": None}) == schema.MISSING_ANSWER
    assert schema.validate_row({**good, "images": [png, png]}) == schema.IMAGE_COUNT_MISMATCH
    assert schema.validate_row({**good, "images": [b"garbage"]}) == schema.UNREADABLE_IMAGE
    assert schema.validate_row({**good, "images": "a.png"}) == schema.BAD_IMAGES
    assert schema.validate_row({**good, "pass_rate": "high"}) == schema.BAD_FIELD
    row = schema.normalize_row({**good, "problem": b"<image> q", "answer": 7, "difficulty": np.float32(2)})
    assert row == {"problem": "<image> q", "answer": "7", "images": [png], "caption": "", "solution": "",
                   "pass_rate": -1.0, "task": "", "capability": "", "difficulty": 2.0, "answer_type": ""}


def test_prepare_keeps_good_rows_and_reports_each_bad_row(files: dict, tmp_path: Path) -> None:
    src = _write_jsonl(tmp_path / "d.jsonl", files["rows"])
    report = prep.prepare(src, "toy", image_dir=files["img"], data_dir=tmp_path / "tfds")
    assert report.written == 4
    assert report.skipped == EXPECTED_SKIPS
    summary = report.summary()
    assert "kept 4 rows, skipped 5" in summary and "unreadable_image (rows 3, 7)" in summary

    ds = data.load("toy", data_dir=tmp_path / "tfds")
    assert len(ds) == 4
    one, two, text, single = (ds[i] for i in range(4))
    assert one["images"] == [files["png"]]  # original bytes, not re-encoded
    assert (one["problem"], one["answer"], one["pass_rate"], one["task"], one["caption"], one["answer_type"]) == (
        "<image>\nWhat color?", "red", 0.25, "color", "A red square.", "text")
    assert one["difficulty"] == -1.0 and one["solution"] == ""
    assert two["images"] == [files["png"], files["jpg"]] and two["answer"] == "4" and two["difficulty"] == 2.0
    assert text["images"] == [] and text["solution"] == "<think>2+2=4</think> \\boxed{4}"
    assert single["images"] == [files["jpg"]] and single["answer"] == "y"
    assert isinstance(one["pass_rate"], float) and isinstance(one["images"][0], bytes)


def test_strict_names_first_bad_row(files: dict, tmp_path: Path) -> None:
    src = _write_jsonl(tmp_path / "d.jsonl", files["rows"])
    with pytest.raises(prep.BadRowError, match=r"row 3: unreadable_image"):
        prep.prepare(src, "toy", image_dir=files["img"], data_dir=tmp_path / "tfds", strict=True)
    assert tfds_builders.available_datasets(tmp_path / "tfds") == []  # nothing half-written


def test_cli_strict_exits_nonzero_with_one_line(files: dict, tmp_path: Path) -> None:
    rows = [files["rows"][0], files["rows"][6]]  # a good row, then a placeholder/image count mismatch
    src = _write_jsonl(tmp_path / "d.jsonl", rows)
    cmd = [sys.executable, "-m", "vlm_jax.data.prepare", "--input", str(src), "--name", "toy",
           "--image_dir", str(files["img"]), "--data_dir", str(tmp_path / "tfds"), "--strict"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "row 1: image_count_mismatch" in lines[0] and "2 <image> placeholders but 1 images" in lines[0]


def test_cli_report(files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _write_jsonl(tmp_path / "d.jsonl", files["rows"])
    rc = prep.main(["--input", str(src), "--name", "toy", "--image_dir", str(files["img"]),
                    "--data_dir", str(tmp_path / "tfds")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "kept 4 rows, skipped 5" in out and "missing_answer (rows 5)" in out and "toy[train]" in out
    rc = prep.main(["--input", str(tmp_path / "nope.jsonl"), "--name", "toy"])
    err = capsys.readouterr().err
    assert rc == 1 and "nope.jsonl" in err and len(err.strip().splitlines()) == 1


def test_json_jsonl_parquet_read_alike(files: dict, tmp_path: Path) -> None:
    good = [files["rows"][i] for i in (0, 1, 2)]
    _write_jsonl(tmp_path / "d.jsonl", good)
    (tmp_path / "d.json").write_text(json.dumps(good))
    # Parquet in the Hugging Face datasets layout: images as {bytes, path} structs, missing values null.
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    columns = {"problem": pa.string(), "answer": pa.string(), "images": pa.list_(image), "pass_rate": pa.float64(),
               "task": pa.string(), "caption": pa.string(), "answer_type": pa.string(), "difficulty": pa.float64(),
               "solution": pa.string()}
    table = pa.Table.from_pylist([
        {"problem": good[0]["problem"], "answer": "red", "images": [{"bytes": files["png"], "path": None}],
         "pass_rate": 0.25, "task": "color", "caption": "A red square.", "answer_type": "text"},
        {"problem": good[1]["problem"], "answer": "4", "images": [{"bytes": None, "path": "a.png"},
                                                                   {"bytes": files["jpg"], "path": "b.jpg"}],
         "difficulty": 2.0},
        {"problem": good[2]["problem"], "answer": "4", "images": [], "solution": good[2]["solution"]},
    ], schema=pa.schema(columns))
    pq.write_table(table, tmp_path / "d.parquet")
    loaded = {}
    for suffix in ("jsonl", "json", "parquet"):
        report = prep.prepare(tmp_path / f"d.{suffix}", f"toy_{suffix}", image_dir=files["img"],
                              data_dir=tmp_path / "tfds")
        assert report.written == 3 and report.num_skipped == 0
        ds = data.load(f"toy_{suffix}", data_dir=tmp_path / "tfds")
        loaded[suffix] = [ds[i] for i in range(len(ds))]
    assert loaded["jsonl"] == loaded["json"] == loaded["parquet"]
    assert loaded["parquet"][1]["images"] == [files["png"], files["jpg"]]


def test_splits_accumulate_and_specs(files: dict, tmp_path: Path) -> None:
    tfds_dir = tmp_path / "tfds"
    train = _write_jsonl(tmp_path / "train.jsonl", [files["rows"][i] for i in (0, 1, 2)])
    test = _write_jsonl(tmp_path / "test.jsonl", [files["rows"][2]])
    prep.prepare(train, "toy", image_dir=files["img"], data_dir=tfds_dir)
    prep.prepare(test, "toy", image_dir=files["img"], data_dir=tfds_dir, split="test")
    assert tfds_builders.dataset_splits("toy", tfds_dir) == {"train": 3, "test": 1}
    prep.prepare(train, "toy", image_dir=files["img"], data_dir=tfds_dir, split="test")  # replace a split
    assert tfds_builders.dataset_splits("toy", tfds_dir) == {"train": 3, "test": 3}
    assert len(data.load("toy[test]", data_dir=tfds_dir)) == 3
    assert [r["problem"] for r in data.load("toy[train[1:]]", data_dir=tfds_dir)] == [
        files["rows"][1]["problem"], files["rows"][2]["problem"]]
    assert len(tfds.data_source("toy", split="train", data_dir=str(tfds_dir))) == 3  # plain TFDS reads it

    mixed = _write_jsonl(tmp_path / "eval.jsonl", files["rows"])
    source = data.load(str(mixed), image_dir=files["img"])
    assert len(source) == 4 and source.report.skipped == EXPECTED_SKIPS
    assert source[3]["images"] == [files["jpg"]]
    with pytest.raises(prep.BadRowError, match="row 3"):
        data.load(str(mixed), image_dir=files["img"], strict=True)


def test_load_errors_name_the_problem(files: dict, tmp_path: Path) -> None:
    tfds_dir = tmp_path / "tfds"
    prep.prepare(_write_jsonl(tmp_path / "d.jsonl", files["rows"][:1]), "toy", image_dir=files["img"],
                 data_dir=tfds_dir)
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'.*available: \['toy'\]"):
        data.load("nope", data_dir=tfds_dir)
    with pytest.raises(ValueError, match=r"no split 'test'; available: \['train'\]"):
        data.load("toy[test]", data_dir=tfds_dir)
    with pytest.raises(ValueError, match=r"data_dir .*missing.* does not exist"):
        data.load("toy", data_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match=r"data file .*absent.jsonl.* does not exist"):
        data.load(str(tmp_path / "absent.jsonl"))
    with pytest.raises(ValueError, match="invalid dataset name 'Bad-Name'"):
        prep.prepare(tmp_path / "d.jsonl", "Bad-Name", data_dir=tfds_dir)
    bad_only = _write_jsonl(tmp_path / "bad.jsonl", [files["rows"][4], files["rows"][5]])
    with pytest.raises(ValueError, match=r"no usable rows \(skipped 2: missing_answer: 1, missing_problem: 1\)"):
        prep.prepare(bad_only, "toy2", data_dir=tfds_dir)


def test_build_synthetic(tmp_path: Path) -> None:
    sizes = {"train": 6, "validation": 2, "test": 3}
    dirs = data.build_synthetic(tmp_path, sizes=sizes, seed=3)
    assert sorted(dirs) == ["synthetic_perception", "synthetic_textual_reasoning", "synthetic_visual_reasoning"]
    assert data.available_datasets(tmp_path) == sorted(dirs)
    for name, capability in [("synthetic_perception", "perception"),
                             ("synthetic_textual_reasoning", "textual_reasoning"),
                             ("synthetic_visual_reasoning", "visual_reasoning")]:
        assert tfds_builders.dataset_splits(name, tmp_path) == sizes
        rows = [data.load(f"{name}[test]", data_dir=tmp_path)[i] for i in range(3)]
        assert all(schema.validate_row(r) is None and r["capability"] == capability for r in rows)
    from vlm_jax.data import synthetic

    expected = schema.normalize_row(synthetic.generate("perception", 6, seed=3, split="train")[4])
    got = data.load("synthetic_perception", data_dir=tmp_path)[4]
    assert got == expected  # generation order kept, fields intact
    data.build_synthetic(tmp_path, sizes={**sizes, "train": 4}, seed=3)  # other settings -> rebuilt
    assert tfds_builders.dataset_splits("synthetic_perception", tmp_path)["train"] == 4
    # per-capability generator options: only the perception set changes
    style = {"perception": {"tasks": ["color"], "max_objects": 1}}
    data.build_synthetic(tmp_path, sizes={**sizes, "train": 4}, seed=3, generator_kwargs=style)
    perception = data.load("synthetic_perception", data_dir=tmp_path)
    assert {perception[i]["task"] for i in range(4)} == {"color"}
    assert data.load("synthetic_textual_reasoning", data_dir=tmp_path)[0] == schema.normalize_row(
        synthetic.generate("textual_reasoning", 4, seed=3, split="train")[0])
    with pytest.raises(ValueError, match=r"capabilities .* got \['vision'\]"):
        data.build_synthetic(tmp_path, sizes=sizes, generator_kwargs={"vision": {}})

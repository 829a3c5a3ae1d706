"""MetricsWriter: JSONL records, NaN handling, resume truncation, eval files, TensorBoard, progress."""

import io
import json
import struct
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from vlm_jax.metrics import MetricsWriter, StageProgress, eval_filename, progress_postfix, to_number


def _strict_lines(path: Path) -> list[dict]:
    """Parse JSONL refusing NaN/Infinity tokens, i.e. as strict JSON readers do."""
    def reject(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token} in {path}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def _read_events(logdir: Path) -> list[event_pb2.Event]:
    """Decode TFRecord event files by hand: u64 length, u32 crc, payload, u32 crc per record."""
    events = []
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert files, f"no event files in {logdir}"
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            pos += 12
            events.append(event_pb2.Event.FromString(data[pos:pos + length]))
            pos += length + 4
    return events


def _scalars(events: list[event_pb2.Event]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for event in events:
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_write_records_keys_and_python_types(tmp_path):
    before = time.time()
    with MetricsWriter(tmp_path, tensorboard=False, progress=False, is_main=True) as writer:
        writer.write(7, "perception", 3, {
            "loss": np.float32(0.25), "reward/mean": jnp.asarray(0.75, jnp.float32),
            "response_length/mean": jnp.asarray([12.5]), "grad_norm": 1.5,
            "skipped_nonfinite": np.int64(2), "filtered": True, "count": 4,
        })
    [record] = _strict_lines(tmp_path / "metrics.jsonl")
    assert list(record)[:4] == ["step", "stage", "stage_step", "time"]
    assert record["step"] == 7 and record["stage"] == "perception" and record["stage_step"] == 3
    assert before <= record["time"] <= time.time()
    assert record["loss"] == 0.25 and record["reward/mean"] == 0.75
    assert record["response_length/mean"] == 12.5 and record["grad_norm"] == 1.5
    assert record["skipped_nonfinite"] == 2 and type(record["skipped_nonfinite"]) is int
    assert record["filtered"] == 1 and record["count"] == 4


def test_nonfinite_values_are_null_and_json_stays_strict(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False, progress=False, is_main=True) as writer:
        writer.write(0, "sft", 0, {"loss": float("nan"), "grad_norm": np.float32(np.inf),
                                   "reward/mean": jnp.asarray(-jnp.inf), "ok": 1.0})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    [record] = _strict_lines(tmp_path / "metrics.jsonl")
    assert record["loss"] is None and record["grad_norm"] is None and record["reward/mean"] is None
    assert record["ok"] == 1.0


def test_each_write_is_flushed_before_close(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False, progress=False, is_main=True)
    writer.write(0, "s", 0, {"loss": 1.0})
    writer.write(1, "s", 1, {"loss": 2.0})
    assert [r["loss"] for r in _strict_lines(tmp_path / "metrics.jsonl")] == [1.0, 2.0]
    writer.close()


def test_bad_metrics_raise_naming_the_key(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False, progress=False, is_main=True)
    with pytest.raises(ValueError, match="'per_token'.*shape"):
        writer.write(0, "s", 0, {"per_token": np.zeros(3)})
    with pytest.raises(TypeError, match="'note'"):
        writer.write(0, "s", 0, {"note": "hello"})
    with pytest.raises(ValueError, match="'step' is reserved"):
        writer.write(0, "s", 0, {"step": 1})
    with pytest.raises(ValueError, match="step must be >= 0"):
        writer.write(-1, "s", 0, {"loss": 1.0})
    with pytest.raises(TypeError, match="step must be an int"):
        writer.write(1.5, "s", 0, {"loss": 1.0})
    with pytest.raises(ValueError, match="stage"):
        writer.write(0, "", 0, {"loss": 1.0})
    writer.close()
    assert not (tmp_path / "metrics.jsonl").exists()  # validated before anything is written


def test_to_number_conversions():
    assert to_number("k", np.float16(0.5)) == 0.5
    assert to_number("k", jnp.asarray(3, jnp.int32)) == 3
    assert to_number("k", np.bool_(True)) == 1
    assert to_number("k", jnp.asarray(1.5, jnp.bfloat16)) == 1.5  # ml_dtypes: dtype kind "V"
    with pytest.raises(TypeError, match="'k'.*dtype"):
        to_number("k", np.asarray("1.5"))
    assert to_number("k", float("-inf")) is None


def test_resume_truncates_and_appends_without_duplicates(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False, progress=False, is_main=True) as writer:
        for step in range(5):
            writer.write(step, "perception", step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "stage": "percep')  # killed mid-write
    resumed = MetricsWriter(tmp_path, tensorboard=False, progress=False, is_main=True)
    assert resumed.truncate_after(3) == 3  # steps 3, 4 and the partial line
    for step in (3, 4, 5):
        resumed.write(step, "perception", step, {"loss": 10.0 + step})
    resumed.close()
    records = _strict_lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert [r["loss"] for r in records] == [0.0, 1.0, 2.0, 13.0, 14.0, 15.0]


def test_truncate_after_rejects_corrupt_middle_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "stage": "s"}\nnot json\n{"step": 2, "stage": "s"}\n')
    writer = MetricsWriter(tmp_path, tensorboard=False, progress=False, is_main=True)
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        writer.truncate_after(1)


def test_write_eval_file_name_content_and_scalars(tmp_path):
    result = {"when": "after", "accuracy": np.float32(0.625), "mean_response_length": 90.5, "n": 8,
              "per_task": {"counting": {"accuracy": 0.5, "mean_response_length": 80.0, "n": 4}}}
    with MetricsWriter(tmp_path, tensorboard=False, progress=False, is_main=True) as writer:
        path = writer.write_eval(12, "perception", "geo", result)
        other = writer.write_eval(3, "sft", "data/geo.jsonl", {"accuracy": 0.1, "mean_response_length": 5})
    assert path == tmp_path / "eval" / "0000012_perception_geo.json"
    assert other == tmp_path / "eval" / "0000003_sft_data_geo.jsonl.json"
    content = json.loads(path.read_text())
    assert content == {"when": "after", "accuracy": 0.625, "mean_response_length": 90.5, "n": 8,
                       "per_task": {"counting": {"accuracy": 0.5, "mean_response_length": 80.0, "n": 4}},
                       "step": 12, "stage": "perception", "name": "geo"}
    other_content = json.loads(other.read_text())
    assert other_content["name"] == "data/geo.jsonl" and other_content["when"] == "during"
    records = _strict_lines(tmp_path / "metrics.jsonl")
    assert records[0]["step"] == 12 and records[0]["stage"] == "perception"
    assert records[0]["eval/geo/accuracy"] == 0.625
    assert records[0]["eval/geo/response_length"] == 90.5
    assert records[1]["eval/data_geo.jsonl/accuracy"] == pytest.approx(0.1)
    assert eval_filename(5, "a", "b") == "0000005_a_b.json"


def test_write_eval_rejects_incomplete_results(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False, progress=False, is_main=True)
    with pytest.raises(KeyError, match="mean_response_length"):
        writer.write_eval(0, "s", "geo", {"accuracy": 0.5})
    with pytest.raises(ValueError, match="'when'"):
        writer.write_eval(0, "s", "geo", {"accuracy": 0.5, "mean_response_length": 1.0, "when": "later"})
    assert not (tmp_path / "eval").exists()


def test_tensorboard_scalars_read_back_and_purge_on_resume(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=True, progress=False, is_main=True) as writer:
        writer.write(0, "perception", 0, {"loss": 2.0, "reward/mean": 0.5, "bad": float("nan")})
        writer.write(1, "perception", 1, {"loss": 1.5, "reward/mean": 0.75})
        writer.write_eval(2, "perception", "geo", {"accuracy": 0.25, "mean_response_length": 40.0})
    scalars = _scalars(_read_events(tmp_path / "tensorboard"))
    assert scalars["loss"] == [(0, 2.0), (1, 1.5)]
    assert scalars["reward/mean"] == [(0, 0.5), (1, 0.75)]
    assert scalars["eval/geo/accuracy"] == [(2, 0.25)]
    assert scalars["eval/geo/response_length"] == [(2, 40.0)]
    assert "bad" not in scalars  # NaN is not logged to TensorBoard

    with MetricsWriter(tmp_path, tensorboard=True, progress=False, is_main=True) as resumed:
        resumed.truncate_after(1)
        resumed.write(1, "perception", 1, {"loss": 9.0})
    events = _read_events(tmp_path / "tensorboard")
    starts = [e for e in events if e.HasField("session_log")
              and e.session_log.status == event_pb2.SessionLog.START]
    assert [e.step for e in starts] == [1]  # TensorBoard hides the stale step >= 1 events
    after_restart = [e for e in events if e.wall_time >= starts[0].wall_time]
    assert _scalars(after_restart)["loss"] == [(1, 9.0)]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_non_main_process_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    writer = MetricsWriter(workdir, tensorboard=True, progress=True, is_main=False)
    writer.write(0, "s", 0, {"loss": 1.0})
    assert writer.write_eval(0, "s", "geo", {"accuracy": 0.5, "mean_response_length": 3.0}) is None
    with writer.stage_progress("s", 10) as bar:
        bar.update({"loss": 1.0})
        assert bar.n == 0
    assert writer.truncate_after(0) == 0
    writer.close()
    assert not workdir.exists()


def test_default_is_main_uses_jax_process_index(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False, progress=False) as writer:
        assert writer.is_main  # single-process run: process 0
        writer.write(0, "s", 0, {"loss": 1.0})
    assert len(_strict_lines(tmp_path / "metrics.jsonl")) == 1


def test_progress_bar_shows_stage_count_and_main_numbers():
    out = io.StringIO()
    bar = StageProgress("perception", 10, initial=2, file=out, mininterval=0)
    bar.update({"loss": np.float32(0.5), "reward/mean": 0.25, "grad_norm": 3.0,
                "response_length/mean": jnp.asarray(120.0)})
    bar.update()
    assert bar.n == 4
    bar.close()
    text = out.getvalue()
    assert "perception" in text and "4/10" in text
    assert "loss=0.5" in text and "reward=0.25" in text and "len=120" in text
    assert "grad_norm" not in text


def test_progress_postfix_and_disabled_writer(tmp_path):
    assert progress_postfix({"accuracy": 0.123456, "loss": float("nan"), "other": 1.0}) == {
        "loss": "nan", "acc": "0.1235"}
    writer = MetricsWriter(tmp_path, tensorboard=False, progress=False, is_main=True)
    with writer.stage_progress("sft", 5) as bar:
        bar.update({"loss": 1.0})
        assert bar.n == 0

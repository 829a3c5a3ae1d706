"""The grain pipeline: prompt format, shape buckets, masks, order, sharding, skips, resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data import pipeline as pl
from vlm_jax.data import rows as row_lib
from vlm_jax.data import prepare as prep
from vlm_jax.data.processor import Processor
from vlm_jax.data.schema import normalize_row
from vlm_jax.models.tiny import build_tiny_model

# The tiny model's image processor: 14-pixel patches, 2x2 merge, min_pixels 56*56, so a 56x56
# image stays 56x56: grid (1, 4, 4) = 16 patches = 4 image tokens; 112x56 -> (1, 4, 8) = 32 patches.


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory) -> Processor:
    return Processor.from_pretrained(build_tiny_model(tmp_path_factory.mktemp("tiny"), weights=False))


def _png(color: str, size: tuple[int, int] = (56, 56)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _row(problem: str, images: list[bytes], **fields: object) -> dict:
    return normalize_row({"problem": problem, "answer": "1", "images": images, **fields})


def _source(rows: list[dict], name: str = "toy") -> prep.RowsSource:
    return prep.RowsSource(rows, name=name)


def _indices(it: pl.BatchIterator, n_batches: int | None = None) -> list[list[int]]:
    batches = list(it) if n_batches is None else [next(it) for _ in range(n_batches)]
    return [[i for i in batch["index"] if i >= 0] for batch in batches]


def _prompt_ids(processor: Processor, row: dict, spec: row_lib.RowSpec = row_lib.RowSpec()) -> np.ndarray:
    messages, images = row_lib.prompt_inputs(row, spec)
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    out = processor([processor.apply_chat_template(messages)], [pil] if pil else None)
    return out["input_ids"][0]


def test_prompt_format() -> None:
    row = _row("Compare <image> and\n<image> please.", [_png("red"), _png("blue")])
    messages, images = row_lib.prompt_inputs(row, row_lib.RowSpec())
    assert len(images) == 2
    assert messages == [{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
        {"type": "text", "text": "please.\n" + row_lib.REASONING_INSTRUCTION}]}]
    messages, _ = row_lib.prompt_inputs(_row("Look: <image>", [_png("red")]), row_lib.RowSpec(system_prompt="Be brief."))
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["content"][-2:] == [{"type": "image"}, {"type": "text", "text": row_lib.REASONING_INSTRUCTION}]
    # text_only: the caption replaces the images
    row = _row("<image>\nWhat shape?", [_png("red")], caption="A red square.")
    messages, images = row_lib.prompt_inputs(row, row_lib.RowSpec(text_only=True, instruction=""))
    assert images == [] and messages[0]["content"] == [
        {"type": "text", "text": "Image description: A red square.\nWhat shape?"}]


def test_prompt_batch_shapes_and_text_row_beside_image_rows(processor: Processor) -> None:
    rows = [_row("<image> What color?", [_png("red")]),
            _row("What is 2+2?", []),
            _row("Compare <image> with <image>.", [_png("red"), _png("blue", (112, 56))])]
    it = pl.make_dataset([(_source(rows), 1.0)], processor, batch_size=4, order="easy_to_hard", num_epochs=1,
                         length_buckets=(16, 64, 128, 256))
    batch = next(it)
    lengths = [len(_prompt_ids(processor, r)) for r in rows]
    expected_len = min(b for b in (16, 64, 128, 256) if b >= max(lengths))
    assert batch["input_ids"].shape == (4, expected_len) and max(lengths) > 64
    # left padding: real tokens end at the last column; row 3 pads the partial batch
    assert batch["attention_mask"][:, -1].tolist() == [1, 1, 1, 1]
    assert batch["attention_mask"].sum(1).tolist() == lengths + [lengths[-1]]
    assert batch["row_mask"].tolist() == [1, 1, 1, 0] and batch["index"] == [0, 1, 2, -1]
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(batch["input_ids"][i, -lengths[i]:], _prompt_ids(processor, row))
    # images: 16 + (16 + 32) patches for the real rows, + 48 for the padding copy of row 2
    assert batch["mm_token_type_ids"].sum(1).tolist() == [4, 0, 12, 12]
    assert batch["num_images"] == 5 and batch["num_patches"] == 16 + 48 + 48
    assert batch["image_grid_thw"].shape == (8, 3)
    assert batch["image_grid_thw"][:5].tolist() == [[1, 4, 4], [1, 4, 4], [1, 4, 8], [1, 4, 4], [1, 4, 8]]
    assert not batch["image_grid_thw"][5:].any()
    assert batch["pixel_values"].shape == (128, 1176) and batch["pixel_mask"].sum() == 112
    assert not batch["pixel_values"][112:].any() and "loss_mask" not in batch
    with pytest.raises(StopIteration):
        next(it)
    # text-only batch: minimum patch bucket, one zero image row
    it = pl.make_dataset([(_source(rows[1:2]), 1.0)], processor, batch_size=2, num_epochs=1)
    batch = next(it)
    assert batch["pixel_values"].shape == (64, 1176) and batch["image_grid_thw"].tolist() == [[0, 0, 0]]
    assert batch["num_images"] == 0 and batch["input_ids"].shape == (2, pl.bucket(lengths[1], (64, 128, 256, 512)))


def test_sft_loss_mask_by_hand(processor: Processor) -> None:
    rows = [_row("What is 2+2?", [], solution="four"), _row("<image> Color?", [_png("red")], solution="red")]
    it = pl.make_dataset([(_source(rows), 1.0)], processor, batch_size=2, num_epochs=1, order="easy_to_hard",
                         target_field="solution", length_buckets=(128,))
    batch = next(it)
    tok = processor.tokenizer
    for i, (row, target) in enumerate(zip(rows, ["four", "red"])):
        prompt = _prompt_ids(processor, row)
        target_ids = tok(target + "<|im_end|>", add_special_tokens=False)["input_ids"]
        n = len(prompt) + len(target_ids)
        # right padding: prompt, target, then pad tokens
        np.testing.assert_array_equal(batch["input_ids"][i, :n], np.concatenate([prompt, target_ids]))
        assert (batch["input_ids"][i, n:] == processor.pad_token_id).all()
        expected_mask = np.zeros(128, np.int32)
        expected_mask[len(prompt):n] = 1
        np.testing.assert_array_equal(batch["loss_mask"][i], expected_mask)
        assert tok.decode(batch["input_ids"][i][batch["loss_mask"][i] > 0]) == target + "<|im_end|>"
    assert batch["attention_mask"][:, 0].tolist() == [1, 1]
    assert not (batch["loss_mask"] * batch["mm_token_type_ids"]).any()


def test_sharding_is_disjoint_and_covering(processor: Processor) -> None:
    rows = [_row(f"Question {i}?", []) for i in range(11)]
    seen = []
    for shard in range(2):
        it = pl.make_dataset([(_source(rows), 1.0)], processor, batch_size=4, seed=5, num_epochs=1,
                             shard_index=shard, shard_count=2)
        seen.append([i for batch in _indices(it) for i in batch])
    assert sorted(seen[0]) == [0, 2, 4, 6, 8, 10] and sorted(seen[1]) == [1, 3, 5, 7, 9]
    assert seen[0] != sorted(seen[0]) or seen[1] != sorted(seen[1])  # shuffled within the shard


def test_easy_to_hard_order(processor: Processor) -> None:
    rates = [0.2, 0.9, -1.0, 0.5, 0.9, 0.0]
    rows = [_row(f"Q{i}", [], pass_rate=p, difficulty=[3, 1, 2, 2, 1, -1][i]) for i, p in enumerate(rates)]
    it = pl.make_dataset([(_source(rows), 1.0)], processor, batch_size=2, num_epochs=1, order="easy_to_hard")
    assert sum(_indices(it), []) == [1, 4, 3, 0, 5, 2]  # pass rate descending, ties in source order, unknown last
    it = pl.make_dataset([(_source(rows), 1.0)], processor, batch_size=2, num_epochs=1, order="easy_to_hard",
                         order_key="difficulty")
    assert sum(_indices(it), []) == [1, 4, 2, 3, 0, 5]
    # within each capability, keeping the capability slots: p p t p t
    perm = pl.easy_to_hard_order([0.1, 0.8, 0.3, 0.5, 0.9], ["p", "p", "t", "p", "t"], "pass_rate")
    assert perm.tolist() == [1, 3, 4, 0, 2]


def test_paced_order(processor: Processor) -> None:
    # competence by hand: sqrt(start^2 + (1 - start^2) k / pace_rows), capped at 1
    assert pl.competence(0, 100, 0.25) == pytest.approx(0.25)
    assert pl.competence(50, 100, 0.5) == pytest.approx(np.sqrt(0.25 + 0.75 * 0.5))
    assert pl.competence(150, 100, 0.5) == 1.0
    # 12 rows, difficulty = 12 - index (row 11 easiest); ties of equal difficulty in a seeded order
    rows = [_row(f"Q{i}?", [], difficulty=12 - i) for i in range(12)]
    ranked = pl.rank_easy_to_hard([r["difficulty"] for r in rows], "difficulty", seed=0)
    assert ranked.tolist() == list(range(11, -1, -1))
    ties = pl.rank_easy_to_hard([1, 2, 1, 1, -1, 2], "difficulty", seed=3)
    assert sorted(ties[:3].tolist()) == [0, 2, 3] and sorted(ties[3:5].tolist()) == [1, 5] and ties[5] == 4

    def make(shard: int = 0, count: int = 1):
        return pl.make_dataset([(_source(rows), 1.0)], processor, batch_size=4, seed=7, order="paced",
                               order_key="difficulty", pace_rows=24, pace_start=0.25, shard_index=shard,
                               shard_count=count)

    drawn = sum(_indices(make(), 12), [])  # 24 paced draws, then 2 shuffled epochs
    for k, i in enumerate(drawn[:24]):  # each from the easiest ceil(competence * 12) rows
        assert rows[i]["difficulty"] - 1 < np.ceil(pl.competence(k, 24, 0.25) * 12 - 1e-9), (k, i)
    assert sorted(drawn[24:36]) == list(range(12)) and sorted(drawn[36:]) == list(range(12))
    assert drawn[24:36] != drawn[36:48]  # a new permutation each epoch
    # two shards split the same global order: together they are the one-shard order, disjoint epochs
    halves = [sum(_indices(make(k, 2), 6), []) for k in range(2)]
    assert sorted(halves[0][12:] + halves[1][12:]) == sorted(drawn[24:])
    assert [halves[k % 2][k // 2] for k in range(24)] == drawn[:24]
    # resume mid-pacing
    it = make()
    _indices(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    resumed = make()
    resumed.set_state(state)
    assert _indices(resumed, 5) == _indices(it, 5)
    with pytest.raises(ValueError, match="pace_rows >= 1"):
        pl.make_dataset([(_source(rows), 1.0)], processor, batch_size=4, order="paced", pace_rows=0)


def test_resume_mid_epoch(processor: Processor) -> None:
    rows = [_row(f"Question {i}?", [_png("red")] if i % 3 == 0 else []) for i in range(10)]
    rows[0] = _row("<image> broken", [b"not an image"])
    make = lambda: pl.make_dataset([(_source(rows), 1.0)], processor, batch_size=3, seed=1)  # noqa: E731
    it = make()
    _indices(it, 2)
    state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
    expected = _indices(it, 5)  # crosses the epoch boundary (reshuffled)
    resumed = make()
    resumed.set_state(state)
    assert _indices(resumed, 5) == expected
    assert resumed.stats == it.stats and it.stats["skipped"]["unreadable_image"] >= 1
    assert it.stats["batches"] == 7 and it.stats["rows"] == 21


def test_row_cache(processor: Processor) -> None:
    """Later epochs come from the cache: the same batches, each row read and encoded once, skipped
    rows still counted every epoch; past its byte budget rows are encoded again, not kept."""
    rows = [_row(f"<image> Question {i}?", [_png("red")]) if i % 2 == 0 else _row(f"Question {i}?", [])
            for i in range(6)]
    rows[2] = _row("<image> broken", [b"not an image"])

    class Counting(prep.RowsSource):
        reads = 0

        def __getitem__(self, i):
            Counting.reads += 1
            return super().__getitem__(i)

    def run(cache_bytes: int):
        Counting.reads = 0
        it = pl.make_dataset([(Counting(rows, name="toy"), 1.0)], processor, batch_size=3, seed=1, num_epochs=3,
                             row_cache=cache_bytes)
        return list(it), it, Counting.reads

    plain, plain_it, plain_reads = run(0)
    cached, it, reads = run(1 << 20)
    assert len(cached) == len(plain) == 5  # 3 epochs x 5 usable rows = 15 rows
    for a, b in zip(plain, cached):
        for key, value in a.items():
            assert np.array_equal(np.asarray(value), np.asarray(b[key])), key
    assert it.stats == plain_it.stats and it.stats["skipped"]["unreadable_image"] == 3
    assert plain_reads == 18 and reads == 6
    assert (it.row_cache.misses, it.row_cache.hits) == (6, 12) and 0 < it.row_cache.bytes <= 1 << 20
    one_image_row = it.row_cache.bytes // 4  # room for about one image row: the rest is encoded each time
    _, small, small_reads = run(one_image_row)
    assert small.row_cache.bytes <= one_image_row and small_reads > 6 and len(small.row_cache._rows) < 6
    with pytest.raises(ValueError, match="max_bytes"):
        row_lib.RowCache(-1)
    # a cache shared by iterators over the same rows (an evaluation set after every stage) encodes once
    shared = row_lib.RowCache(1 << 20)
    for _ in range(2):
        list(pl.make_dataset([(Counting(rows, name="toy"), 1.0)], processor, batch_size=3, num_epochs=1,
                             row_cache=shared))
    assert (shared.misses, shared.hits) == (6, 6)
    with pytest.raises(ValueError, match="row cache holds rows encoded as"):  # another spec: refused
        pl.make_dataset([(Counting(rows, name="toy"), 1.0)], processor, batch_size=3, target_field="answer",
                        row_cache=shared)


def test_skips_counted_or_strict(processor: Processor) -> None:
    rows = [_row("Short?", []),
            _row("long " * 200, []),
            _row("<image> broken", [b"garbage"]),
            _row("Compare <image> and <image>", [_png("red"), _png("blue")]),
            _row("<image> no caption", [_png("red")]),
            _row("Fine <image>", [_png("red")], caption="red")]
    src = _source(rows, name="mine")
    it = pl.make_dataset([(src, 1.0)], processor, batch_size=2, num_epochs=1, order="easy_to_hard",
                         max_prompt_len=100, length_buckets=(128,), max_pixels_per_batch=2 * 16 * 196)
    batches = list(it)
    kept = sum(([i for i in b["index"] if i >= 0] for b in batches), [])
    assert kept == [0, 4, 5]
    skipped = {k: v for k, v in it.stats["skipped"].items() if v}
    assert skipped == {"prompt_too_long": 1, "unreadable_image": 1, "too_many_pixels": 1}
    assert all(b["pixel_values"].shape[0] <= 32 for b in batches)  # 2 rows x 16 patches budget
    it = pl.make_dataset([(src, 1.0)], processor, batch_size=2, num_epochs=1, order="easy_to_hard",
                         text_only=True, length_buckets=(64, 2048))
    assert sum(_indices(it), []) == [0, 1, 5] and it.stats["skipped"]["missing_caption"] == 3
    it = pl.make_dataset([(src, 1.0)], processor, batch_size=2, num_epochs=1, order="easy_to_hard",
                         max_prompt_len=100, length_buckets=(128,), strict=True)
    with pytest.raises(prep.BadRowError, match=r"mine: row 1: prompt_too_long \(\d+ tokens > 100\)"):
        list(it)


def test_mix_weights_and_tfds_source(processor: Processor, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"problem": f"T{i}?", "answer": str(i)}) + "\n" for i in range(5)))
    prep.prepare(path, "text_rows", data_dir=tmp_path / "tfds")
    tfds_src = prep.load("text_rows", data_dir=tmp_path / "tfds")
    img_src = _source([_row(f"<image> I{i}?", [_png("red")]) for i in range(4)])
    it = pl.make_dataset([(tfds_src, 3.0), (img_src, 1.0)], processor, batch_size=4, seed=0)
    sources = [s for _, b in zip(range(10), it) for s in b["source"]]
    assert sources.count(0) == 30 and sources.count(1) == 10
    assert it.stats["rows"] == 40


def test_bad_arguments(processor: Processor) -> None:
    src = _source([_row("Q?", [])])
    with pytest.raises(ValueError, match="order must be"):
        pl.make_dataset([(src, 1.0)], processor, batch_size=1, order="random")
    with pytest.raises(ValueError, match=r"max_prompt_len must be in \[1, 64\]"):
        pl.make_dataset([(src, 1.0)], processor, batch_size=1, length_buckets=(64,), max_prompt_len=100)
    with pytest.raises(ValueError, match=r"sources\[0\] must be a \(source, weight > 0\) pair"):
        pl.make_dataset([(src, 0.0)], processor, batch_size=1)
    with pytest.raises(ValueError, match="target_field must be one of"):
        pl.make_dataset([(src, 1.0)], processor, batch_size=1, target_field="problem")
    with pytest.raises(ValueError, match="fewer than shard_count=2"):
        pl.make_dataset([(src, 1.0)], processor, batch_size=1, shard_index=1, shard_count=2)

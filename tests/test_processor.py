"""The torch-free Processor reproduces Qwen2_5_VLProcessor's outputs on the tiny model."""

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data.processor import Processor, expand_image_tokens, num_image_tokens
from vlm_jax.models.tiny import build_tiny_model


@pytest.fixture(scope="module")
def proc(tmp_path_factory) -> Processor:
    path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", weights=False)
    return Processor.from_pretrained(path)


def _image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# 84x140 px -> 6x10 patches (15 LM tokens); 56x56 px -> 4x4 patches (4 LM tokens), hand-computed
# with smart_resize under min_pixels=28*28*4, max_pixels=28*28*64.
WIDE, SQUARE = _image(84, 140, 0), _image(56, 56, 1)


def _prompt(proc: Processor, n_images: int, text: str) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return proc.apply_chat_template([{"role": "user", "content": content}])


@pytest.fixture(scope="module")
def batch_inputs(proc):
    texts = [_prompt(proc, 0, "What is 12 + 30?"), _prompt(proc, 1, "Count the shapes."),
             _prompt(proc, 2, "Which image is wider?")]
    return texts, [[], [WIDE], [SQUARE, WIDE]]


def test_attributes(proc):
    tok = proc.tokenizer
    assert proc.merge_size == 2 and proc.image_token == "<|image_pad|>"
    assert proc.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert proc.eos_token_ids == [tok.convert_tokens_to_ids("<|im_end|>"),
                                  tok.convert_tokens_to_ids("<|endoftext|>")]
    assert proc.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")


def test_expand_image_tokens_by_hand():
    got = expand_image_tokens("a<|image_pad|>b<|image_pad|>c", [[1, 2, 2], [1, 4, 6]], 2)
    assert got == "a" + "<|image_pad|>" * 1 + "b" + "<|image_pad|>" * 6 + "c"
    assert expand_image_tokens("no images", [], 2) == "no images"
    assert num_image_tokens([2, 4, 6], 2) == 12
    with pytest.raises(ValueError, match="1 <\\|image_pad\\|> placeholders but 2 images"):
        expand_image_tokens("x<|image_pad|>", [[1, 2, 2], [1, 2, 2]], 2)
    with pytest.raises(ValueError, match="merge"):
        num_image_tokens([1, 3, 3], 2)


def test_mixed_batch_matches_the_placeholder_rule(proc, batch_inputs):
    texts, images = batch_inputs
    out = proc(texts, images)
    assert set(out) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                        "image_grid_thw"}
    assert out["input_ids"].dtype == out["attention_mask"].dtype == np.int32
    assert out["pixel_values"].dtype == np.float32 and out["image_grid_thw"].dtype == np.int32
    # Batch-then-row order: row 1's image, then row 2's two images.
    np.testing.assert_array_equal(out["image_grid_thw"], [[1, 6, 10], [1, 4, 4], [1, 6, 10]])
    assert out["pixel_values"].shape == (60 + 16 + 60, 3 * 2 * 14 * 14)
    np.testing.assert_array_equal(out["mm_token_type_ids"],
                                  (out["input_ids"] == proc.image_token_id).astype(np.int32))
    assert out["mm_token_type_ids"].sum(axis=1).tolist() == [0, 15, 4 + 15]

    # Independent reference: tokenize the unexpanded prompt, then splice n copies per image.
    for row, (text, n_tokens) in enumerate(zip(texts, ([], [15], [4, 15]))):
        ids = proc.tokenizer(text)["input_ids"]
        want: list[int] = []
        counts = iter(n_tokens)
        for t in ids:
            want += [t] * next(counts) if t == proc.image_token_id else [t]
        got = out["input_ids"][row][out["attention_mask"][row] == 1]
        assert got.tolist() == want, row


def test_image_runs_sit_between_vision_markers(proc, batch_inputs):
    texts, images = batch_inputs
    out = proc(texts, images, padding_side="right")
    start = proc.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    end = proc.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    ids = out["input_ids"][2]
    starts, ends = np.flatnonzero(ids == start), np.flatnonzero(ids == end)
    assert [e - s - 1 for s, e in zip(starts, ends)] == [4, 15]
    assert all((ids[s + 1:e] == proc.image_token_id).all() for s, e in zip(starts, ends))


def test_pixel_values_equal_the_image_processor(proc, batch_inputs):
    texts, images = batch_inputs
    out = proc(texts, images)
    ref = proc.image_processor([WIDE, SQUARE, WIDE], return_tensors="np")
    np.testing.assert_array_equal(out["pixel_values"], ref["pixel_values"])
    np.testing.assert_array_equal(out["image_grid_thw"], ref["image_grid_thw"])


def test_left_and_right_padding(proc, batch_inputs):
    texts, images = batch_inputs
    left = proc(texts, images, padding_side="left")
    right = proc(texts, images, padding_side="right")
    lengths = left["attention_mask"].sum(axis=1)
    length = left["input_ids"].shape[1]
    assert length == lengths.max() and lengths[0] < length
    for row, n in enumerate(lengths):
        assert left["attention_mask"][row].tolist() == [0] * (length - n) + [1] * n
        assert right["attention_mask"][row].tolist() == [1] * n + [0] * (length - n)
        assert (left["input_ids"][row, :length - n] == proc.pad_token_id).all()
        assert (right["input_ids"][row, n:] == proc.pad_token_id).all()
        np.testing.assert_array_equal(left["input_ids"][row, length - n:],
                                      right["input_ids"][row, :n])


def test_max_length_and_multiple(proc, batch_inputs):
    texts, images = batch_inputs
    longest = int(proc(texts, images)["attention_mask"].sum(axis=1).max())
    padded = proc(texts, images, max_length=longest + 5)
    assert padded["input_ids"].shape == (3, longest + 5)
    multiple = proc(texts, images, pad_to_multiple_of=32)
    assert multiple["input_ids"].shape[1] == -(-longest // 32) * 32
    with pytest.raises(ValueError, match="row 2: .* exceed max_length"):
        proc(texts, images, max_length=longest - 1)


def test_text_only_batch_has_empty_image_arrays(proc):
    out = proc(["hello world", "<|im_start|>user\nhi<|im_end|>"])
    assert out["pixel_values"].shape == (0, 1176)
    assert out["image_grid_thw"].shape == (0, 3)
    assert out["mm_token_type_ids"].sum() == 0
    assert out["input_ids"][0][out["attention_mask"][0] == 1].tolist() == \
        proc.tokenizer("hello world")["input_ids"]


def test_placeholder_count_mismatch_names_the_row(proc):
    texts = ["plain", "<|vision_start|><|image_pad|><|vision_end|> one image"]
    with pytest.raises(ValueError, match="row 1: 1 <\\|image_pad\\|> placeholders but 0 images"):
        proc(texts, [[], []])
    with pytest.raises(ValueError, match="row 1: 1 .* but 0 images"):
        proc(texts)
    with pytest.raises(ValueError, match="row 0: 0 .* but 1 images"):
        proc(texts, [[SQUARE], [SQUARE]])
    with pytest.raises(ValueError, match="images has 1 rows but texts has 2"):
        proc(texts, [[SQUARE]])
    with pytest.raises(ValueError, match="padding_side"):
        proc(["x"], padding_side="middle")  # type: ignore[arg-type]


def _transformers_processor(proc: Processor):
    """The real `Qwen2_5_VLProcessor`, built without its constructor (which needs torchvision
    for the video processor); images go through the same `__call__` code as in transformers."""
    from transformers import Qwen2_5_VLProcessor

    ref = Qwen2_5_VLProcessor.__new__(Qwen2_5_VLProcessor)
    ref.tokenizer, ref.image_processor = proc.tokenizer, proc.image_processor
    ref.image_token, ref.video_token = "<|image_pad|>", "<|video_pad|>"
    ref.image_token_id, ref.video_token_id = proc.image_token_id, proc.video_token_id
    return ref


@pytest.mark.parametrize("side", ["left", "right"])
def test_parity_with_transformers_processor(proc, batch_inputs, side):
    texts, images = batch_inputs
    ref = _transformers_processor(proc)(text=list(texts), images=[WIDE, SQUARE, WIDE],
                                        padding=True, padding_side=side, return_tensors="np")
    got = proc(texts, images, padding_side=side)
    assert set(got) == set(ref.keys())
    for key, value in got.items():
        np.testing.assert_array_equal(value, ref[key], err_msg=key)

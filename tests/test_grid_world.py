"""The grid world's generators: answers balanced, references within the caps, one token sequence
per answer word, pixels that say what the rows say, and the per-cell grader."""
import collections
import io
import re

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data.synthetic import grid
from vlm_jax.rl.rewards.graders import grade_cells

N = 300


@pytest.fixture(scope="module")
def tokenizer():
    from vlm_jax.models.tiny import builtin_corpus, train_tokenizer

    return train_tokenizer([*builtin_corpus(), *grid.corpus(600)], 1024)  # as demo_setup builds it


@pytest.mark.parametrize("capability", ["textual_reasoning", "visual_reasoning"])
def test_answers_are_balanced(capability):
    rows = grid.generate(capability, N, split="validation")
    counts = collections.Counter(r["answer"] for r in rows)
    assert max(counts.values()) / N <= 0.20, counts  # the best constant guess
    for kind in grid.KINDS:
        lo, hi = grid.ANSWERS[kind]
        seen = {int(r["answer"]) for r in rows if r["task"] == kind}
        assert seen == set(range(lo, hi + 1)), (kind, seen)


def test_the_three_sets_ask_about_the_same_grids_and_answers_follow_from_the_cells():
    per = {c: grid.generate(c, 60, split="validation") for c in grid.CAPABILITIES}
    for p, t, v in zip(*per.values()):
        assert p["cells"] == t["cells"] == v["cells"]
        assert p["answer"] == " ".join(p["cells"])
        cells = t["cells"]
        a, b = re.match(r"How many cells are (?:not )?(\w+)(?: or (\w+))?\?", t["problem"]).groups()
        expected = {"count": cells.count(a), "either": cells.count(a) + cells.count(b),
                    "not": 9 - cells.count(a)}.get(t["task"])
        assert int(t["answer"]) == expected == int(v["answer"])
        # the trace names what is counted
        trace = t["solution"].split("</think>")[0][len("<think>"):]
        assert trace == {"count": f" {a}", "either": f" {a} or {b}", "not": f" not {a}"}[t["task"]]
        # the visual item with its cells given as text is the textual item
        assert grid.as_text_item(v)["problem"] == t["problem"]
        # the visual trace reads the grid word for word, then reasons as the textual trace does
        assert v["solution"].startswith("<think>" + grid.cells_text(cells) + ";")
        assert t["solution"].split("</think>")[0][len("<think>"):] in v["solution"]


def test_pixels_show_the_named_cells():
    palette = {c: np.array(rgb, float) for c, rgb in grid._RGB.items()}
    for row in grid.generate("perception", 40, split="validation"):
        img = np.asarray(Image.open(io.BytesIO(row["images"][0])).convert("RGB"), float)
        assert img.shape == (grid.IMAGE_SIZE, grid.IMAGE_SIZE, 3)
        for k, colour in enumerate(row["cells"]):
            r, c = divmod(k, grid.SIDE)
            mean = img[r * grid.CELL:(r + 1) * grid.CELL, c * grid.CELL:(c + 1) * grid.CELL].reshape(-1, 3).mean(0)
            assert min(palette, key=lambda name: np.abs(palette[name] - mean).sum()) == colour


def test_blank_images_carry_no_cells():
    row = grid.generate("visual_reasoning", 1, blank=True)[0]
    img = np.asarray(Image.open(io.BytesIO(row["images"][0])).convert("RGB"))
    assert (img == 128).all()


def chat_prompt(row) -> str:
    """The prompt as the demo's chat template renders it (default system prompt, the reasoning
    instruction), each image as its 9 merged vision tokens."""
    from vlm_jax.data.rows import REASONING_INSTRUCTION

    image = "<|vision_start|>" + "<|image_pad|>" * (grid.SIDE * grid.SIDE) + "<|vision_end|>"
    text = row["problem"].replace("<image>\n", image)
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"{text}\n{REASONING_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")


def test_every_reference_fits_the_generation_cap_and_the_sequence_bucket(tokenizer):
    longest = 0
    for capability in grid.CAPABILITIES:
        for row in grid.generate(capability, 150, split="validation"):
            n = len(tokenizer.encode(row["solution"]).ids) + 1  # + end of turn
            assert n <= grid.MAX_NEW_TOKENS, (capability, n, row["solution"])
            prompt = len(tokenizer.encode(chat_prompt(row)).ids)
            assert prompt <= grid.MAX_PROMPT_LEN, (capability, prompt, row["problem"])
            longest = max(longest, prompt + n)
    # the tokenizer learned the chat frame's words: the longest row fills most of the last bucket
    assert grid.LENGTH_BUCKETS[-1] - 16 < longest <= grid.LENGTH_BUCKETS[-1], longest


def test_each_answer_word_has_one_token_sequence_in_every_context(tokenizer):
    rows = [r for c in grid.CAPABILITIES for r in grid.generate(c, 60, split="validation")]
    words = [*grid.COLORS, *map(str, range(10))]
    seen = collections.defaultdict(set)
    for row in rows:
        for text in (row["problem"], row["solution"]):
            enc = tokenizer.encode(text)
            for word in words:
                edge = "0-9" if word.isdigit() else "A-Za-z"
                for m in re.finditer(rf"(?<![{edge}]){word}(?![{edge}])", text):
                    ids = tuple(i for i, (s, e) in zip(enc.ids, enc.offsets) if s < m.end() and e > m.start()
                                and tokenizer.id_to_token(i).strip("Ġ"))
                    seen[word].add(ids)
    assert set(grid.COLORS) | {"0", "1", "7"} <= set(seen)
    for word in seen:
        assert len(seen[word]) == 1, (word, seen[word])


def test_grade_cells_gives_the_share_of_cells_named_right():
    ref = "red blue green yellow red red blue blue green"
    assert grade_cells(f"<think></think> \\boxed{{ {ref}}}", ref) == 1.0
    wrong2 = "red blue green yellow blue red blue green green"
    assert grade_cells(f"\\boxed{{{wrong2}}}", ref) == pytest.approx(7 / 9)
    assert grade_cells("\\boxed{red blue}", ref) == pytest.approx(2 / 9)  # missing cells are wrong
    assert grade_cells(f"\\boxed{{{ref} red}}", ref) == pytest.approx(9 / 10)  # so are extra ones
    assert grade_cells("no box at all", ref) == 0.0


def test_generation_is_deterministic_and_checks_its_input():
    a = grid.generate("visual_reasoning", 5, seed=3)
    b = grid.generate("visual_reasoning", 9, seed=3)
    assert [r["solution"] for r in a] == [r["solution"] for r in b[:5]]
    assert a[0]["images"] == b[0]["images"]
    with pytest.raises(ValueError, match="unknown grid capability"):
        grid.make_item("counting", np.random.default_rng(0), 0)
    with pytest.raises(ValueError, match="non-negative"):
        grid.generate("perception", -1)

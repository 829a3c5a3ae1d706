"""The grid world: a toy world with the paper's causal structure, for the demo and the experiment.

An image is a 3 x 3 grid of coloured cells (84 px square, one 28 px cell per merged vision token of
Qwen2.5-VL: 2 x 2 patches of 14 px). Three capabilities share it:

``perception``         read the grid: "<think> red blue ...</think> \\boxed{ red blue ...}" (nine
                       colour words in reading order); graded per cell (``answer_type="cells"``:
                       the share of cells named right; accuracy = all nine right).
``textual_reasoning``  the same questions over the grid given as text ("... Cells: red blue ...");
                       the trace names what is counted, the box holds the count
                       ("<think> red or blue</think> \\boxed{5}").
``visual_reasoning``   the same questions from the image: the trace first reads the grid (the
                       perception skill, word for word), then reasons as in the textual trace.

So visual reasoning needs perception and textual reasoning by construction. Questions (answers
are counts, drawn first, then a grid built to match, so no answer is much likelier than another):
``count`` how many cells are C (0..5); ``either`` how many are C1 or C2 (1..7); ``not`` how many
are not C (4..9). The most frequent answer over the mix is under 20% of the items.

Tokens: every colour word is written with a space before it, wherever it appears (prompt, trace,
box), and digits are single tokens, so each answer word has one token sequence in every context.
Images carry per-cell colour jitter and pixel noise, so reading a cell is learned, not trivial.
Determinism: item ``i`` of ``generate(capability, n, seed=s, split=p)`` depends only on
(capability, s, p, i).
"""
from __future__ import annotations

import io
import zlib
from typing import Any

import numpy as np
from PIL import Image

from vlm_jax.data.synthetic.common import boxed_solution

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
_RGB = {"red": (200, 45, 45), "green": (45, 165, 70), "blue": (45, 75, 205), "yellow": (215, 195, 40)}
SIDE = 3  # cells per row and column
CELL = 28  # pixels per cell: 2 x 2 patches of 14 px, one merged vision token
IMAGE_SIZE = SIDE * CELL
KINDS: tuple[str, ...] = ("count", "either", "not")
ANSWERS: dict[str, tuple[int, int]] = {"count": (0, 5), "either": (1, 7), "not": (4, 9)}  # inclusive
CAPABILITIES: tuple[str, ...] = ("perception", "textual_reasoning", "visual_reasoning")
DATASETS: dict[str, str] = {
    "perception": "grid_perception",
    "textual_reasoning": "grid_textual_reasoning",
    "visual_reasoning": "grid_visual_reasoning",
}
PERCEPTION_QUESTION = "Name the colour of each cell, row by row."
# Longest reference solution of each capability (tokens of the demo tokenizer, checked by the tests);
# the stages' generation caps must hold them.
MAX_NEW_TOKENS = 32
# Prompts (chat frame, 9 image tokens, question, instruction) are at most ~61 tokens of the demo
# tokenizer, so a prompt fits a 64 bucket and a prompt with its reference solution a 96 one.
MAX_PROMPT_LEN = 64
LENGTH_BUCKETS = (64, 96)


def cells_text(cells: tuple[str, ...]) -> str:
    """The grid in reading order, each word after a space: ' red blue ...'."""
    return "".join(f" {c}" for c in cells)


def render(cells: tuple[str, ...], rng: np.random.Generator | None, *, jitter: int = 35,
           noise: float = 18.0) -> Image.Image:
    """The grid image; ``rng`` draws each cell's colour jitter and the pixel noise (None: clean)."""
    img = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    for k, colour in enumerate(cells):
        r, c = divmod(k, SIDE)
        rgb = np.asarray(_RGB[colour], np.float32)
        if rng is not None:
            rgb = rgb + rng.integers(-jitter, jitter + 1, size=3)
        img[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = rgb
    if rng is not None and noise:
        img = img + rng.normal(0.0, noise, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def tally(cells: tuple[str, ...], a: str, b: str | None, kind: str) -> tuple[str, int]:
    """(what the reasoning trace names, the answer): the colours the question counts (' red',
    ' red or blue', ' not red'), then the count over the cells."""
    n = sum((c == a) if kind == "count" else (c in (a, b)) if kind == "either" else (c != a) for c in cells)
    label = {"count": f" {a}", "either": f" {a} or {b}", "not": f" not {a}"}[kind]
    return label, n


def draw_question(rng: np.random.Generator, kind: str) -> tuple[tuple[str, ...], str, str, int]:
    """(cells, question, reasoning after the grid, answer) for one question of ``kind``."""
    lo, hi = ANSWERS[kind]
    answer = int(rng.integers(lo, hi + 1))
    order = [COLORS[i] for i in rng.permutation(len(COLORS))]
    a, b = order[0], order[1]
    if kind == "count":
        counts, others = {a: answer}, order[1:]
    elif kind == "either":
        n_a = int(rng.integers(0, answer + 1))
        counts, others = {a: n_a, b: answer - n_a}, order[2:]
    else:  # not: 9 - count(a) = answer
        counts, others = {a: SIDE * SIDE - answer}, order[1:]
    cells = [c for c, n in counts.items() for _ in range(n)]
    cells += [others[int(i)] for i in rng.integers(0, len(others), size=SIDE * SIDE - len(cells))]
    cells = tuple(cells[i] for i in rng.permutation(len(cells)))
    question = {"count": f"How many cells are {a}?", "either": f"How many cells are {a} or {b}?",
                "not": f"How many cells are not {a}?"}[kind]
    reasoning, n = tally(cells, a, b, kind)
    assert n == answer
    return cells, question, reasoning, answer


def make_item(capability: str, rng: np.random.Generator, index: int, *, blank: bool = False) -> dict[str, Any]:
    """One schema row of ``capability``; ``blank`` draws the image without its cells (all grey),
    for the check that visual answers cannot be guessed from the question."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown grid capability {capability!r}; expected one of {CAPABILITIES}")
    kind = KINDS[index % len(KINDS)]
    cells, question, reasoning, answer = draw_question(rng, kind)
    image = render(cells, rng)
    if blank:
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (128, 128, 128))
    grid = cells_text(cells)
    row: dict[str, Any] = {"caption": f"Cells:{grid}.", "pass_rate": -1.0, "capability": capability}
    if capability == "perception":
        row.update(problem=f"<image>\n{PERCEPTION_QUESTION}", answer=grid.strip(), answer_type="cells",
                   solution=boxed_solution(grid, grid), task="read", images=[_png(image)], difficulty=1.0)
    elif capability == "textual_reasoning":
        row.update(problem=f"{question} Cells:{grid}.", answer=str(answer), answer_type="number",
                   solution=boxed_solution(reasoning, str(answer)), task=kind, images=[],
                   difficulty=float(1 + KINDS.index(kind)))
    else:
        row.update(problem=f"<image>\n{question}", answer=str(answer), answer_type="number",
                   solution=boxed_solution(f"{grid};{reasoning}", str(answer)), task=kind,
                   images=[_png(image)], difficulty=float(1 + KINDS.index(kind)))
    row["cells"] = list(cells)
    return row


def _rng(capability: str, seed: int, split: str, index: int) -> np.random.Generator:
    # the question (and grid) of item i is the same for every capability: perception, textual and
    # visual sets of one split ask about the same grids, so the sets differ only in what they ask
    return np.random.default_rng([seed, zlib.crc32(b"grid"), zlib.crc32(split.encode()), index])


def generate(capability: str, n: int, *, seed: int = 0, split: str = "train", blank: bool = False,
             ) -> list[dict[str, Any]]:
    """``n`` rows of one capability; question kinds in round-robin order."""
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    return [make_item(capability, _rng(capability, seed, split, i), i, blank=blank) for i in range(n)]


def as_text_item(row: dict[str, Any]) -> dict[str, Any]:
    """A visual-reasoning row with its cells given as text instead of the image (a textual item)."""
    question = row["problem"].split("\n", 1)[1]
    return {**row, "problem": f"{question} {row['caption']}", "images": [],
            "capability": "textual_reasoning"}


def corpus(n: int = 600, seed: int = 0) -> list[str]:
    """Problems and solutions of ``n`` items per capability, for the tokenizer. Each problem comes
    in its chat frame (the template's default system prompt, the role names, the reasoning
    instruction), so the tokenizer learns whole words for the text every prompt carries: a prompt
    is ~60 tokens instead of ~85, and a row fits a 96-token bucket."""
    from vlm_jax.data.rows import REASONING_INSTRUCTION

    out = []
    for capability in CAPABILITIES:
        for row in generate(capability, n, seed=seed, split="corpus"):
            out += [f"system\nYou are a helpful assistant.\nuser\n{row['problem']}\n{REASONING_INSTRUCTION}\n"
                    "assistant\n", row["solution"]]
    return out


def build(data_dir, *, sizes: dict[str, int], seed: int = 0, verbose: bool = False) -> dict[str, str]:
    """Write the three grid datasets (``DATASETS``) under ``data_dir``, one split per ``sizes``
    entry; a dataset already written with the same sizes and seed is kept. Returns name -> dir."""
    import json
    from pathlib import Path

    from vlm_jax.data.tfds_builders import DATASET_VERSION, write_local_split

    out = {}
    settings = {"world": "grid", "version": 1, "sizes": dict(sizes), "seed": int(seed)}
    for capability, name in DATASETS.items():
        target = Path(data_dir) / name / DATASET_VERSION
        stamp = target / "grid_settings.json"
        if stamp.exists() and json.loads(stamp.read_text()) == settings:
            out[name] = str(target)
            continue
        for split, count in sizes.items():
            rows = [{k: v for k, v in r.items() if k != "cells"}
                    for r in generate(capability, count, seed=seed, split=split)]
            write_local_split(name, split, rows, data_dir, description=f"grid world, {capability}")
        stamp.write_text(json.dumps(settings))
        if verbose:
            print(f"built {name}: {dict(sizes)}")
        out[name] = str(target)
    return out

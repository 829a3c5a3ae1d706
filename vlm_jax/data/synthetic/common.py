"""What every task builder shares: the draft it returns, multiple-choice wrapping, captions, records.

A builder returns a :class:`Draft` (free-form question, answer and reasoning); :func:`to_record` turns
it into the schema dict, optionally as a four-option multiple-choice question in the paper's style
("... Options: (A) 2 (B) 3 (C) 5 (D) 4. Answer with the letter.").
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from vlm_jax.data.synthetic.scenes import Object, png_bytes, quadrant

IMAGE_TOKEN = "<image>"
LETTERS = "ABCD"
CAPABILITIES: tuple[str, ...] = ("perception", "textual_reasoning", "visual_reasoning")
ANSWER_TYPES: tuple[str, ...] = ("number", "mcq", "math", "iou", "ocr", "yes_no")


class Resample(Exception):
    """A random draw missed the task's constraints (e.g. an ambiguous relation); draw again."""


@dataclasses.dataclass(frozen=True)
class Draft:
    """A free-form example before it becomes a record.

    ``distractors``: wrong answers a multiple-choice version may offer (>= 3, distinct, none equal
    to ``answer``); ``None`` when the question has no multiple-choice form (e.g. yes/no).
    """

    question: str
    answer: str
    reasoning: str
    answer_type: str
    caption: str = ""
    images: tuple[Image.Image, ...] = ()
    distractors: tuple[str, ...] | None = None


def boxed_solution(reasoning: str, answer: str) -> str:
    """The response format every stage trains and grades: ``<think>...</think> \\boxed{...}``."""
    return f"<think>{reasoning}</think> \\boxed{{{answer}}}"


def as_multiple_choice(draft: Draft, rng: np.random.Generator) -> Draft:
    """Four shuffled options (the answer + 3 distractors); the answer becomes the option letter."""
    if draft.distractors is None or len(set(draft.distractors) - {draft.answer}) < 3:
        raise ValueError(f"question {draft.question!r} has no multiple-choice form (needs 3 distractors)")
    pool = sorted(set(draft.distractors) - {draft.answer})
    picked = [pool[i] for i in rng.choice(len(pool), size=3, replace=False)]
    options = [draft.answer, *picked]
    options = [options[i] for i in rng.permutation(4)]
    letter = LETTERS[options.index(draft.answer)]
    listed = " ".join(f"({LETTERS[i]}) {opt}" for i, opt in enumerate(options))
    return dataclasses.replace(
        draft,
        question=f"{draft.question} Options: {listed}. Answer with the letter.",
        answer=letter,
        reasoning=f"{draft.reasoning} The answer {draft.answer} is option {letter}.",
        answer_type="mcq",
        distractors=None,
    )


def to_record(
    draft: Draft,
    *,
    task: str,
    capability: str,
    difficulty: int,
    rng: np.random.Generator,
    multiple_choice: bool,
) -> dict[str, Any]:
    """The schema dict for one example (see the package docstring for the fields)."""
    if multiple_choice:
        draft = as_multiple_choice(draft, rng)
    prefix = "".join(f"{IMAGE_TOKEN}\n" for _ in draft.images)
    return {
        "problem": prefix + draft.question,
        "answer": draft.answer,
        "images": [png_bytes(img) for img in draft.images],
        "caption": draft.caption,
        "solution": boxed_solution(draft.reasoning, draft.answer),
        "pass_rate": -1.0,
        "task": task,
        "capability": capability,
        "difficulty": int(difficulty),
        "answer_type": draft.answer_type,
    }


def plural(n: int, noun: str) -> str:
    """"1 red circle", "3 red circles"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def join_words(items: Sequence[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} and {items[-1]}"


def box_text(box: Sequence[int]) -> str:
    """The answer format of a box: "[x1, y1, x2, y2]"."""
    return "[" + ", ".join(str(int(v)) for v in box) + "]"


def scene_caption(objects: Sequence[Object], side: int, clutter: int, facts: Sequence[str] = ()) -> str:
    """Dense caption: counts per kind, then each object's place, width and box, then task facts."""
    kinds = Counter(obj.name for obj in objects)
    shapes = join_words([plural(n, k) for k, n in kinds.items()]) if objects else "no shapes"
    parts = [f"A white {side}x{side} image with {shapes}.{noise_sentence(clutter)}"]
    for obj in objects:
        parts.append(f"A {obj.name} {obj.size} pixels wide at the {quadrant(obj.box, side)}, box {box_text(obj.box)}.")
    parts.extend(facts)
    return " ".join(parts)


def noise_sentence(clutter: int) -> str:
    """" The background has grey noise." when there is clutter, else ""."""
    return " The background has grey noise." if clutter else ""


def number_distractors(value: int, *, spread: int = 3, minimum: int = 0) -> tuple[str, ...]:
    """Nearby integers (>= ``minimum``, != ``value``) as wrong options."""
    out = [v for d in range(1, spread + 4) for v in (value + d, value - d) if v >= minimum]
    return tuple(str(v) for v in out[: 2 * spread])

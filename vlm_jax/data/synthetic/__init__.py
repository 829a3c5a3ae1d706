"""Deterministic synthetic tasks with verifiable answers, for the three capability stages.

Every example is a dict with the row schema of ``vlm_jax.data.schema``:

``problem``      question; one ``<image>`` line per image first (e.g. "<image>\\nHow many red circles
                 are there?"); multiple-choice ones end "Options: (A) 2 (B) 3 (C) 5 (D) 4. Answer with
                 the letter."
``answer``       short reference answer ("3", "B", "red", "[12, 30, 40, 58]")
``images``       list of PNG bytes (empty for text-only tasks)
``caption``      dense caption stating every fact needed to answer ("" for text-only)
``solution``     reference response ``<think>steps</think> \\boxed{ANSWER}``
``pass_rate``    -1.0 (unknown until scored)
``task``         one of TASKS[capability]
``capability``   "perception" | "textual_reasoning" | "visual_reasoning"
``difficulty``   int 1..5 (objects, clutter, image side, number of steps grow with it)
``answer_type``  grader: "number" | "mcq" | "math" (exact after normalisation: colours, relations,
                 quadrants) | "iou" (boxes) | "ocr" (words) | "yes_no"

Determinism: example ``i`` of ``generate(capability, n, seed=s, split=p)`` depends only on
(capability, s, p, i): each example has its own ``np.random.default_rng`` seeded from those, so
``generate(..., n=10)[3] == generate(..., n=5)[3]`` and splits never share a stream. Images are drawn
without anti-aliasing so answers can be re-measured from the pixels (see the tests).
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from vlm_jax.data.synthetic.common import CAPABILITIES, Resample, to_record
from vlm_jax.data.synthetic.perception import BUILDERS as _PERCEPTION
from vlm_jax.data.synthetic.perception import DEFAULT_STYLE, SceneStyle
from vlm_jax.data.synthetic.scenes import COLORS, PALETTE, SHAPES, Object, check_image_size, render_scene, side_for
from vlm_jax.data.synthetic.textual import BUILDERS as _TEXTUAL
from vlm_jax.data.synthetic.visual_reasoning import BUILDERS as _VISUAL

__all__ = [
    "CAPABILITIES",
    "COLORS",
    "MAX_DIFFICULTY",
    "Object",
    "PALETTE",
    "SHAPES",
    "SceneStyle",
    "TASKS",
    "corpus",
    "generate",
    "make_example",
    "render_scene",
]

TASKS: dict[str, tuple[str, ...]] = {
    "perception": tuple(_PERCEPTION),
    "textual_reasoning": tuple(_TEXTUAL),
    "visual_reasoning": tuple(_VISUAL),
}
_BUILDERS = {**_PERCEPTION, **_TEXTUAL, **_VISUAL}
_CAPABILITY_OF = {task: cap for cap, tasks in TASKS.items() for task in tasks}
MAX_DIFFICULTY = 5
_MAX_TRIES = 200


def make_example(
    task: str,
    rng: np.random.Generator,
    *,
    difficulty: int,
    image_size: int | Sequence[int] = (56, 112),
    multiple_choice: bool = False,
    style: SceneStyle = DEFAULT_STYLE,
) -> dict[str, Any]:
    """One example of ``task`` at ``difficulty`` (1..5); ``image_size`` is the side range (lo, hi).

    ``multiple_choice`` asks a four-option question (perception and visual-reasoning tasks; text
    tasks have no multiple-choice form and reject it). ``style`` (object count cap, object scale)
    applies to perception tasks. Random draws that give an ambiguous question are redrawn from the
    same ``rng``, so the result is a pure function of the rng state.
    """
    if task not in _BUILDERS:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(_BUILDERS)}")
    if isinstance(difficulty, bool) or not isinstance(difficulty, (int, np.integer)) or not 1 <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"difficulty must be an int in 1..{MAX_DIFFICULTY}, got {difficulty!r}")
    capability = _CAPABILITY_OF[task]
    if multiple_choice and capability == "textual_reasoning":
        raise ValueError(f"task {task!r} is text-only and has no multiple-choice form")
    _check_style(style, capability)
    side = side_for(image_size, int(difficulty))
    extra = {"style": style} if capability == "perception" else {}
    for _ in range(_MAX_TRIES):
        try:
            draft = _BUILDERS[task](rng, int(difficulty), side, multiple_choice, **extra)
        except Resample:
            continue
        return to_record(
            draft, task=task, capability=capability, difficulty=int(difficulty), rng=rng, multiple_choice=multiple_choice
        )
    raise RuntimeError(f"task {task!r} found no valid example in {_MAX_TRIES} draws (difficulty={difficulty}, side={side})")


def _example_rng(capability: str, seed: int, split: str, index: int) -> np.random.Generator:
    """Independent stream per (capability, seed, split, index); crc32 keeps names stable across runs."""
    return np.random.default_rng([seed, zlib.crc32(capability.encode()), zlib.crc32(split.encode()), index])


def _check_style(style: SceneStyle, capability: str) -> None:
    """A scene style (max_objects / object_scale) other than the default is for perception only."""
    if style != DEFAULT_STYLE and capability != "perception":
        raise ValueError(f"max_objects / object_scale ({style}) apply to perception only, not {capability!r}")


def _check_generate_args(
    capability: str, n: int, seed: int, tasks: Sequence[str], difficulty: tuple[int, ...], mc_fraction: float
) -> None:
    """Raise ValueError naming the first bad argument of ``generate``."""
    if capability not in TASKS:
        raise ValueError(f"unknown capability {capability!r}; expected one of {CAPABILITIES}")
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not tasks:
        raise ValueError(f"tasks for {capability!r} is empty")
    for task in tasks:
        if task not in TASKS[capability]:
            raise ValueError(f"task {task!r} is not a {capability} task; choose from {TASKS[capability]}")
    if len(difficulty) != 2 or not 1 <= difficulty[0] <= difficulty[1] <= MAX_DIFFICULTY:
        raise ValueError(f"difficulty range {difficulty!r} must satisfy 1 <= lo <= hi <= {MAX_DIFFICULTY}")
    if not 0.0 <= mc_fraction <= 1.0:
        raise ValueError(f"mc_fraction must be in [0, 1], got {mc_fraction!r}")


def generate(
    capability: str,
    n: int,
    *,
    seed: int = 0,
    split: str = "train",
    tasks: Sequence[str] | None = None,
    difficulty: int | tuple[int, int] = (1, 3),
    image_size: int | tuple[int, int] = (56, 112),
    mc_fraction: float = 0.5,
    max_objects: int | None = None,
    object_scale: float = 1.0,
) -> list[dict[str, Any]]:
    """``n`` examples of one capability, tasks in round-robin order, difficulty drawn per example.

    ``difficulty`` is an inclusive range (an int fixes it); ``image_size`` the range of image sides
    (px, square images, larger at higher difficulty); ``mc_fraction`` the share of perception
    questions asked as four-option multiple choice (other capabilities are always free-form).
    ``max_objects`` / ``object_scale`` (perception only, see ``SceneStyle``) cap the objects per
    scene and scale their size.
    """
    style = SceneStyle(max_objects=max_objects, object_scale=object_scale)
    _check_style(style, capability)
    tasks = tuple(TASKS[capability] if tasks is None else tasks) if capability in TASKS else ()
    levels = (difficulty, difficulty) if isinstance(difficulty, (int, np.integer)) else tuple(difficulty)
    _check_generate_args(capability, n, seed, tasks, levels, mc_fraction)
    check_image_size(image_size)
    lo, hi = levels
    out = []
    for i in range(n):
        rng = _example_rng(capability, int(seed), split, i)
        level = int(rng.integers(lo, hi + 1))
        mc = capability == "perception" and bool(rng.random() < mc_fraction)
        task = tasks[i % len(tasks)]
        out.append(make_example(task, rng, difficulty=level, image_size=image_size, multiple_choice=mc, style=style))
    return out


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Text for tokenizer training: problem, caption and solution of ``n`` examples over all tasks.

    Examples are split evenly over the capabilities, at every difficulty, half of the perception
    ones multiple-choice; empty captions are left out.
    """
    texts: list[str] = []
    per = [n // len(CAPABILITIES) + (k < n % len(CAPABILITIES)) for k in range(len(CAPABILITIES))]
    for capability, count in zip(CAPABILITIES, per):
        for ex in generate(capability, count, seed=seed, split="corpus", difficulty=(1, MAX_DIFFICULTY)):
            texts.extend(t for t in (ex["problem"], ex["caption"], ex["solution"]) if t)
    return texts

"""Visual reasoning tasks: more_than, digit_sum, area_compare, bar_chart.

Multi-step questions: read facts off the image, then compute. Each solution writes the facts and the
arithmetic step by step before ``\\boxed{}``. Difficulty (1..5) sets the number of objects / digits /
bars (steps), the clutter and whether bar values are printed.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from vlm_jax.data.synthetic.common import (
    Draft,
    Resample,
    join_words,
    noise_sentence,
    number_distractors,
    plural,
    scene_caption,
)
from vlm_jax.data.synthetic.perception import other_specs, place_scene
from vlm_jax.data.synthetic.scenes import (
    BACKGROUND,
    COLORS,
    GRID_RGB,
    PALETTE,
    SHAPES,
    TEXT_RGB,
    PlacementError,
    blank_canvas,
    draw_objects,
    draw_text,
    ink_extent,
    place_boxes,
    size_range,
)

AREA_MARGIN = 1.4  # "larger total area" only asked when the totals differ by at least this factor


def _capacity(side: int) -> int:
    """Most objects a canvas takes without crowding (about one per 300 px^2)."""
    return max(2, side * side // 300)


def _two_colors(rng: np.random.Generator) -> tuple[str, str]:
    i, j = rng.choice(len(COLORS), size=2, replace=False)
    return COLORS[i], COLORS[j]


def build_more_than(rng: np.random.Generator, difficulty: int, side: int, multiple_choice: bool) -> Draft:
    """How many more <A> shapes than <B> shapes: count both, subtract."""
    clutter = difficulty - 1
    a, b = _two_colors(rng)
    capacity = _capacity(side)
    n_a = int(rng.integers(2, difficulty + 3))
    n_b = int(rng.integers(1, n_a))
    if n_a + n_b > capacity:
        raise Resample("too many objects for the canvas")
    n_other = min(difficulty - 1, 3, capacity - n_a - n_b)
    specs = [(a, SHAPES[rng.integers(3)]) for _ in range(n_a)] + [(b, SHAPES[rng.integers(3)]) for _ in range(n_b)]
    others = [c for c in COLORS if c not in (a, b)]
    specs += [(others[rng.integers(len(others))], SHAPES[rng.integers(3)]) for _ in range(n_other)]
    objects = place_scene(rng, specs, side)
    answer = n_a - n_b
    return Draft(
        question=f"How many more {a} shapes than {b} shapes are there?",
        answer=str(answer),
        reasoning=f"There are {plural(n_a, a + ' shape')} and {plural(n_b, b + ' shape')}. {n_a} - {n_b} = {answer}.",
        answer_type="number",
        caption=scene_caption(objects, side, clutter),
        images=(draw_objects(blank_canvas(rng, side, clutter), objects),),
        distractors=number_distractors(answer),
    )


def build_digit_sum(rng: np.random.Generator, difficulty: int, side: int, multiple_choice: bool) -> Draft:
    """Sum of 2-4 single digits drawn apart on the canvas."""
    clutter = difficulty - 1
    n = (2, 2, 3, 3, 4)[difficulty - 1]
    digits = [int(d) for d in rng.integers(0, 10, n)]
    size = max(10, round(side / (2.2 + 0.5 * difficulty)))
    extents = [ink_extent(str(d), size)[2:] for d in digits]
    try:
        boxes = place_boxes(rng, extents, side)
    except PlacementError as err:
        raise Resample(str(err)) from err
    image = blank_canvas(rng, side, clutter)
    for d, box in zip(digits, boxes):
        draw_text(image, box[:2], str(d), size)
    total = sum(digits)
    listed = join_words([str(d) for d in digits])
    return Draft(
        question="What is the sum of the digits in the image?",
        answer=str(total),
        reasoning=f"The digits are {listed}. {' + '.join(map(str, digits))} = {total}.",
        answer_type="number",
        caption=f"A white {side}x{side} image with the digits {listed} written in black.{noise_sentence(clutter)}",
        images=(image,),
        distractors=number_distractors(total),
    )


def build_area_compare(rng: np.random.Generator, difficulty: int, side: int, multiple_choice: bool) -> Draft:
    """How many times larger is one shape's area (width ratio k -> area k*k), or which colour covers more."""
    clutter = difficulty - 1
    a, b = _two_colors(rng)
    if rng.random() < 0.5:
        shape = SHAPES[rng.integers(3)]
        k = 2 if difficulty <= 2 or rng.random() < 0.5 else 3
        lo, hi = size_range(side)
        small = int(rng.integers(lo, max(lo, side // (2 * k)) + 1))
        others = other_specs(rng, min(difficulty - 1, 3), [(a, shape), (b, shape)])
        sizes = [small, small * k, *(int(s) for s in rng.integers(lo, hi + 1, len(others)))]
        objects = place_scene(rng, [(a, shape), (b, shape), *others], side, sizes=sizes)
        answer = k * k
        return Draft(
            question=f"How many times larger is the area of the {b} {shape} than the {a} {shape}?",
            answer=str(answer),
            reasoning=(
                f"The {a} {shape} is {small} pixels wide and the {b} {shape} is {small * k} pixels wide. "
                f"It is {k} times as wide, so its area is {k} * {k} = {answer} times as large."
            ),
            answer_type="number",
            caption=scene_caption(objects, side, clutter),
            images=(draw_objects(blank_canvas(rng, side, clutter), objects),),
            distractors=tuple(str(v) for v in (k, 2 * k, k * k + 1, k * k - 1, (k + 1) ** 2) if v != answer),
        )
    n_each = max(1, (difficulty + 1) // 2)
    specs = [(a, SHAPES[rng.integers(3)]) for _ in range(n_each)] + [(b, SHAPES[rng.integers(3)]) for _ in range(n_each)]
    objects = place_scene(rng, specs, side)
    area = {c: sum(o.area for o in objects if o.color == c) for c in (a, b)}
    if max(area.values()) < AREA_MARGIN * min(area.values()):
        raise Resample("total areas too close")
    winner = a if area[a] > area[b] else b
    parts = {c: [round(o.area) for o in objects if o.color == c] for c in (a, b)}

    def total_text(c: str) -> str:
        terms = parts[c]
        return f"{terms[0]}" if len(terms) == 1 else f"{' + '.join(map(str, terms))} = {sum(terms)}"

    return Draft(
        question=f"Which color covers a larger total area, {a} or {b}?",
        answer=winner,
        reasoning=(
            f"The {a} area is about {total_text(a)}. The {b} area is about {total_text(b)}. "
            f"So {winner} covers more."
        ),
        answer_type="math",
        caption=scene_caption(objects, side, clutter, [f"The {winner} shapes cover a larger total area."]),
        images=(draw_objects(blank_canvas(rng, side, clutter), objects),),
        distractors=tuple(c for c in COLORS if c != winner),
    )


def draw_bar_chart(side: int, colors: list[str], values: list[int], vmax: int, labelled: bool) -> Image.Image:
    """Bars on a grid with one grey line per unit; bar height is exactly value * unit pixels.

    Black axes (left column and baseline row), grey grid rows every ``unit`` px above the baseline,
    bars in palette colours drawn over the grid, values printed above the bars when ``labelled``.
    """
    label_size = 10
    top = (ink_extent("8", label_size)[3] + 4) if labelled else 3
    left, right, baseline = 4, side - 3, side - 5
    unit = (baseline - top) // vmax
    if unit < 3:
        raise Resample(f"a {side}px chart cannot show values up to {vmax}")
    image = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for j in range(1, vmax + 1):
        draw.line((left + 1, baseline - j * unit, right, baseline - j * unit), fill=GRID_RGB)
    draw.line((left, top - 2, left, baseline), fill=TEXT_RGB)
    draw.line((left, baseline, right, baseline), fill=TEXT_RGB)
    slot = (right - left - 1) // len(values)
    width = max(4, slot * 3 // 5)
    for i, (c, v) in enumerate(zip(colors, values)):
        x1 = left + 1 + i * slot + (slot - width) // 2
        y1 = baseline - v * unit
        draw.rectangle((x1, y1, x1 + width - 1, baseline - 1), fill=PALETTE[c])
        if labelled:
            _, _, w, h = ink_extent(str(v), label_size)
            draw_text(image, (x1 + (width - w) // 2, y1 - h - 2), str(v), label_size)
    return image


def build_bar_chart(rng: np.random.Generator, difficulty: int, side: int, multiple_choice: bool) -> Draft:
    """Sum or difference of two bars, or total of all bars, read off a gridded chart."""
    n_bars = (2, 3, 3, 4, 4)[difficulty - 1]
    vmax = 4 + difficulty
    labelled = difficulty <= 2
    colors = [COLORS[i] for i in rng.choice(len(COLORS), size=n_bars, replace=False)]
    values = [int(v) for v in rng.integers(1, vmax + 1, n_bars)]
    image = draw_bar_chart(side, colors, values, vmax, labelled)
    kinds = ("sum", "diff") + (("total",) if difficulty >= 3 else ())
    kind = kinds[rng.integers(len(kinds))]
    i, j = (int(x) for x in rng.choice(n_bars, size=2, replace=False))
    if kind == "diff":
        if values[i] == values[j]:
            raise Resample("equal bars")
        if values[i] < values[j]:
            i, j = j, i
    read = f"The {colors[i]} bar is {values[i]} and the {colors[j]} bar is {values[j]}."
    if kind == "sum":
        answer = values[i] + values[j]
        question = f"What is the sum of the {colors[i]} bar and the {colors[j]} bar?"
        reasoning = f"{read} {values[i]} + {values[j]} = {answer}."
    elif kind == "diff":
        answer = values[i] - values[j]
        question = f"How much taller is the {colors[i]} bar than the {colors[j]} bar?"
        reasoning = f"{read} {values[i]} - {values[j]} = {answer}."
    else:
        answer = sum(values)
        question = "What is the total of all the bars?"
        listed = join_words([f"{c} {v}" for c, v in zip(colors, values)])
        reasoning = f"The bars are {listed}. {' + '.join(map(str, values))} = {answer}."
    bars = join_words([f"a {c} bar of {v}" for c, v in zip(colors, values)])
    printed = " with the values printed above the bars" if labelled else ""
    caption = f"A {side}x{side} bar chart on a grid with one line per unit{printed}, from left to right: {bars}."
    return Draft(
        question=question,
        answer=str(answer),
        reasoning=reasoning,
        answer_type="number",
        caption=caption,
        images=(image,),
        distractors=number_distractors(answer),
    )


BUILDERS = {
    "more_than": build_more_than,
    "digit_sum": build_digit_sum,
    "area_compare": build_area_compare,
    "bar_chart": build_bar_chart,
}

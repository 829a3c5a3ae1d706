"""Perception tasks: count, color, position, size, read, ground.

Each builder ``build_<task>(rng, difficulty, side, multiple_choice) -> Draft`` draws a scene whose
answer is unambiguous (unique referents, clear relations, clear size margins) or raises
``Resample``. Difficulty (1..5) sets the number of objects and the clutter (grey noise); the canvas
side is chosen by the caller from the difficulty.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image

from vlm_jax.data.synthetic.common import (
    Draft,
    Resample,
    box_text,
    noise_sentence,
    number_distractors,
    scene_caption,
)
from vlm_jax.data.synthetic.scenes import (
    COLORS,
    SHAPES,
    Object,
    PlacementError,
    Spec,
    blank_canvas,
    draw_objects,
    draw_text,
    fitting_font_size,
    ink_extent,
    inside_quadrant,
    layout,
    place_boxes,
    quadrant,
    random_spec,
)

QUADRANTS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "box", "map", "pen", "cup", "hat", "key", "bus", "car", "egg",
    "tree", "fish", "bird", "star", "moon", "book", "door", "milk", "ball", "cake",
    "apple", "house", "train", "water", "green", "chair", "plant", "clock",
)
SIZE_MARGIN = 1.6  # "bigger" only asked when the areas differ by at least this factor


@dataclasses.dataclass(frozen=True)
class SceneStyle:
    """How perception scenes are drawn beyond the difficulty: ``max_objects`` caps the objects per
    scene (None: the difficulty decides; questions that need two referents keep two, and a position
    question about a single object asks for its quadrant); ``object_scale`` multiplies the default
    object sides (1/8..1/4 of the canvas, see ``scenes.size_range``). Large, few objects make a
    perception set that a tiny model can learn on a CPU (the demo's)."""

    max_objects: int | None = None
    object_scale: float = 1.0

    def __post_init__(self):
        if self.max_objects is not None and (isinstance(self.max_objects, bool) or not isinstance(self.max_objects, int)
                                             or self.max_objects < 1):
            raise ValueError(f"max_objects must be a positive int or None, got {self.max_objects!r}")
        if not 0.25 <= self.object_scale <= 4.0:
            raise ValueError(f"object_scale must be in [0.25, 4], got {self.object_scale!r}")

    def cap(self, n: int, least: int = 1) -> int:
        """``n`` objects limited by ``max_objects``, but never under ``least`` (the referents)."""
        return n if self.max_objects is None else max(least, min(n, self.max_objects))


DEFAULT_STYLE = SceneStyle()


def place_scene(
    rng: np.random.Generator,
    specs: Sequence[Spec],
    side: int,
    sizes: Sequence[int] | None = None,
    style: SceneStyle = DEFAULT_STYLE,
) -> list[Object]:
    """Layout of ``specs``, shuffled so the referents are not always drawn first."""
    order = rng.permutation(len(specs))
    try:
        objects = layout(rng, [specs[i] for i in order], side, sizes=None if sizes is None else [sizes[i] for i in order],
                         scale=style.object_scale)
    except PlacementError as err:
        raise Resample(str(err)) from err
    inverse = np.argsort(order)
    return [objects[i] for i in inverse]  # back in spec order


def other_specs(rng: np.random.Generator, n: int, exclude: Sequence[Spec]) -> list[Spec]:
    """``n`` random (colour, shape) specs, none in ``exclude`` (keeps the referents unique)."""
    return [random_spec(rng, exclude) for _ in range(n)]


def _draw(rng: np.random.Generator, objects: Sequence[Object], side: int, clutter: int) -> Image.Image:
    """The objects on a fresh canvas with ``clutter`` noise."""
    return draw_objects(blank_canvas(rng, side, clutter), objects)


def _scene_draft(rng: np.random.Generator, objects: Sequence[Object], side: int, clutter: int,
                 facts: Sequence[str] = (), **fields) -> Draft:
    """A draft over a drawn scene: its caption (with ``facts``) and its one image."""
    return Draft(caption=scene_caption(objects, side, clutter, facts),
                 images=(_draw(rng, objects, side, clutter),), **fields)


def build_count(
    rng: np.random.Generator, difficulty: int, side: int, multiple_choice: bool, style: SceneStyle = DEFAULT_STYLE
) -> Draft:
    """How many <colour> <shape>s / <shape>s / <colour> shapes: difficulty 1 -> 3 objects, 5 -> 7."""
    n, clutter = style.cap(difficulty + 2), difficulty - 1
    color, shape = COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
    kind = ("color_shape", "shape", "color")[rng.integers(3)]
    all_specs = [(c, s) for c in COLORS for s in SHAPES]
    match = {
        "color_shape": lambda c, s: (c, s) == (color, shape),
        "shape": lambda c, s: s == shape,
        "color": lambda c, s: c == color,
    }[kind]
    noun = {"color_shape": f"{color} {shape}s", "shape": f"{shape}s", "color": f"{color} shapes"}[kind]
    hits = [sp for sp in all_specs if match(*sp)]
    misses = [sp for sp in all_specs if not match(*sp)]
    k = int(rng.integers(1, n + 1))
    specs = [hits[rng.integers(len(hits))] for _ in range(k)] + [misses[rng.integers(len(misses))] for _ in range(n - k)]
    objects = place_scene(rng, specs, side, style=style)
    return _scene_draft(
        rng, objects, side, clutter,
        question=f"How many {noun} are there?",
        answer=str(k),
        reasoning=f"I count the {noun} in the image. There are {k}.",
        answer_type="number",
        distractors=number_distractors(k),
    )


def build_color(
    rng: np.random.Generator, difficulty: int, side: int, multiple_choice: bool, style: SceneStyle = DEFAULT_STYLE
) -> Draft:
    """What colour is the <shape> (the only one of its shape): difficulty 1 -> 2 objects, 5 -> 6."""
    n, clutter = style.cap(difficulty + 1), difficulty - 1
    target = random_spec(rng)
    others = other_specs(rng, n - 1, [(c, target[1]) for c in COLORS])
    objects = place_scene(rng, [target, *others], side, style=style)
    color, shape = target
    return _scene_draft(
        rng, objects, side, clutter,
        question=f"What color is the {shape}?",
        answer=color,
        reasoning=f"There is one {shape} and it is {color}.",
        answer_type="math",
        distractors=tuple(c for c in COLORS if c != color),
    )


def relation(a: Object, b: Object) -> str | None:
    """The one clear relation of ``a`` to ``b`` ("left"/"right"/"above"/"below"), or None.

    Clear means separated along one axis and overlapping along the other, so exactly one of the
    four words is true.
    """
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    x_overlap, y_overlap = ax1 < bx2 and bx1 < ax2, ay1 < by2 and by1 < ay2
    if y_overlap and not x_overlap:
        return "left" if ax2 <= bx1 else "right"
    if x_overlap and not y_overlap:
        return "above" if ay2 <= by1 else "below"
    return None


def build_position(
    rng: np.random.Generator, difficulty: int, side: int, multiple_choice: bool, style: SceneStyle = DEFAULT_STYLE
) -> Draft:
    """Quadrant of an object, or its relation to another (left/right, above/below, yes/no)."""
    n, clutter = style.cap(max(2, difficulty + 1)), difficulty - 1
    first = random_spec(rng)
    if n == 1:  # a single object has a quadrant but no relation
        objects = place_scene(rng, [first], side, style=style)
        a, b, kinds = objects[0], objects[0], ("quadrant",)
    else:
        second = random_spec(rng, [first])
        objects = place_scene(rng, [first, second, *other_specs(rng, n - 2, [first, second])], side, style=style)
        a, b = objects[0], objects[1]
        kinds = ("quadrant", "relation") if multiple_choice else ("quadrant", "left_right", "above_below", "yes_no")
    kind = kinds[rng.integers(len(kinds))]
    facts: list[str] = []
    if kind == "quadrant":
        if not inside_quadrant(a.box, side):
            raise Resample("object crosses a midline")
        answer = quadrant(a.box, side)
        question = f"Which quadrant is the {a.name} in?"
        reasoning = f"The {a.name} is in the {answer} part of the image."
        distractors: tuple[str, ...] | None = tuple(q for q in QUADRANTS if q != answer)
        answer_type = "math"
        facts.append(f"The {a.name} lies fully in the {answer} quadrant.")
    else:
        rel = relation(a, b)
        wanted = {"left_right": ("left", "right"), "above_below": ("above", "below")}.get(kind, RELATIONS)
        if rel not in wanted:
            raise Resample("no clear relation of the asked kind")
        phrase = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
        facts.append(f"The {a.name} is {phrase[rel]} the {b.name}.")
        reasoning = f"The {a.name} is {phrase[rel]} the {b.name}."
        distractors = None
        answer_type = "math"
        if kind == "relation":
            question = f"Where is the {a.name} relative to the {b.name}?"
            answer, distractors = rel, tuple(r for r in RELATIONS if r != rel)
        elif kind == "yes_no":
            asked = RELATIONS[rng.integers(4)] if rng.random() < 0.5 else rel
            question = f"Is the {a.name} {phrase[asked]} the {b.name}?"
            answer, answer_type = ("yes" if asked == rel else "no"), "yes_no"
            reasoning += f" So the answer is {answer}."
        else:
            question = f"Is the {a.name} {wanted[0]} or {wanted[1]} {'of ' if kind == 'left_right' else ''}the {b.name}?"
            answer = rel
    return _scene_draft(rng, objects, side, clutter, facts, question=question, answer=answer, reasoning=reasoning,
                        answer_type=answer_type, distractors=distractors)


def build_size(
    rng: np.random.Generator, difficulty: int, side: int, multiple_choice: bool, style: SceneStyle = DEFAULT_STYLE
) -> Draft:
    """Colour of the biggest shape, or is A bigger than B (areas differ by >= SIZE_MARGIN)."""
    n, clutter = style.cap(max(2, difficulty + 1), least=2), difficulty - 1
    first = random_spec(rng)
    second = random_spec(rng, [first])
    objects = place_scene(rng, [first, second, *other_specs(rng, n - 2, [first, second])], side, style=style)
    kind = "biggest" if multiple_choice or rng.random() < 0.5 else "yes_no"
    if kind == "biggest":
        ranked = sorted(objects, key=lambda o: -o.area)
        if ranked[0].area < SIZE_MARGIN * ranked[1].area:
            raise Resample("no clearly biggest object")
        big = ranked[0]
        question, answer, answer_type = "What color is the biggest shape?", big.color, "math"
        reasoning = f"The biggest shape is the {big.name}, so the color is {big.color}."
        facts = [f"The biggest shape is the {big.name}."]
        distractors: tuple[str, ...] | None = tuple(c for c in COLORS if c != big.color)
    else:
        a, b = objects[0], objects[1]
        if max(a.area, b.area) < SIZE_MARGIN * min(a.area, b.area):
            raise Resample("sizes too close")
        bigger = a.area > b.area
        question, answer, answer_type = f"Is the {a.name} bigger than the {b.name}?", "yes" if bigger else "no", "yes_no"
        word = "bigger" if bigger else "smaller"
        reasoning = f"The {a.name} is {word} than the {b.name}. So the answer is {answer}."
        facts = [f"The {a.name} is {word} than the {b.name}."]
        distractors = None
    return _scene_draft(rng, objects, side, clutter, facts, question=question, answer=answer, reasoning=reasoning,
                        answer_type=answer_type, distractors=distractors)


def _text_distractors(rng: np.random.Generator, text: str) -> tuple[str, ...]:
    """Wrong options for a read question: same-length numbers or words."""
    if text.isdigit():
        lo, hi = (0, 10) if len(text) == 1 else (10 ** (len(text) - 1), 10 ** len(text))
        pool = {str(v) for v in rng.integers(lo, hi, 12)} - {text}
        return tuple(sorted(pool))
    same = [w for w in WORDS if w != text and len(w) == len(text)]
    return tuple(same or [w for w in WORDS if w != text])


def build_read(
    rng: np.random.Generator, difficulty: int, side: int, multiple_choice: bool, style: SceneStyle = DEFAULT_STYLE
) -> Draft:
    """Read 1-3 digits or a 3-5 letter word; higher difficulty: longer text, smaller font, noise."""
    clutter = difficulty - 1
    if rng.random() < 0.5:
        n_digits = 1 + (difficulty >= 2) + (difficulty >= 4)
        text = str(int(rng.integers(0 if n_digits == 1 else 10 ** (n_digits - 1), 10**n_digits)))
        question, answer_type, what = "What number is written in the image?", "number", "number"
    else:
        length = 3 if difficulty <= 2 else (4 if difficulty <= 4 else 5)
        words = [w for w in WORDS if len(w) == length]
        text = words[rng.integers(len(words))]
        question, answer_type, what = "What word is written in the image?", "ocr", "word"
    largest = fitting_font_size(text, side - 4, side - 4, largest=max(10, side // 2))
    size = max(10, round(largest * (1.0 - 0.1 * (difficulty - 1))))
    size = min(size, largest)
    dx, dy, w, h = ink_extent(text, size)
    x, y = int(rng.integers(2, side - w - 1)), int(rng.integers(2, side - h - 1))
    image = blank_canvas(rng, side, clutter)
    box = draw_text(image, (x, y), text, size)
    caption = (
        f'A white {side}x{side} image with the {what} "{text}" written in black '
        f"at the {quadrant(box, side)}, box {box_text(box)}.{noise_sentence(clutter)}"
    )
    return Draft(
        question=question,
        answer=text,
        reasoning=f'The image shows the {what} "{text}".',
        answer_type=answer_type,
        caption=caption,
        images=(image,),
        distractors=_text_distractors(rng, text),
    )


def build_ground(
    rng: np.random.Generator, difficulty: int, side: int, multiple_choice: bool, style: SceneStyle = DEFAULT_STYLE
) -> Draft:
    """Box of the one <colour> <shape>, in pixels of the original image: difficulty d -> d objects."""
    n, clutter = style.cap(max(1, difficulty)), difficulty - 1
    target = random_spec(rng)
    objects = place_scene(rng, [target, *other_specs(rng, n - 1, [target])], side, style=style)
    obj = objects[0]
    answer = box_text(obj.box)
    x1, y1, x2, y2 = obj.box
    distractors = [box_text(o.box) for o in objects[1:]]
    try:  # same-size boxes elsewhere (they never overlap the target)
        distractors += [box_text(b) for b in place_boxes(rng, [(obj.size, obj.size)] * 3, side, taken=[obj.box], tries=40)]
    except PlacementError:
        pass
    if multiple_choice and len(set(distractors)) < 3:
        raise Resample("not enough distinct distractor boxes")
    return _scene_draft(
        rng, objects, side, clutter,
        question=f"What is the box of the {obj.name}? Answer as [x1, y1, x2, y2].",
        answer=answer,
        reasoning=f"The {obj.name} spans x from {x1} to {x2} and y from {y1} to {y2}.",
        answer_type="iou",
        distractors=tuple(distractors),
    )


BUILDERS = {
    "count": build_count,
    "color": build_color,
    "position": build_position,
    "size": build_size,
    "read": build_read,
    "ground": build_ground,
}

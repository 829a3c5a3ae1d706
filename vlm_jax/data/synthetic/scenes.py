"""Scene rendering: coloured shapes and text on a white canvas, drawn with Pillow.

Everything is drawn WITHOUT anti-aliasing, so every pixel of an object carries its exact palette
colour and every glyph is pure black: objects can be counted by thresholding a colour and labelling
connected components, and boxes can be re-measured from the pixels. Objects never overlap and keep
a minimum gap (rejection sampling), so each object is exactly one connected component.

Boxes are ``(x1, y1, x2, y2)`` in pixels with exclusive ends: an object of ``size`` s starting at
``x1`` covers columns ``x1 .. x1 + s - 1`` and has ``x2 = x1 + s``.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]
Spec = tuple[str, str]  # (colour, shape)

PALETTE: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 190),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: RGB = (255, 255, 255)
TEXT_RGB: RGB = (0, 0, 0)
GRID_RGB: RGB = (200, 200, 200)
NOISE_LEVELS = (150, 186)  # grey speckles: r == g == b in this range, far from every palette colour
MIN_GAP = 3  # background pixels kept between any two objects
MIN_OBJECT_SIZE = 8
MIN_SIDE = 42  # smaller canvases cannot hold the harder scenes
MAX_SIDE = 1024
PATCH = 28  # Qwen2.5-VL: 14 px patches merged 2 x 2; canvas sides prefer multiples of this

_SHAPE_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}


class PlacementError(ValueError):
    """The requested objects did not fit on the canvas (too many or too large)."""


@dataclasses.dataclass(frozen=True)
class Object:
    """One drawn shape: ``shape`` in SHAPES, ``color`` in PALETTE, ``box`` (exclusive ends), ``size``."""

    shape: str
    color: str
    box: Box
    size: int

    @property
    def name(self) -> str:
        """How questions refer to it, e.g. "red circle"."""
        return f"{self.color} {self.shape}"

    @property
    def area(self) -> float:
        """Geometric area in px^2 (the drawn pixel count differs by a few edge pixels)."""
        return _SHAPE_FILL[self.shape] * self.size * self.size

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2


def check_image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """Validate a side range ``(lo, hi)`` (an int means lo == hi); return it as a pair."""
    lo, hi = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if not (isinstance(lo, (int, np.integer)) and isinstance(hi, (int, np.integer))):
        raise ValueError(f"image_size must be ints (lo, hi), got {image_size!r}")
    if not MIN_SIDE <= lo <= hi <= MAX_SIDE:
        raise ValueError(f"image_size {image_size!r} must satisfy {MIN_SIDE} <= lo <= hi <= {MAX_SIDE}")
    return int(lo), int(hi)


def side_for(image_size: int | Sequence[int], difficulty: int) -> int:
    """Canvas side for a difficulty: bigger images at higher difficulty (more room for objects).

    Candidates are the multiples of 28 inside the range (whole 2x2 patch merges), or the range's
    ends when it holds none; difficulty 1 takes the smallest, 5 the largest.
    """
    lo, hi = check_image_size(image_size)
    candidates = [s for s in range(lo, hi + 1) if s % PATCH == 0] or sorted({lo, hi})
    return candidates[round((difficulty - 1) / 4 * (len(candidates) - 1))]


def quadrant(box: Box, side: int) -> str:
    """"top-left" / "top-right" / "bottom-left" / "bottom-right" of the box centre."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return f"{'top' if cy < side / 2 else 'bottom'}-{'left' if cx < side / 2 else 'right'}"


def inside_quadrant(box: Box, side: int) -> bool:
    """True iff the whole box lies in one quadrant (no pixel crosses a midline)."""
    mid = side / 2
    x1, y1, x2, y2 = box
    return (x2 <= mid or x1 >= mid) and (y2 <= mid or y1 >= mid)


def _overlaps(a: Box, b: Box, gap: int) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def place_boxes(
    rng: np.random.Generator,
    extents: Sequence[tuple[int, int]],
    side: int,
    *,
    taken: Sequence[Box] = (),
    tries: int = 150,
) -> list[Box]:
    """Random non-overlapping boxes of the given (width, height), with MIN_GAP and a 1 px border.

    Largest boxes are placed first (better packing); the result follows the input order.
    Raises PlacementError when some box finds no free spot in ``tries`` draws.
    """
    placed: list[Box] = list(taken)
    out: dict[int, Box] = {}
    for i in sorted(range(len(extents)), key=lambda k: -extents[k][0] * extents[k][1]):
        w, h = extents[i]
        if w > side - 2 or h > side - 2:
            raise PlacementError(f"box {w}x{h} does not fit a {side}x{side} canvas")
        for _ in range(tries):
            x, y = int(rng.integers(1, side - w)), int(rng.integers(1, side - h))
            box = (x, y, x + w, y + h)
            if not any(_overlaps(box, other, MIN_GAP) for other in placed):
                placed.append(box)
                out[i] = box
                break
        else:
            raise PlacementError(f"no room for box {i} ({w}x{h}) among {len(placed)} others on {side}x{side}")
    return [out[i] for i in range(len(extents))]


def size_range(side: int, scale: float = 1.0) -> tuple[int, int]:
    """Object sides (inclusive) for a canvas: ``scale`` x (1/8 to 1/4) of its side, never under 8 px
    and never over 3/4 of the side."""
    lo = min(max(MIN_OBJECT_SIZE, int(side * scale) // 8), side * 3 // 4 - 2)
    return lo, min(side * 3 // 4, max(lo + 2, int(side * scale) // 4))


def layout(
    rng: np.random.Generator,
    specs: Sequence[Spec],
    side: int,
    *,
    sizes: Sequence[int] | None = None,
    scale: float = 1.0,
) -> list[Object]:
    """Place one object per (colour, shape) spec; random sizes (``size_range(side, scale)``) unless
    ``sizes`` is given.

    With random sizes a crowded canvas is retried with smaller objects (down to 8 px); fixed sizes
    (ratio questions) are only re-positioned. Raises PlacementError when nothing fits.
    """
    for color, shape in specs:
        if color not in PALETTE or shape not in SHAPES:
            raise ValueError(f"unknown object spec {(color, shape)!r}; colours {COLORS}, shapes {SHAPES}")
    lo, hi = size_range(side, scale)
    scales = (1.0,) if sizes is not None else (1.0, 0.85, 0.7, 0.55, 0.4)
    last: PlacementError | None = None
    for scale in scales:
        for _ in range(3):
            if sizes is None:
                top = max(MIN_OBJECT_SIZE, round(hi * scale))
                chosen = [int(rng.integers(min(lo, top), top + 1)) for _ in specs]
            else:
                chosen = [int(s) for s in sizes]
            try:
                boxes = place_boxes(rng, [(s, s) for s in chosen], side)
            except PlacementError as err:
                last = err
                continue
            return [Object(shape, color, box, s) for (color, shape), box, s in zip(specs, boxes, chosen)]
    raise PlacementError(f"{len(specs)} objects do not fit a {side}x{side} canvas: {last}")


def blank_canvas(rng: np.random.Generator, side: int, clutter: int) -> Image.Image:
    """White canvas with grey speckle noise: ``clutter`` (0..4) sets the share of noisy pixels.

    Noise is drawn first and objects on top, so objects stay intact; grey levels never match a
    palette colour, so thresholding a colour ignores the noise.
    """
    if clutter < 0:
        raise ValueError(f"clutter must be >= 0, got {clutter}")
    pixels = np.full((side, side, 3), 255, dtype=np.uint8)
    n_noise = clutter * side * side // 40
    if n_noise:
        ys = rng.integers(0, side, n_noise)
        xs = rng.integers(0, side, n_noise)
        pixels[ys, xs] = rng.integers(NOISE_LEVELS[0], NOISE_LEVELS[1], n_noise, dtype=np.uint8)[:, None]
    return Image.fromarray(pixels, "RGB")


def draw_object(draw: ImageDraw.ImageDraw, obj: Object) -> None:
    """Draw one filled shape whose pixels exactly span ``obj.box``."""
    x1, y1, x2, y2 = obj.box
    fill = PALETTE[obj.color]
    if obj.shape == "circle":
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) // 2, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def draw_objects(image: Image.Image, objects: Sequence[Object]) -> Image.Image:
    """Draw ``objects`` onto ``image`` in place (and return it)."""
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw_object(draw, obj)
    return image


def render_scene(
    rng: np.random.Generator,
    *,
    n_objects: int,
    image_size: int | Sequence[int],
    clutter: int,
    specs: Sequence[Spec] | None = None,
) -> tuple[Image.Image, list[Object]]:
    """A ``side x side`` scene of ``n_objects`` non-overlapping shapes on a noisy white canvas.

    ``image_size`` is the canvas side (int) or ``(width, height)`` with width == height.
    ``specs`` fixes the (colour, shape) of each object; random otherwise.
    """
    if isinstance(image_size, int):
        side = image_size
    elif len(image_size) == 2 and image_size[0] == image_size[1]:
        side = int(image_size[0])
    else:
        raise ValueError(f"render_scene draws square canvases; got image_size={image_size!r}")
    check_image_size(side)
    if n_objects < 0:
        raise ValueError(f"n_objects must be >= 0, got {n_objects}")
    if specs is None:
        specs = [random_spec(rng) for _ in range(n_objects)]
    elif len(specs) != n_objects:
        raise ValueError(f"got {len(specs)} specs for n_objects={n_objects}")
    objects = layout(rng, specs, side)
    return draw_objects(blank_canvas(rng, side, clutter), objects), objects


def random_spec(rng: np.random.Generator, exclude: Sequence[Spec] = ()) -> Spec:
    """A random (colour, shape) not in ``exclude``."""
    banned = set(exclude)
    choices = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in banned]
    if not choices:
        raise ValueError("every (colour, shape) pair is excluded")
    return choices[int(rng.integers(len(choices)))]


@functools.lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled default font at ``size`` px (no font files needed, same everywhere)."""
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=4096)
def ink_extent(text: str, size: int) -> tuple[int, int, int, int]:
    """(dx, dy, width, height): the ink box of ``text`` drawn at the origin, measured from pixels."""
    probe = Image.new("1", (size * (len(text) + 2), size * 3), 0)
    draw = ImageDraw.Draw(probe)
    draw.fontmode = "1"
    draw.text((size, size), text, font=font(size), fill=1)
    x1, y1, x2, y2 = probe.getbbox() or (size, size, size, size)
    return x1 - size, y1 - size, x2 - x1, y2 - y1


def draw_text(image: Image.Image, top_left: tuple[int, int], text: str, size: int, fill: RGB = TEXT_RGB) -> Box:
    """Draw ``text`` so its ink box starts at ``top_left``; return that ink box (exclusive ends)."""
    dx, dy, w, h = ink_extent(text, size)
    draw = ImageDraw.Draw(image)
    draw.fontmode = "1"  # no anti-aliasing: glyph pixels are exactly ``fill``
    draw.text((top_left[0] - dx, top_left[1] - dy), text, font=font(size), fill=fill)
    return top_left[0], top_left[1], top_left[0] + w, top_left[1] + h


def fitting_font_size(text: str, max_width: int, max_height: int, *, largest: int) -> int:
    """The largest font size <= ``largest`` whose ink box fits ``max_width x max_height``."""
    for size in range(largest, 5, -1):
        _, _, w, h = ink_extent(text, size)
        if w <= max_width and h <= max_height:
            return size
    raise PlacementError(f"text {text!r} does not fit {max_width}x{max_height} px")


def png_bytes(image: Image.Image) -> bytes:
    """Lossless PNG encoding (deterministic for a given Pillow/zlib)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()

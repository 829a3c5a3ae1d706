"""Synthetic tasks: every answer is re-derived from the pixels or the problem text, not from the generator.

Images are decoded from the PNG bytes; colours are recognised with channel rules written here (not
the generator's palette table); shapes by how much of their box they fill; text by matching glyphs
rendered here with Pillow's default font; arithmetic by a small AST evaluator.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import io
import operator
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from vlm_jax.data import synthetic as S
from vlm_jax.data.synthetic.scenes import PlacementError

N_PER_TASK = 120  # examples per task (each with its own seed stream) in the pixel checks
SCHEMA = {
    "problem": str, "answer": str, "images": list, "caption": str, "solution": str, "pass_rate": float,
    "task": str, "capability": str, "difficulty": int, "answer_type": str,
}
OBJ = r"(red|green|blue|yellow|purple) (circle|square|triangle)"


# ----------------------------------------------------------------------------- pixel measurement
def pixels(ex: dict, k: int = 0) -> np.ndarray:
    with Image.open(io.BytesIO(ex["images"][k])) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB")).astype(int)


def color_masks(a: np.ndarray) -> dict[str, np.ndarray]:
    """Colour classes by channel rules (grey noise, grid and black text fall in none)."""
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    return {
        "red": (r > 180) & (g < 90) & (b < 90),
        "green": (g > 120) & (r < 90) & (b < 110),
        "blue": (b > 180) & (r < 90) & (g < 110),
        "yellow": (r > 200) & (g > 160) & (b < 80),
        "purple": (r > 100) & (r < 180) & (b > 150) & (g < 90),
    }


@dataclasses.dataclass(frozen=True)
class Blob:
    color: str
    shape: str
    box: tuple[int, int, int, int]  # exclusive ends
    area: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


def blobs(a: np.ndarray) -> list[Blob]:
    """Connected components (8-connected) of each colour, with shape from their fill ratio."""
    out = []
    for color, mask in color_masks(a).items():
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        for sl, idx in zip(ndimage.find_objects(labels), range(1, n + 1)):
            ys, xs = sl
            area = int((labels[sl] == idx).sum())
            fill = area / ((ys.stop - ys.start) * (xs.stop - xs.start))
            shape = "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"
            out.append(Blob(color, shape, (xs.start, ys.start, xs.stop, ys.stop), area))
    return out


def find(bs: list[Blob], name: str) -> Blob:
    hits = [b for b in bs if b.name == name]
    assert len(hits) == 1, f"expected exactly one {name}, found {len(hits)}"
    return hits[0]


def iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# ----------------------------------------------------------------------------- text recognition
@functools.lru_cache(maxsize=None)
def default_font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=None)
def glyph(text: str, size: int) -> np.ndarray:
    """Binary ink of ``text`` in Pillow's default font, no anti-aliasing, cropped to its ink."""
    img = Image.new("L", (size * (len(text) + 2), size * 3), 0)
    draw = ImageDraw.Draw(img)
    draw.fontmode = "1"
    draw.text((size, size), text, font=default_font(size), fill=255)
    a = np.asarray(img) > 0
    ys, xs = np.nonzero(a)
    return a[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def shows(crop: np.ndarray, text: str) -> bool:
    """True iff ``crop`` is exactly ``text`` drawn at some font size."""
    return any(np.array_equal(glyph(text, s), crop) for s in range(6, 70) if glyph(text, s).shape == crop.shape)


def black(a: np.ndarray) -> np.ndarray:
    return (a < 60).all(axis=-1)


def crop(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


# ----------------------------------------------------------------------------- answer checking
def question(ex: dict) -> str:
    return ex["problem"].split("\n")[-1].split(" Options: ")[0]


def options(ex: dict) -> list[tuple[str, str]]:
    tail = ex["problem"].split(" Options: ")[1]
    assert tail.endswith(". Answer with the letter.")
    return re.findall(r"\(([A-D])\) (.+?)(?= \([A-D]\) |\. Answer with the letter\.$)", tail)


def check(ex: dict, truth: str | None = None, ok=None) -> None:
    """Free form: answer == truth (or ok(answer)). MC: exactly one option is right, and it is the letter."""
    ok = ok or (lambda s: s == truth)
    if ex["answer_type"] == "mcq":
        opts = options(ex)
        assert [k for k, _ in opts] == list("ABCD"), ex["problem"]
        assert len({o for _, o in opts}) == 4, ex["problem"]
        right = [k for k, o in opts if ok(o)]
        assert right == [ex["answer"]], (ex["problem"], ex["answer"], truth)
    else:
        assert ok(ex["answer"]), (ex["problem"], ex["answer"], truth)


def examples(capability: str, task: str, **kw) -> list[dict]:
    kw = {"difficulty": (1, 5), **kw}
    return S.generate(capability, N_PER_TASK, seed=7, split=f"test-{task}", tasks=[task], **kw)


# ----------------------------------------------------------------------------- perception
def test_count_matches_connected_components():
    for ex in examples("perception", "count"):
        noun = re.fullmatch(r"How many (.+) are there\?", question(ex)).group(1).split()
        bs = blobs(pixels(ex))
        if noun[-1] == "shapes":
            hits = [b for b in bs if b.color == noun[0]]
        elif len(noun) == 2:
            hits = [b for b in bs if b.name == f"{noun[0]} {noun[1][:-1]}"]
        else:
            hits = [b for b in bs if b.shape == noun[0][:-1]]
        check(ex, str(len(hits)))


def test_ground_box_matches_pixels():
    for ex in examples("perception", "ground"):
        name = " ".join(re.search(r"box of the " + OBJ, question(ex)).groups())
        measured = find(blobs(pixels(ex)), name).box

        def close(text: str, measured=measured) -> bool:
            return iou([int(v) for v in re.findall(r"\d+", text)], measured) >= 0.9

        check(ex, ok=close)
        if ex["answer_type"] == "iou":
            assert re.fullmatch(r"\[\d+, \d+, \d+, \d+\]", ex["answer"])


def test_color_matches_pixels():
    for ex in examples("perception", "color"):
        shape = re.fullmatch(r"What color is the (\w+)\?", question(ex)).group(1)
        hits = [b for b in blobs(pixels(ex)) if b.shape == shape]
        assert len(hits) == 1, ex["problem"]
        check(ex, hits[0].color)


def measured_relation(a: Blob, b: Blob) -> str:
    x_sep, y_sep = a.box[2] <= b.box[0] or b.box[2] <= a.box[0], a.box[3] <= b.box[1] or b.box[3] <= a.box[1]
    assert x_sep != y_sep, "relation must be clear along exactly one axis"
    if x_sep:
        return "left" if a.box[2] <= b.box[0] else "right"
    return "above" if a.box[3] <= b.box[1] else "below"


def test_position_matches_pixels():
    seen = set()
    for ex in examples("perception", "position"):
        a_img = pixels(ex)
        side = a_img.shape[0]
        bs, q = blobs(a_img), question(ex)
        if m := re.fullmatch(rf"Which quadrant is the {OBJ} in\?", q):
            x1, y1, x2, y2 = find(bs, " ".join(m.groups())).box
            assert (x2 <= side / 2 or x1 >= side / 2) and (y2 <= side / 2 or y1 >= side / 2), "crosses a midline"
            truth = f"{'top' if y2 <= side / 2 else 'bottom'}-{'left' if x2 <= side / 2 else 'right'}"
            kind = "quadrant"
        elif m := re.fullmatch(rf"Is the {OBJ} (left of|right of|above|below) the {OBJ}\?", q):
            rel = measured_relation(find(bs, " ".join(m.groups()[:2])), find(bs, " ".join(m.groups()[3:])))
            truth, kind = ("yes" if m.group(3).split()[0] == rel else "no"), "yes_no"
            assert ex["answer_type"] == "yes_no"
        else:
            m = re.fullmatch(rf"(?:Where is|Is) the {OBJ} (relative to|left or right of|above or below) the {OBJ}\?", q)
            assert m, q
            truth = measured_relation(find(bs, " ".join(m.groups()[:2])), find(bs, " ".join(m.groups()[3:])))
            if m.group(3) != "relative to":
                assert truth in m.group(3).split(), q
            kind = m.group(3)
        check(ex, truth)
        seen.add(kind)
    assert seen == {"quadrant", "yes_no", "relative to", "left or right of", "above or below"}


def test_size_matches_pixel_areas():
    for ex in examples("perception", "size"):
        bs, q = blobs(pixels(ex)), question(ex)
        if q == "What color is the biggest shape?":
            big, second = sorted(bs, key=lambda b: -b.area)[:2]
            assert big.area >= 1.3 * second.area, "biggest is not clearly biggest"
            check(ex, big.color)
        else:
            m = re.fullmatch(rf"Is the {OBJ} bigger than the {OBJ}\?", q)
            a, b = find(bs, " ".join(m.groups()[:2])), find(bs, " ".join(m.groups()[2:]))
            assert max(a.area, b.area) >= 1.3 * min(a.area, b.area)
            check(ex, "yes" if a.area > b.area else "no")


def test_read_text_matches_rendered_glyphs():
    kinds = set()
    for ex in examples("perception", "read"):
        ink = black(pixels(ex))
        assert not (ink[0].any() or ink[-1].any() or ink[:, 0].any() or ink[:, -1].any()), "text is clipped"
        region = crop(ink)
        check(ex, ok=lambda text, region=region: shows(region, text))
        kinds.add(ex["answer_type"])
        if ex["answer_type"] == "number":
            assert ex["answer"].isdigit() and 1 <= len(ex["answer"]) <= 3
    assert kinds == {"number", "ocr", "mcq"}


def test_multiple_choice_share_and_format():
    rows = S.generate("perception", 60, seed=1, mc_fraction=1.0)
    assert all(r["answer_type"] == "mcq" and r["answer"] in "ABCD" for r in rows)
    letters = {r["answer"] for r in rows}
    assert letters == set("ABCD"), "correct letters should be shuffled"
    assert not any(r["answer_type"] == "mcq" for r in S.generate("perception", 60, seed=1, mc_fraction=0.0))
    assert not any(r["answer_type"] == "mcq" for r in S.generate("visual_reasoning", 20, seed=1, mc_fraction=1.0))
    half = S.generate("perception", 200, seed=2, mc_fraction=0.5)
    assert 70 <= sum(r["answer_type"] == "mcq" for r in half) <= 130


# ----------------------------------------------------------------------------- visual reasoning
def test_more_than_matches_counts():
    for ex in examples("visual_reasoning", "more_than"):
        a, b = re.fullmatch(r"How many more (\w+) shapes than (\w+) shapes are there\?", question(ex)).groups()
        bs = blobs(pixels(ex))
        diff = sum(x.color == a for x in bs) - sum(x.color == b for x in bs)
        assert diff > 0
        check(ex, str(diff))


def test_digit_sum_matches_recognised_digits():
    for ex in examples("visual_reasoning", "digit_sum"):
        ink = black(pixels(ex))
        labels, n = ndimage.label(ndimage.binary_dilation(ink, np.ones((3, 3))))
        digits = []
        for idx in range(1, n + 1):
            region = crop(ink & (labels == idx))
            found = [d for d in range(10) if shows(region, str(d))]
            assert len(found) == 1, f"unreadable glyph in {ex['problem']!r}"
            digits.append(found[0])
        assert 2 <= n <= 4
        check(ex, str(sum(digits)))


def test_area_compare_matches_pixel_areas():
    kinds = set()
    for ex in examples("visual_reasoning", "area_compare"):
        bs, q = blobs(pixels(ex)), question(ex)
        if m := re.fullmatch(r"How many times larger is the area of the (\w+) (\w+) than the (\w+) \2\?", q):
            big, small = find(bs, f"{m.group(1)} {m.group(2)}"), find(bs, f"{m.group(3)} {m.group(2)}")
            k, rest = divmod(big.box[2] - big.box[0], small.box[2] - small.box[0])
            assert rest == 0 and k >= 2, "widths must differ by a whole factor"
            assert abs(big.area / small.area - k * k) <= 0.2 * k * k
            check(ex, str(k * k))
            kinds.add("times")
        else:
            a, b = re.fullmatch(r"Which color covers a larger total area, (\w+) or (\w+)\?", q).groups()
            area = {c: sum(x.area for x in bs if x.color == c) for c in (a, b)}
            assert max(area.values()) >= 1.2 * min(area.values())
            check(ex, max(area, key=area.get))
            kinds.add("total")
    assert kinds == {"times", "total"}


def bar_values(a: np.ndarray) -> dict[str, int]:
    """Bar values from pixels: bar height / grid spacing, bars standing on the black baseline."""
    baseline = int(np.argmax(black(a).sum(axis=1)))
    grey_rows = np.nonzero(((a == 200).all(axis=-1)).any(axis=1))[0]
    steps = np.diff(np.concatenate([grey_rows, [baseline]]))
    assert len(set(steps.tolist())) == 1, f"grid is not regular: {steps}"
    unit = int(steps[0])
    values = {}
    for b in blobs(a):
        assert b.shape == "square" and b.box[3] == baseline, "bars are rectangles on the baseline"
        h = b.box[3] - b.box[1]
        assert h % unit == 0
        assert b.color not in values
        values[b.color] = h // unit
    return values


def test_bar_chart_matches_bar_heights():
    for ex in examples("visual_reasoning", "bar_chart"):
        values, q = bar_values(pixels(ex)), question(ex)
        assert 2 <= len(values) <= 4
        if m := re.fullmatch(r"What is the sum of the (\w+) bar and the (\w+) bar\?", q):
            truth = values[m.group(1)] + values[m.group(2)]
        elif m := re.fullmatch(r"How much taller is the (\w+) bar than the (\w+) bar\?", q):
            truth = values[m.group(1)] - values[m.group(2)]
            assert truth > 0
        else:
            assert q == "What is the total of all the bars?"
            truth = sum(values.values())
        check(ex, str(truth))
        for color, v in values.items():
            assert f"a {color} bar of {v}" in ex["caption"]


# ----------------------------------------------------------------------------- textual reasoning
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def safe_eval(expr: str) -> int:
    """Integers with + - * only; anything else is rejected."""

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        raise ValueError(f"unsupported syntax {ast.dump(node)}")

    return ev(ast.parse(expr, mode="eval").body)


def test_safe_eval_rejects_other_syntax():
    assert safe_eval("3 + 4 * 2 - 1") == 10
    with pytest.raises(ValueError):
        safe_eval("__import__('os')")
    with pytest.raises(ValueError):
        safe_eval("8 / 2")


def test_arithmetic_reevaluated_from_text():
    for ex in examples("textual_reasoning", "arithmetic"):
        expr = re.fullmatch(r"What is ([\d +*-]+)\?", ex["problem"]).group(1)
        assert 2 <= len(re.findall(r" [+*-] ", expr)) <= 3
        value = safe_eval(expr)
        assert value >= 0
        check(ex, str(value))
        assert ex["images"] == [] and ex["caption"] == ""


def test_word_problem_reevaluated_from_text():
    for ex in examples("textual_reasoning", "word_problem"):
        sentences = ex["problem"].split(". ")
        count = int(re.fullmatch(r"\w+ has (\d+) \w+", sentences[0]).group(1))
        for s in sentences[1:-1] + [sentences[-1].split("? ")[0]]:
            if m := re.search(r"buys (\d+) boxes of (\d+)", s):
                count += int(m.group(1)) * int(m.group(2))
            elif m := re.search(r"(?:buys|finds|gets) (\d+) more", s):
                count += int(m.group(1))
            elif m := re.search(r"(?:gives|loses|sells) (\d+)", s):
                count -= int(m.group(1))
                assert count >= 0
        assert ex["problem"].endswith("have now?")
        check(ex, str(count))


# ----------------------------------------------------------------------------- schema, determinism, API
@pytest.mark.parametrize("capability", S.CAPABILITIES)
def test_schema_and_solution_format(capability):
    rows = S.generate(capability, 40, seed=3, difficulty=(2, 4), image_size=(56, 84))
    assert {r["task"] for r in rows} == set(S.TASKS[capability])
    for r in rows:
        assert set(r) == set(SCHEMA)
        for key, typ in SCHEMA.items():
            assert type(r[key]) is typ, (key, r[key])
        assert all(isinstance(b, bytes) for b in r["images"])
        assert r["problem"].count("<image>") == len(r["images"])
        assert (len(r["images"]) == 0) == (capability == "textual_reasoning")
        assert (r["caption"] == "") == (capability == "textual_reasoning")
        assert 2 <= r["difficulty"] <= 4 and r["pass_rate"] == -1.0 and r["capability"] == capability
        assert r["answer_type"] in {"number", "mcq", "math", "iou", "ocr", "yes_no"}
        m = re.fullmatch(r"<think>(.+)</think> \\boxed\{(.+)\}", r["solution"], flags=re.S)
        assert m and m.group(2) == r["answer"], r["solution"]
        for k in range(len(r["images"])):
            h, w, _ = pixels(r, k).shape
            assert h == w and 56 <= w <= 84


def test_determinism_and_independence():
    a = S.generate("perception", 8, seed=11, difficulty=(1, 5))
    assert a == S.generate("perception", 8, seed=11, difficulty=(1, 5))
    assert a[:3] == S.generate("perception", 3, seed=11, difficulty=(1, 5)), "example i must not depend on n"
    assert a != S.generate("perception", 8, seed=12, difficulty=(1, 5))
    other = S.generate("perception", 8, seed=11, split="test", difficulty=(1, 5))
    assert all(x["images"] != y["images"] for x, y in zip(a, other))
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    assert S.make_example("bar_chart", rng_a, difficulty=3, image_size=(56, 112), multiple_choice=False) == (
        S.make_example("bar_chart", rng_b, difficulty=3, image_size=(56, 112), multiple_choice=False)
    )


def test_difficulty_grows_scene_and_image():
    easy = S.generate("perception", 30, seed=4, tasks=["count"], difficulty=(1, 1), mc_fraction=0.0)
    hard = S.generate("perception", 30, seed=4, tasks=["count"], difficulty=(5, 5), mc_fraction=0.0)
    assert {pixels(r).shape[0] for r in easy} == {56} and {pixels(r).shape[0] for r in hard} == {112}
    assert max(len(blobs(pixels(r))) for r in easy) == 3 and min(len(blobs(pixels(r))) for r in hard) == 7
    noisy = lambda r: ((lambda a: ((a[..., 0] == a[..., 1]) & (a[..., 0] < 200)).mean())(pixels(r)))  # noqa: E731
    assert all(noisy(r) == 0 for r in easy) and all(noisy(r) > 0.02 for r in hard)
    levels = [r["difficulty"] for r in S.generate("visual_reasoning", 60, seed=4, difficulty=(2, 4))]
    assert set(levels) == {2, 3, 4}


def test_render_scene_objects_are_separate_and_measurable():
    for seed in range(40):
        img, objs = S.render_scene(np.random.default_rng(seed), n_objects=6, image_size=84, clutter=2)
        assert img.size == (84, 84) and len(objs) == 6
        for i, a in enumerate(objs):
            assert 0 < a.box[0] < a.box[2] < 84 and 0 < a.box[1] < a.box[3] < 84
            assert a.box[2] - a.box[0] == a.size == a.box[3] - a.box[1]
            for b in objs[i + 1 :]:
                gap = max(b.box[0] - a.box[2], a.box[0] - b.box[2], b.box[1] - a.box[3], a.box[1] - b.box[3])
                assert gap >= 2, "objects too close"
        measured = sorted((b.color, b.shape, b.box) for b in blobs(np.asarray(img).astype(int)))
        assert measured == sorted((o.color, o.shape, o.box) for o in objs)


@pytest.mark.parametrize("side", [42, 224])
def test_every_task_works_at_the_size_extremes(side):
    for capability, tasks in S.TASKS.items():
        for level in (1, 5):
            rows = S.generate(capability, 2 * len(tasks), seed=5, difficulty=level, image_size=side, mc_fraction=0.5)
            assert {r["task"] for r in rows} == set(tasks)
            assert all(pixels(r).shape == (side, side, 3) for r in rows if r["images"])


def test_corpus_covers_all_tasks():
    texts = S.corpus(n=24, seed=0)
    assert texts == S.corpus(n=24, seed=0)
    assert all(isinstance(t, str) and t for t in texts)
    solutions = [t for t in texts if t.startswith("<think>")]
    assert len(solutions) == 24
    assert sum("<image>" in t for t in texts) == 16  # perception + visual-reasoning problems


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"capability": "vision"}, "unknown capability"),
        ({"tasks": ["arithmetic"]}, "not a perception task"),
        ({"difficulty": (0, 3)}, "difficulty range"),
        ({"difficulty": (4, 2)}, "difficulty range"),
        ({"image_size": (10, 20)}, "image_size"),
        ({"mc_fraction": 1.5}, "mc_fraction"),
        ({"n": -1}, "n must be"),
        ({"max_objects": 0}, "max_objects"),
        ({"object_scale": 10.0}, "object_scale"),
        ({"capability": "visual_reasoning", "max_objects": 1}, "perception only"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, message):
    args = {"capability": "perception", "n": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        S.generate(args.pop("capability"), args.pop("n"), **args)


def test_make_example_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown task 'paint'"):
        S.make_example("paint", rng, difficulty=1, image_size=(56, 112), multiple_choice=False)
    with pytest.raises(ValueError, match="no multiple-choice form"):
        S.make_example("arithmetic", rng, difficulty=1, image_size=(56, 112), multiple_choice=True)
    with pytest.raises(ValueError, match="difficulty must be"):
        S.make_example("count", rng, difficulty=6, image_size=(56, 112), multiple_choice=False)
    with pytest.raises(PlacementError):
        S.render_scene(rng, n_objects=200, image_size=56, clutter=0)


def test_scene_style_caps_objects_and_scales_them():
    """max_objects=1 draws exactly one shape (a position question asks its quadrant); object_scale
    makes shapes bigger; answers still match the re-measured pixels."""
    kw = dict(difficulty=(1, 5), image_size=56, mc_fraction=0.0)
    small = S.generate("perception", 24, seed=3, tasks=["color", "position"], **kw)
    big = S.generate("perception", 24, seed=3, tasks=["color", "position"], max_objects=1, object_scale=2.0, **kw)
    for ex in big:
        bs = blobs(pixels(ex))
        assert len(bs) == 1, ex["problem"]
        if ex["task"] == "color":
            check(ex, bs[0].color)
        else:
            x1, y1, x2, y2 = bs[0].box
            assert re.fullmatch(rf"Which quadrant is the {OBJ} in\?", question(ex)), ex["problem"]
            check(ex, f"{'top' if y2 <= 28 else 'bottom'}-{'left' if x2 <= 28 else 'right'}")
    assert any(len(blobs(pixels(ex))) > 1 for ex in small)

    def mean_side(rows):
        return np.mean([b.box[2] - b.box[0] for ex in rows for b in blobs(pixels(ex))])

    assert mean_side(big) > 1.5 * mean_side(small)
    # questions that need two referents keep two objects
    sizes = S.generate("perception", 6, seed=3, tasks=["size"], max_objects=1, **kw)
    assert all(len(blobs(pixels(ex))) == 2 for ex in sizes)

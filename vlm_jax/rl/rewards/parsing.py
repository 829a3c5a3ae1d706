"""Answer extraction and tolerant parsers for model outputs (pure string functions, never raise).

Everything here reads untrusted text: each parser returns `None` for anything it cannot read, runs in
time linear in the input (no backtracking regexes over the whole response), and never raises.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

# `\boxed{` (optionally `\boxed {`), and single braces, scanned together in one left-to-right pass.
_BOX_TOKENS = re.compile(r"\\boxed\s*\{|\{|\}")
_TEXT_WRAPPER = re.compile(r"^\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{(.*)\}$", re.DOTALL)
# Numbers use atomic groups so a long digit run cannot make the regex backtrack quadratically.
_NUMBER = re.compile(r"[-+]?(?>\d+(?:\.\d*)?|\.\d+)(?>[eE][-+]?\d+)?")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_NUM = r"\s*+(" + _NUMBER.pattern + r")\s*+"
_BOX4 = re.compile(r"[\[(]" + ",".join([_NUM] * 4) + r"[\])]")
_CHOICE = re.compile(r"^(?:\(([A-Za-z])\)|([A-Za-z])(?:[.):]|$))")
_YES_NO = re.compile(r"^(yes|no)(?![a-z])")

Box = tuple[float, float, float, float]

# Short answers (letters, yes/no, numbers) longer than this are not parsed at all.
MAX_SHORT_ANSWER_CHARS = 1000


def extract_answer(text: str) -> str | None:
    r"""The model's final answer in `text`: the content of the last balanced `\boxed{...}`, else of the
    last `<answer>...</answer>`, else None.

    "Last" means the `\boxed{` that starts last among those whose braces balance, so nested boxes
    give the innermost (`\boxed{\boxed{3}}` -> `3`) and a box left unclosed (a truncated response)
    is skipped. Nested braces inside a box are kept (`\boxed{\frac{1}{2}}` -> `\frac{1}{2}`).
    A single stack pass keeps this linear even for adversarial inputs such as `\boxed{` x 10^5.
    """
    if not isinstance(text, str):
        return None
    stack: list[int] = []  # -1 for a plain `{`, else the content start of a `\boxed{`
    best: tuple[int, int] | None = None  # (content start, content end) of the chosen box
    for m in _BOX_TOKENS.finditer(text):
        tok = m.group()
        if tok == "}":
            if stack:
                content_start = stack.pop()
                if content_start >= 0 and (best is None or content_start > best[0]):
                    best = (content_start, m.start())
        elif tok == "{":
            stack.append(-1)
        else:
            stack.append(m.end())
    if best is not None:
        return text[best[0]:best[1]].strip()
    return _last_answer_tag(text)


def _last_answer_tag(text: str) -> str | None:
    """Content of the last closed `<answer>...</answer>` (innermost if tags nest), found with
    `rfind`/`find` so that many unclosed `<answer>` tags cannot make it quadratic."""
    close = text.rfind("</answer>")
    if close < 0:
        return None
    start = text.rfind("<answer>", 0, close)
    if start < 0:
        return None
    start += len("<answer>")
    return text[start:text.find("</answer>", start)].strip()


def _unwrap(text: str) -> str:
    r"""Strip surrounding whitespace, `$...$` and `\text{...}`-style wrappers (repeatedly)."""
    prev = None
    while prev != text:
        prev = text
        text = text.strip().strip("$").strip()
        m = _TEXT_WRAPPER.match(text)
        if m:
            text = m.group(1)
    return text


def parse_number(text: Any) -> float | None:
    r"""A finite float from a plain numeric answer: `7`, `-7.0`, `1e3`, `1,000` (thousands commas),
    optionally wrapped in `$` or `\text{}`; None for anything else (including inf/NaN and `1e999`)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
        return value if math.isfinite(value) else None
    if not isinstance(text, str) or len(text) > MAX_SHORT_ANSWER_CHARS:
        return None
    s = _unwrap(text).replace("\\,", "").replace("\\!", "").replace(" ", "")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if not _NUMBER.fullmatch(s):
        return None
    value = float(s)
    return value if math.isfinite(value) else None


def parse_choice(text: Any) -> str | None:
    r"""The upper-case option letter of a multiple-choice answer: `B`, `(b)`, `B.`, `B) text`,
    `B: text`, `\boxed{B}`, `\text{B}`. A letter followed by plain text (`A cat`) is not a choice."""
    if not isinstance(text, str) or len(text) > MAX_SHORT_ANSWER_CHARS:
        return None
    boxed = extract_answer(text)
    s = _unwrap(boxed if boxed is not None else text)
    m = _CHOICE.match(s)
    if m is None:
        return None
    return (m.group(1) or m.group(2)).upper()


def parse_yes_no(text: Any) -> str | None:
    """`"yes"` or `"no"` from an answer that is, or starts with, that word (any case, `Yes.`,
    `no, because ...`); None otherwise (`none`, `yesterday`, `maybe`)."""
    if not isinstance(text, str) or len(text) > MAX_SHORT_ANSWER_CHARS:
        return None
    m = _YES_NO.match(_unwrap(text).lower())
    return m.group(1) if m else None


def _as_box(values: Sequence[Any]) -> Box | None:
    """Four finite floats from a sequence, or None."""
    try:
        if len(values) != 4:
            return None
        box = tuple(float(v) for v in values)
    except (TypeError, ValueError, OverflowError):
        return None
    return box if all(math.isfinite(v) for v in box) else None  # type: ignore[return-value]


def parse_boxes(value: Any, limit: int | None = None) -> list[Box] | None:
    """Every `[x1, y1, x2, y2]` (or `(...)`) box in a string, in order, or the boxes of a list given
    as data (`[10, 20, 30, 40]` or `[[...], [...]]`). Returns None when `limit` boxes are exceeded
    or a data list is malformed; boxes with non-finite coordinates are dropped from text."""
    if isinstance(value, str):
        boxes: list[Box] = []
        for m in _BOX4.finditer(value):
            box = _as_box(m.groups())
            if box is not None:
                boxes.append(box)
                if limit is not None and len(boxes) > limit:
                    return None
        return boxes
    try:
        items = list(value)
    except TypeError:
        return None
    if len(items) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
        items = [items]
    if limit is not None and len(items) > limit:
        return None
    out = [_as_box(item) for item in items]
    return None if any(box is None for box in out) else out  # type: ignore[return-value]


def parse_box(value: Any) -> Box | None:
    """The first box in `value` (see `parse_boxes`), or None."""
    boxes = parse_boxes(value)
    return boxes[0] if boxes else None


def has_think_then_boxed(response: str) -> bool:
    r"""Whether the stripped response fully matches the paper's format regex
    `<think>.*</think>.*\\boxed\{.*\}.*` (DOTALL), computed with `str.find` in linear time (the regex
    itself backtracks quadratically on responses with many `</think>` and no box)."""
    if not isinstance(response, str):
        return False
    s = response.strip()
    if not s.startswith("<think>"):
        return False
    close = s.find("</think>", len("<think>"))
    if close < 0:
        return False
    box = s.find("\\boxed{", close + len("</think>"))
    return box >= 0 and s.find("}", box + len("\\boxed{")) >= 0

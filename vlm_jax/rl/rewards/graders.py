r"""Per-sample verifiable graders: `grader(response, answer) -> float`, shared by training rewards and
evaluation. Each reads the final answer with `extract_answer` (last `\boxed{}`, else last
`<answer>`); a response without one scores 0. Graders never raise on model output (the registry
also catches anything unexpected), and all heavy work is guarded by size limits.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from rapidfuzz.distance import Levenshtein

from vlm_jax.rl.rewards.geometry import giou, greedy_detection_score, iou
from vlm_jax.rl.rewards.parsing import (extract_answer, has_think_then_boxed, parse_box, parse_boxes,
                                        parse_choice, parse_number, parse_yes_no)

logger = logging.getLogger(__name__)

Grader = Callable[[str, Any], float]

# Paper: "overlong/complex answers score 0". Also bounds sympy's work on adversarial answers.
MAX_MATH_ANSWER_CHARS = 200
# Exponent towers and factorials make sympy evaluate astronomically large integers in C, where no
# timeout can interrupt it: `9**9**9`, `(10^9)!`, `10^{10^{10}}`, `2^{1000}`, `((9^9)^9)^9^9`.
_MATH_TOO_COMPLEX = re.compile(r"\*\*|(?<!\\)!|\^\s*[{(]?\s*[-+]?\d{3,}|\^\s*\{[^{}]*\^|\^\s*\([^()]*\^")
MAX_EXPONENTS = 3
# Numbers are equal within this relative tolerance (`7.0 == 7`).
NUMBER_REL_TOL = 1e-6
# ANLS: a normalized similarity below this scores 0.
ANLS_THRESHOLD = 0.5
# More predicted boxes than this in one answer scores 0 (spam; also bounds the IoU matrix).
MAX_DETECTION_BOXES = 1000


def _math_too_complex(expr: str) -> bool:
    """Whether an answer is too long or too explosive to hand to sympy (scores 0)."""
    return (len(expr) > MAX_MATH_ANSWER_CHARS or expr.count("^") > MAX_EXPONENTS
            or _MATH_TOO_COMPLEX.search(expr) is not None)


@functools.cache
def _quiet_math_parsers() -> None:
    """Raise pylatexenc's and math_verify's log level to ERROR (once, on first math grading): they
    warn on every malformed or slow answer, which in RL is most answers early on."""
    for name in ("pylatexenc", "math_verify"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _math_verify_equal(pred: str, ref: str) -> bool:
    r"""Second opinion from `math_verify` on `\boxed{}`-wrapped answers. Its timeouts use SIGALRM,
    which only works in the main thread; elsewhere this fallback is skipped (mathruler decides)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    from math_verify import parse, verify

    gold = parse(f"\\boxed{{{ref}}}", parsing_timeout=1)
    guess = parse(f"\\boxed{{{pred}}}", parsing_timeout=1)
    return bool(gold and guess and verify(gold, guess, timeout_seconds=1))


def grade_math(response: str, answer: Any) -> float:
    r"""1 if the boxed answer is mathematically equivalent to `answer` (mathruler's `grade_answer`,
    as in the paper, with math_verify as a fallback: `\frac{1}{2}` = `0.5`, `2` = `2.0`), else 0.
    Answers over `MAX_MATH_ANSWER_CHARS` or with exponent towers/factorials score 0."""
    from mathruler.grader import grade_answer

    _quiet_math_parsers()
    pred = extract_answer(response)
    ref = str(answer).strip()
    if not pred or not ref or _math_too_complex(pred) or _math_too_complex(ref):
        return 0.0
    try:
        return 1.0 if grade_answer(pred, ref) or _math_verify_equal(pred, ref) else 0.0
    except Exception:  # noqa: BLE001 - sympy/latex parsers fail on odd text: that answer is not equal
        logger.debug("math grader failed on %r vs %r", pred, ref, exc_info=True)
        return 0.0


def grade_mcq(response: str, answer: Any) -> float:
    """1 if the answered option letter equals the reference letter (`B` or `(B)`), else 0."""
    pred = parse_choice(extract_answer(response))
    return float(pred is not None and pred == parse_choice(str(answer)))


def grade_number(response: str, answer: Any) -> float:
    """1 if the answered number equals the reference within `NUMBER_REL_TOL` relative tolerance
    (`7.0` = `7`, `1,000` = `1000`), else 0. Non-finite numbers never match."""
    pred = parse_number(extract_answer(response))
    ref = parse_number(answer)
    if pred is None or ref is None:
        return 0.0
    return float(math.isclose(pred, ref, rel_tol=NUMBER_REL_TOL, abs_tol=0.0))


def grade_cells(response: str, answer: Any) -> float:
    """Share of the reference's words (a grid's cells in reading order, e.g. `red blue green`)
    that the answer names in the same position (case-insensitive); extra or missing words count
    as wrong, so only the exact list scores 1. The per-cell reward of the grid world's perception."""
    pred = extract_answer(response)
    ref = str(answer).lower().split()
    if pred is None or not ref:
        return 0.0
    words = pred.lower().split()
    right = sum(p == r for p, r in zip(words, ref))
    return right / max(len(ref), len(words))


def grade_yes_no(response: str, answer: Any) -> float:
    """1 if the answer and reference are both yes or both no (any case), else 0."""
    pred = parse_yes_no(extract_answer(response))
    return float(pred is not None and pred == parse_yes_no(str(answer)))


def grade_iou(response: str, answer: Any) -> float:
    """IoU of the first `[x1, y1, x2, y2]` box in the answer with the reference box (a string like
    `[10, 20, 30, 40]` or a list), in the same pixel frame; 0 if either is missing or degenerate."""
    pred = parse_box(extract_answer(response))
    ref = parse_box(answer)
    return 0.0 if pred is None or ref is None else iou(pred, ref)


def grade_giou(response: str, answer: Any) -> float:
    """Generalized IoU mapped from [-1, 1] to [0, 1] by (giou + 1) / 2, so it combines with the other
    [0, 1] rewards while still ranking disjoint boxes by distance (plain IoU is 0 for all of them).
    Disjoint-but-close boxes therefore score just under 0.5; a missing, invalid or degenerate box
    scores 0, the same as the worst possible box."""
    pred = parse_box(extract_answer(response))
    ref = parse_box(answer)
    return 0.0 if pred is None or ref is None else (giou(pred, ref) + 1.0) / 2.0


def grade_detection(response: str, answer: Any) -> float:
    """Greedy-matched detection score: predicted and reference box lists matched by IoU >= 0.5 (highest
    first); score = sum of matched IoUs / max(n_gt, n_pred). No answer -> 0; an answer with no boxes
    scores 1 only when the reference has none either."""
    text = extract_answer(response)
    if text is None:
        return 0.0
    pred = parse_boxes(text, limit=MAX_DETECTION_BOXES)
    ref = parse_boxes(answer)
    if pred is None or ref is None:
        return 0.0
    return greedy_detection_score(pred, ref)


def _normalize_ocr(text: str) -> str:
    return " ".join(text.lower().split())


def anls(pred: str, ref: str, threshold: float = ANLS_THRESHOLD) -> float:
    """Normalized Levenshtein similarity `1 - dist / max(len)` after lower-casing and collapsing
    whitespace, set to 0 when below `threshold` (1 when both are empty)."""
    a, b = _normalize_ocr(pred), _normalize_ocr(ref)
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    if min(len(a), len(b)) < threshold * longest:  # distance >= length gap: cannot reach threshold
        return 0.0
    sim = 1.0 - Levenshtein.distance(a, b) / longest
    return sim if sim >= threshold else 0.0


def grade_ocr(response: str, answer: Any) -> float:
    """ANLS of the answer against the reference text (or the best of a list of accepted texts)."""
    pred = extract_answer(response)
    if pred is None:
        return 0.0
    refs = list(answer) if isinstance(answer, (list, tuple, np.ndarray)) else [answer]
    return max((anls(pred, str(ref)) for ref in refs), default=0.0)


def grade_format(response: str, answer: Any = None) -> float:
    r"""1 if the stripped response is `<think>...</think>` followed by a `\boxed{...}` (the paper's
    regex `<think>.*</think>.*\\boxed\{.*\}.*`, DOTALL, full match), else 0. `answer` is unused."""
    del answer
    return float(has_think_then_boxed(response))


# Graders of the answer's correctness, selectable per example by `answer_type` in the `auto` reward.
ACCURACY_GRADERS: dict[str, Grader] = {
    "math": grade_math,
    "mcq": grade_mcq,
    "number": grade_number,
    "yes_no": grade_yes_no,
    "cells": grade_cells,
    "iou": grade_iou,
    "giou": grade_giou,
    "detection": grade_detection,
    "ocr": grade_ocr,
}

SAMPLE_GRADERS: dict[str, Grader] = {**ACCURACY_GRADERS, "format": grade_format}


def overlong_penalty(lengths: Sequence[float] | np.ndarray, max_length: int, buffer: int) -> np.ndarray:
    """DAPO soft overlong penalty per response length (tokens): 0 up to `max_length - buffer`, then
    linear down to -1 at `max_length`, and -1 beyond. `buffer = 0` gives a hard step at
    `max_length`. Raises ValueError on bad parameters (a configuration error, not a model output)."""
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
        raise ValueError(f"overlong: max_response_length must be an int >= 1, got {max_length!r}")
    if isinstance(buffer, bool) or not isinstance(buffer, (int, np.integer)) or not 0 <= buffer <= max_length:
        raise ValueError(f"overlong: overlong_buffer must be an int in [0, max_response_length={max_length}], "
                         f"got {buffer!r}")
    n = np.asarray(lengths, dtype=np.float64)
    if n.ndim != 1:
        raise ValueError(f"overlong: response_lengths must be 1-D, got shape {n.shape}")
    start = max_length - buffer
    ramp = (start - n) / buffer if buffer > 0 else np.zeros_like(n)
    out = np.where(n <= start, 0.0, np.where(n <= max_length, ramp, -1.0))
    return out.astype(np.float32)

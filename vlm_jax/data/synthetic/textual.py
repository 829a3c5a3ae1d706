"""Textual reasoning tasks (no image): arithmetic and templated word problems.

Difficulty (1..5) sets the number of steps and the size of the numbers. Solutions show every step
("4 * 2 = 8. 3 + 8 = 11.") so a tiny model can learn the procedure, not just the answer.
"""
from __future__ import annotations

import numpy as np

from vlm_jax.data.synthetic.common import Draft, Resample, number_distractors

NAMES: tuple[str, ...] = ("Tom", "Ann", "Sam", "Mia", "Ben", "Lily")
ITEMS: tuple[str, ...] = ("apples", "pens", "cups", "books", "eggs", "cards", "balls")
_GAIN = ("buys {b} more {noun}", "finds {b} more {noun}", "gets {b} more {noun}")
_LOSS = ("gives {b} {noun} to {other}", "loses {b} {noun}", "sells {b} {noun}")
_BOXES = "buys {b} boxes of {c} {item}"


def _noun(n: int, item: str) -> str:
    """"apple" for one, "apples" otherwise (every item is a regular plural)."""
    return item[:-1] if n == 1 else item


def evaluate_steps(numbers: list[int], ops: list[str]) -> tuple[int, list[str]]:
    """Value of ``n0 op0 n1 op1 ...`` with * before + and -, and the steps as "a op b = c" strings."""
    if len(numbers) != len(ops) + 1 or any(op not in "+-*" for op in ops):
        raise ValueError(f"bad expression: numbers={numbers} ops={ops}")
    nums, pending, steps = [numbers[0]], [], []
    for op, n in zip(ops, numbers[1:]):
        if op == "*":
            value = nums[-1] * n
            steps.append(f"{nums[-1]} * {n} = {value}")
            nums[-1] = value
        else:
            pending.append(op)
            nums.append(n)
    value = nums[0]
    for op, n in zip(pending, nums[1:]):
        new = value + n if op == "+" else value - n
        steps.append(f"{value} {op} {n} = {new}")
        value = new
    return value, steps


def build_arithmetic(rng: np.random.Generator, difficulty: int, side: int, multiple_choice: bool) -> Draft:
    """``a op b op c`` (two operations; three from difficulty 4) with + - *, result >= 0."""
    n_ops = 2 if difficulty <= 3 else 3
    top = (9, 12, 20, 20, 50)[difficulty - 1]
    ops = [str(rng.choice(["+", "-", "*"])) for _ in range(n_ops)]
    numbers = [int(rng.integers(1, top + 1))]
    for op in ops:
        numbers.append(int(rng.integers(2, 10)) if op == "*" else int(rng.integers(1, top + 1)))
    for i, op in enumerate(ops):  # keep products small: both factors of a * are single digits
        if op == "*" and numbers[i] > 9:
            numbers[i] = int(rng.integers(2, 10))
    value, steps = evaluate_steps(numbers, ops)
    if value < 0:
        raise Resample("negative result")
    expr = " ".join([str(numbers[0])] + [f"{op} {n}" for op, n in zip(ops, numbers[1:])])
    return Draft(
        question=f"What is {expr}?",
        answer=str(value),
        reasoning=" ".join(f"{s}." for s in steps),
        answer_type="number",
        distractors=number_distractors(value),
    )


def build_word_problem(rng: np.random.Generator, difficulty: int, side: int, multiple_choice: bool) -> Draft:
    """"Tom has 3 apples. Tom buys 4 more apples. ..." with 1 (easy) to 3 (hard) steps."""
    n_steps = (1, 1, 2, 2, 3)[difficulty - 1]
    top = (9, 9, 12, 15, 20)[difficulty - 1]
    i, j = rng.choice(len(NAMES), size=2, replace=False)
    name, other = NAMES[i], NAMES[j]
    item = ITEMS[rng.integers(len(ITEMS))]
    count = int(rng.integers(1, top + 1))
    sentences = [f"{name} has {count} {_noun(count, item)}."]
    steps = [f"{name} starts with {count}."]
    for _ in range(n_steps):
        kind = ("gain", "loss", "boxes")[rng.integers(3 if difficulty >= 3 else 2)]
        if kind == "loss" and count < 2:
            kind = "gain"
        if kind == "gain":
            b = int(rng.integers(1, top + 1))
            sentences.append(_GAIN[rng.integers(len(_GAIN))].format(b=b, noun=_noun(b, item)))
            steps.append(f"{count} + {b} = {count + b}.")
            count += b
        elif kind == "loss":
            b = int(rng.integers(1, count + 1))
            sentences.append(_LOSS[rng.integers(len(_LOSS))].format(b=b, noun=_noun(b, item), other=other))
            steps.append(f"{count} - {b} = {count - b}.")
            count -= b
        else:
            b, c = int(rng.integers(2, 6)), int(rng.integers(2, 6))
            sentences.append(_BOXES.format(b=b, c=c, item=item))
            steps.append(f"{b} * {c} = {b * c}. {count} + {b * c} = {count + b * c}.")
            count += b * c
    text = " ".join([sentences[0]] + [f"Then {name} {s}." for s in sentences[1:]])
    return Draft(
        question=f"{text} How many {item} does {name} have now?",
        answer=str(count),
        reasoning=" ".join(steps),
        answer_type="number",
        distractors=number_distractors(count),
    )


BUILDERS = {
    "arithmetic": build_arithmetic,
    "word_problem": build_word_problem,
}

"""Verifiable rewards: hand-computed values per grader, answer extraction, user rewards, combination,
and a property test that no builtin raises (or even hits its error path) on any model output."""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_jax.rl import rewards
from vlm_jax.rl.rewards import extract_answer, get, grade


@pytest.fixture(autouse=True)
def _fresh_error_counters():
    rewards.reset_reward_errors()
    yield
    rewards.reset_reward_errors()


def boxed(answer: str) -> str:
    return f"<think>reasoning</think> The answer is \\boxed{{{answer}}}."


# ----------------------------------------------------------------------------- extraction

@pytest.mark.parametrize("text, expected", [
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"first \boxed{1} then \boxed{ 2 } end", "2"),
    (r"\boxed{\boxed{3}}", "3"),
    (r"\boxed{a{b}{c{d}}e}", "a{b}{c{d}}e"),
    (r"\boxed{5} then truncated \boxed{", "5"),
    (r"\boxed{4} and \boxed{a{b}", "4"),
    (r"\boxed{}", ""),
    ("<answer> 7 </answer>", "7"),
    ("<answer>7</answer> <answer>8</answer>", "8"),
    ("<answer>7</answer> <answer>8", "7"),
    (r"<answer>7</answer> \boxed{9}", "9"),
    ("no answer here", None),
    (r"\boxed{unclosed", None),
    ("<answer>unclosed", None),
    ("}}}{{{", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ----------------------------------------------------------------------------- accuracy graders

@pytest.mark.parametrize("pred, ref, expected", [
    (r"\frac{1}{2}", "0.5", 1.0),
    ("0.5", r"\frac{1}{2}", 1.0),
    ("2.0", "2", 1.0),
    ("1+x", "x+1", 1.0),
    (r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2", 1.0),
    ("3", "4", 0.0),
    ("x+2", "x+1", 0.0),
    ("9**9**9", "x+1/2", 0.0),          # exponent tower: refused, not evaluated
    ("(10^9)!", "x+1/2", 0.0),
    ("1" * 201, "1" * 201, 0.0),        # overlong answer scores 0 even when identical
])
def test_math(pred, ref, expected):
    assert grade("math", boxed(pred), ref) == expected


def test_math_without_boxed_answer_scores_zero():
    assert grade("math", "the answer is 0.5", "0.5") == 0.0


def test_math_in_worker_thread_uses_mathruler_only():
    with ThreadPoolExecutor(2) as pool:
        scores = list(pool.map(lambda p: grade("math", boxed(p), "0.5"), [r"\frac{1}{2}", "0.4"]))
    assert scores == [1.0, 0.0]
    assert rewards.reward_errors() == {}


@pytest.mark.parametrize("answer, expected", [
    ("B", 1.0), ("(b)", 1.0), ("B.", 1.0), ("B) a red car", 1.0), ("B: a red car", 1.0),
    (r"\text{B}", 1.0), ("(B) two", 1.0), ("C", 0.0), ("Bus", 0.0), ("", 0.0), ("BB", 0.0),
])
def test_mcq(answer, expected):
    assert grade("mcq", boxed(answer), "B") == expected
    assert grade("mcq", boxed(answer), "(B)") == expected


def test_mcq_boxed_letter_inside_answer_tag():
    assert grade("mcq", r"<answer>\boxed{D}</answer>", "D") == 1.0


@pytest.mark.parametrize("pred, ref, expected", [
    ("7.0", "7", 1.0), ("7", "7.0", 1.0), ("1,000", "1000", 1.0), ("1000", "1,000", 1.0),
    ("$12$", "12", 1.0), ("-3.5", "-3.5", 1.0), ("1e3", "1000", 1.0),
    ("1000.0009", "1000", 1.0),        # relative error 9e-7 <= 1e-6
    ("1000.002", "1000", 0.0),         # relative error 2e-6
    ("7", "8", 0.0), ("seven", "7", 0.0), ("1e999", "1e999", 0.0), ("nan", "nan", 0.0),
    ("1,00", "100", 0.0), ("0", "0", 1.0),
])
def test_number(pred, ref, expected):
    assert grade("number", boxed(pred), ref) == expected


@pytest.mark.parametrize("pred, ref, expected", [
    ("Yes", "yes", 1.0), ("NO.", "no", 1.0), ("yes, because", "Yes", 1.0), ("no", "yes", 0.0),
    ("none", "no", 0.0), ("yesterday", "yes", 0.0), ("maybe", "no", 0.0),
])
def test_yes_no(pred, ref, expected):
    assert grade("yes_no", boxed(pred), ref) == expected


def test_iou_hand_values():
    # Overlap 5x5 = 25; union 100 + 100 - 25 = 175.
    assert grade("iou", boxed("[0, 0, 10, 10]"), "[5, 5, 15, 15]") == pytest.approx(25 / 175)
    assert grade("iou", boxed("[0,0,10,10]"), [0, 0, 10, 10]) == pytest.approx(1.0)
    assert grade("iou", boxed("box (0, 0, 10, 10) then [5,5,15,15]"), "[0,0,10,10]") == pytest.approx(1.0)
    assert grade("iou", boxed("[0, 0, 10, 10]"), "[20, 20, 30, 30]") == 0.0


@pytest.mark.parametrize("pred", ["[10, 10, 0, 0]", "[0, 0, 0, 10]", "[0, 0, 10]", "no box", "[0,0,1e999,5]"])
def test_iou_invalid_boxes_score_zero(pred):
    assert grade("iou", boxed(pred), "[0, 0, 10, 10]") == 0.0
    assert grade("giou", boxed(pred), "[0, 0, 10, 10]") == 0.0


def test_giou_hand_values():
    # Disjoint side by side: IoU 0, hull 30x10 = 300, union 200 -> GIoU = -100/300; mapped (1 - 1/3)/2.
    assert grade("giou", boxed("[20, 0, 30, 10]"), "[0, 0, 10, 10]") == pytest.approx(1 / 3)
    # Overlapping: IoU 1/7, hull 225, union 175 -> GIoU = 1/7 - 50/225 = -5/63; mapped 29/63.
    assert grade("giou", boxed("[5, 5, 15, 15]"), "[0, 0, 10, 10]") == pytest.approx(29 / 63)
    assert grade("giou", boxed("[0, 0, 10, 10]"), "[0, 0, 10, 10]") == pytest.approx(1.0)


def test_detection_hand_values():
    gt = "[[0, 0, 10, 10], [20, 20, 30, 30]]"
    # p1 = gt1 (IoU 1); p2 covers 8/10 of gt2 (IoU 80/100 = 0.8); p3 matches nothing -> (1 + 0.8) / 3.
    pred = "[[20, 20, 30, 28], [0, 0, 10, 10], [50, 50, 60, 60]]"
    assert grade("detection", boxed(pred), gt) == pytest.approx(1.8 / 3)
    # p2 at IoU 0.4 is below the 0.5 threshold: only p1 counts -> 1 / 2.
    assert grade("detection", boxed("[[0,0,10,10],[20,20,30,24]]"), gt) == pytest.approx(0.5)
    # Greedy takes the best pair first: both preds overlap gt1; the exact one wins, the other is unmatched.
    assert grade("detection", boxed("[[0,0,10,9],[0,0,10,10]]"), [[0, 0, 10, 10]]) == pytest.approx(0.5)
    assert grade("detection", boxed("[]"), "[]") == 1.0
    assert grade("detection", boxed("[]"), gt) == 0.0
    assert grade("detection", "no answer", "[]") == 0.0


def test_ocr_anls():
    assert grade("ocr", boxed("Hello   WORLD"), "hello world") == pytest.approx(1.0)
    # One deletion over max length 11.
    assert grade("ocr", boxed("helo world"), "hello world") == pytest.approx(10 / 11)
    # Similarity exactly 0.5 is kept; below 0.5 is 0.
    assert grade("ocr", boxed("ab"), "ax") == pytest.approx(0.5)
    assert grade("ocr", boxed("abc"), "axy") == 0.0
    assert grade("ocr", boxed("stop"), ["exit", "STOP"]) == pytest.approx(1.0)
    assert rewards.anls("a" * 10_000, "a") == 0.0


PAPER_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)


@pytest.mark.parametrize("response, expected", [
    (r"<think>x</think> \boxed{1}", 1.0),
    ("  <think>\nmulti\nline</think>\nso \\boxed{1} done \n", 1.0),
    (r"<think></think>\boxed{}", 1.0),
    (r"\boxed{1}", 0.0),
    (r"<think>x \boxed{1}</think>", 0.0),
    (r"text <think>x</think> \boxed{1}", 0.0),
    (r"<think>x</think> \boxed{1", 0.0),
])
def test_format(response, expected):
    assert grade("format", response, "") == expected
    assert float(PAPER_FORMAT.fullmatch(response.strip()) is not None) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["<think>", "</think>", "\\boxed{", "}", "{", "x", " ", "\n"]), max_size=12))
def test_format_matches_paper_regex(parts):
    response = "".join(parts)
    expected = float(PAPER_FORMAT.fullmatch(response.strip()) is not None)
    assert get("format")([response], [""])[0] == expected


def test_overlong_boundaries():
    lengths = [0, 80, 90, 100, 101, 5000]
    out = get("overlong")(["r"] * 6, ["a"] * 6, response_lengths=lengths, max_response_length=100,
                          overlong_buffer=20)
    np.testing.assert_allclose(out, [0.0, 0.0, -0.5, -1.0, -1.0, -1.0])
    assert out.dtype == np.float32
    hard = get("overlong")(["r"] * 2, ["a"] * 2, response_lengths=[100, 101], max_response_length=100,
                           overlong_buffer=0)
    np.testing.assert_allclose(hard, [0.0, -1.0])
    # Defaults: 2048 tokens, buffer 512 -> the ramp starts at 1536; 1792 is halfway down.
    np.testing.assert_allclose(get("overlong")(["r"], ["a"], response_lengths=[2048]), [-1.0])
    np.testing.assert_allclose(get("overlong")(["r"], ["a"], response_lengths=[1792]), [-0.5])


def test_overlong_misuse_raises():
    with pytest.raises(ValueError, match="response_lengths"):
        get("overlong")(["r"], ["a"])
    with pytest.raises(ValueError, match="overlong_buffer"):
        get("overlong")(["r"], ["a"], response_lengths=[1], max_response_length=10, overlong_buffer=11)
    with pytest.raises(ValueError, match="one entry per response"):
        get("overlong")(["r", "s"], ["a", "b"], response_lengths=[1])
    with pytest.raises(ValueError, match="overlong"):
        grade("overlong", "r", "a")


# ----------------------------------------------------------------------------- registry

def test_builtin_batch_contract():
    fn = get("math")
    out = fn([boxed("2"), boxed("3"), "no box"], ["2", "2", "2"], unrelated_field=[1, 2, 3])
    assert out.dtype == np.float32 and out.shape == (3,)
    np.testing.assert_array_equal(out, [1.0, 0.0, 0.0])
    assert get("math")([], []).shape == (0,)
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        fn(["a", "b"], ["a"])


def test_unknown_builtin_lists_valid_names():
    with pytest.raises(ValueError, match="unknown reward 'accuracy'.*'math'.*'ocr'"):
        get("accuracy")
    with pytest.raises(ValueError, match="path/to/file.py:function"):
        get("reward.txt:fn")


def test_auto_dispatches_on_answer_type():
    responses = [boxed("0.5"), boxed("(B)"), boxed("[0,0,10,10]"), boxed("1/2"), boxed("7")]
    answers = [r"\frac{1}{2}", "B", "[5,5,15,15]", "0.5", "7"]
    types = ["math", "mcq", "iou", None, "number"]
    out = get("auto")(responses, answers, answer_type=types)
    np.testing.assert_allclose(out, [1.0, 1.0, 25 / 175, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(get("auto")(responses[:1], answers[:1]), [1.0])  # no field -> math
    with pytest.raises(ValueError, match=r"row 1 has unknown answer_type 'essay'"):
        get("auto")(responses[:2], answers[:2], answer_type=["math", "essay"])


# ----------------------------------------------------------------------------- user rewards

USER_REWARDS = '''
import math

def length_bonus(responses, answers, **fields):
    return [len(r) / 10 + fields.get("offset", 0) for r in responses]

def picky(responses, answers, **fields):
    if any("bad" in r for r in responses):
        raise RuntimeError("cannot grade " + repr(responses))
    return [1.0] * len(responses)

def wrong_length(responses, answers, **fields):
    return [1.0]

def non_finite(responses, answers, **fields):
    return [math.nan if r == "nan" else 2.0 for r in responses]

def uses_fields(responses, answers, *, answer_type, scale, **fields):
    assert len(answer_type) == len(responses)
    if len(responses) > 1:
        raise ValueError("batch path broken")
    return [scale * (answer_type[0] == "x")]

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def test_user_reward_good(user_file):
    fn = get(f"{user_file}:length_bonus")
    out = fn(["abcde", "ab"], ["", ""], offset=1)
    np.testing.assert_allclose(out, [1.5, 1.2], rtol=1e-6)
    assert out.dtype == np.float32 and fn.error_count == 0


def test_user_reward_raising_scores_only_failing_samples_and_logs_once(user_file, caplog):
    name = f"{user_file}:picky"
    fn = get(name)
    with caplog.at_level(logging.WARNING, logger="vlm_jax.rl.rewards.registry"):
        out = fn(["ok", "bad one", "fine", "bad two"], list("abcd"))
        out2 = fn(["bad again"], ["a"])
    np.testing.assert_array_equal(out, [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(out2, [0.0])
    assert fn.error_count == 3 and rewards.reward_errors() == {name: 3}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "bad one" in warnings[0].getMessage() and "RuntimeError" in warnings[0].getMessage()


def test_user_reward_wrong_length_and_non_finite(user_file):
    wrong = get(f"{user_file}:wrong_length")
    np.testing.assert_array_equal(wrong(["a", "b", "c"], ["", "", ""]), [0.0, 0.0, 0.0])
    assert wrong.error_count == 3
    nonfinite = get(f"{user_file}:non_finite")
    np.testing.assert_array_equal(nonfinite(["x", "nan", "y"], ["", "", ""]), [2.0, 0.0, 2.0])
    assert nonfinite.error_count == 1


def test_user_reward_per_sample_retry_slices_per_example_fields(user_file):
    fn = get(f"{user_file}:uses_fields")
    out = fn(["a", "b", "c"], ["", "", ""], answer_type=["x", "y", "x"], scale=2.0)
    np.testing.assert_array_equal(out, [2.0, 0.0, 2.0])
    assert fn.error_count == 0


def test_user_reward_long_sample_is_truncated_in_log(user_file, caplog):
    with caplog.at_level(logging.WARNING, logger="vlm_jax.rl.rewards.registry"):
        get(f"{user_file}:picky")(["bad" + "z" * 10_000], [""])
    (record,) = caplog.records
    assert len(record.getMessage()) < 2_000 and "chars]" in record.getMessage()


def test_user_reward_load_errors(user_file, tmp_path):
    with pytest.raises(ValueError, match="missing.py.*not found"):
        get(f"{tmp_path}/missing.py:fn")
    with pytest.raises(ValueError, match="no function 'nope'.*length_bonus"):
        get(f"{user_file}:nope")
    with pytest.raises(ValueError, match="no function 'NOT_A_FUNCTION'"):
        get(f"{user_file}:NOT_A_FUNCTION")
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_real_module_xyz\n")
    with pytest.raises(ValueError, match="broken.py.*failed.*ModuleNotFoundError"):
        get(f"{broken}:fn")


# ----------------------------------------------------------------------------- combination

def test_default_spec_combines_accuracy_and_format():
    assert dict(rewards.DEFAULT_SPEC) == {"math": 0.9, "format": 0.1}
    combined = rewards.build_reward(rewards.DEFAULT_SPEC)
    responses = [boxed("2"), r"\boxed{2}", boxed("3"), "nothing"]
    total, components = combined(responses, ["2"] * 4)
    np.testing.assert_allclose(components["math"], [1, 1, 0, 0])
    np.testing.assert_allclose(components["format"], [1, 0, 1, 0])
    np.testing.assert_allclose(total, [1.0, 0.9, 0.1, 0.0], rtol=1e-6)
    assert total.dtype == np.float32 and set(components) == {"math", "format"}


def test_combined_with_auto_overlong_and_user_reward(user_file):
    spec = [("auto", 0.9), ("format", 0.1), ("overlong", 1.0), (f"{user_file}:length_bonus", 0.5)]
    combined = rewards.build_reward(spec)
    responses = [boxed("B"), boxed("yes")]
    total, components = combined(responses, ["B", "no"], answer_type=["mcq", "yes_no"],
                                 response_lengths=[10, 95], max_response_length=100, overlong_buffer=10)
    assert combined.names == ("auto", "format", "overlong", f"{user_file}:length_bonus")
    np.testing.assert_allclose(components["auto"], [1, 0])
    np.testing.assert_allclose(components["overlong"], [0, -0.5])
    bonus = np.array([len(r) / 10 for r in responses])
    np.testing.assert_allclose(total, [0.9 + 0.1, 0.1 - 0.5] + 0.5 * bonus, rtol=1e-6)


@pytest.mark.parametrize("spec, match", [
    ({}, "empty"),
    ({"math": float("nan")}, "finite"),
    ({"math": True}, "finite"),
    ({"math": "0.9"}, "finite"),
    ([("math", 0.5), ("math", 0.5)], "twice"),
    ({"accuracy": 1.0}, "unknown reward 'accuracy'"),
])
def test_build_reward_rejects_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        rewards.build_reward(spec)


# ----------------------------------------------------------------------------- never raise

ADVERSARIAL = [
    "", " ", "\\boxed{", "\\boxed{}", "\\boxed{{{", "}}}\\boxed{1}}}", "\\boxed{\\boxed{\\boxed{7}}}",
    "<answer>", "<answer></answer>", "</answer><answer>", "<think>", "</think><think>",
    "\\boxed{1e999}", "\\boxed{-1e999}", "\\boxed{nan}", "\\boxed{inf}", "\\boxed{" + "9" * 5000 + "}",
    "\\boxed{9**9**9}", "\\boxed{10^{10^{10}}}", "\\boxed{(10^9)!}", "\\boxed{\\frac{1}{0}}",
    "\\boxed{[0,0,0,0]}", "\\boxed{[10,10,0,0]}", "\\boxed{[-5,-5,-1,-1]}",
    "\\boxed{[1e308,1e308,-1e308,1e309]}", "\\boxed{[-1e308,-1e308,1e308,1e308]}",
    "\\boxed{[[0,0,1,1]," * 50, "\\boxed{\x00\ud7ff\U0001f600}", "é漢字🙂 \\boxed{é}", "\\boxed{(}", "\\boxed{\\}",
    "\\boxed{" * 20_000, "<answer>" * 20_000, "<think>" + "</think>" * 20_000, "[" + "1" * 50_000,
    "{" * 50_000 + "}" * 10, "\\boxed{[" + "1," * 20_000 + "]}", "x" * 200_000,
]
FRAGMENTS = st.sampled_from([
    "\\boxed{", "{", "}", "<think>", "</think>", "<answer>", "</answer>", "[", "]", "(", ")", ",", "1e999",
    "nan", "-5", "0", "0.5", "(B)", "B", "yes", "No", "\\frac{1}{2}", "^", "**", "!", "x", "\\", "$", " ",
])
RESPONSES = st.one_of(st.text(max_size=40), st.lists(st.one_of(FRAGMENTS, st.text(max_size=4)), max_size=15)
                      .map("".join), st.sampled_from(ADVERSARIAL))
ANSWERS = st.one_of(st.sampled_from(["2", "B", "(C)", "yes", "[0, 0, 10, 10]", "[[0,0,5,5],[5,5,9,9]]",
                                     "hello", r"\frac{1}{2}", "", "1e999"]), st.text(max_size=10))
SAMPLE_REWARDS = [n for n in rewards.BUILTIN_NAMES if n not in ("auto", "overlong")]


@settings(max_examples=200, deadline=None)
@given(responses=st.lists(RESPONSES, min_size=1, max_size=3), answer=ANSWERS,
       kind=st.sampled_from(sorted(rewards.ACCURACY_GRADERS)))
def test_no_builtin_raises_or_fails_on_any_output(responses, answer, kind):
    answers = [answer] * len(responses)
    for name in SAMPLE_REWARDS:
        out = get(name)(responses, answers)
        assert out.shape == (len(responses),) and out.dtype == np.float32
        assert np.all(np.isfinite(out)) and np.all((out >= 0) & (out <= 1)), (name, out)
    auto = get("auto")(responses, answers, answer_type=[kind] * len(responses))
    assert np.all((auto >= 0) & (auto <= 1))
    assert rewards.reward_errors() == {}  # no grader even reached the catch-all error path


def test_adversarial_strings_each_builtin():
    answers = ["[0,0,10,10]"] * len(ADVERSARIAL)
    for name in SAMPLE_REWARDS:
        out = get(name)(ADVERSARIAL, answers)
        assert out.shape == (len(ADVERSARIAL),) and np.all(np.isfinite(out)), name
    assert rewards.reward_errors() == {}

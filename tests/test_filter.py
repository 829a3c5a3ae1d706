"""`vlm_jax.filter`: the perception rule's truth tables, the drivers over fake policies with known
answers, answer parsing, argument checks, and one end-to-end CLI run on the tiny model."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from vlm_jax import filter as flt
from vlm_jax.filter import (CAPTION_UNUSABLE, CAPTION_WRONG, IMAGE_CORRECT, IMAGE_UNANSWERED, IMAGE_UNUSABLE,
                            KEPT, MISSING_CAPTION, Outcome, Rule)

T, F = True, False
STRICT = Rule()


# ------------------------------------------------------------------------------------------------
# decide: hand-made truth tables
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule, image_correct, image_answered, caption_correct, expected", [
    # paper rule: every image run answered and wrong, every caption run right
    (STRICT, [F], [T], [T], (T, KEPT)),
    (STRICT, [T], [T], [T], (F, IMAGE_CORRECT)),
    (STRICT, [F], [F], [T], (F, IMAGE_UNANSWERED)),          # empty answer is not "wrong"
    (STRICT, [F], [T], [F], (F, CAPTION_WRONG)),
    (STRICT, [T], [T], [F], (F, IMAGE_CORRECT)),             # image check reported first
    (STRICT, [F, F, F], [T, T, T], [T, T, T], (T, KEPT)),
    (STRICT, [F, F, T], [T, T, T], [T, T, T], (F, IMAGE_CORRECT)),
    (STRICT, [F, F, F], [T, F, T], [T, T, T], (F, IMAGE_UNANSWERED)),
    (STRICT, [F, F, F], [T, T, T], [T, F, T], (F, CAPTION_WRONG)),
    # any / any
    (Rule("any", "any"), [T, F], [T, T], [F, T], (T, KEPT)),
    (Rule("any", "any"), [T, F], [T, F], [T, T], (F, IMAGE_CORRECT)),   # the only wrong run is empty
    (Rule("any", "any"), [F, F], [F, F], [T, T], (F, IMAGE_UNANSWERED)),
    (Rule("any", "any"), [F, F], [T, T], [F, F], (F, CAPTION_WRONG)),
    (Rule("all", "any"), [F, F], [T, T], [F, T], (T, KEPT)),
    (Rule("any", "all"), [F, T], [T, T], [F, T], (F, CAPTION_WRONG)),
    # one condition ignored (its arrays may be None)
    (Rule("ignore", "all"), None, None, [T, T], (T, KEPT)),
    (Rule("ignore", "all"), None, None, [T, F], (F, CAPTION_WRONG)),
    (Rule("all", "ignore"), [F], [T], None, (T, KEPT)),
    (Rule("all", "ignore"), [T], [T], None, (F, IMAGE_CORRECT)),
    # unanswered counted as wrong
    (Rule(unanswered_is_wrong=True), [F], [F], [T], (T, KEPT)),
    (Rule(unanswered_is_wrong=True), [T, F], [T, F], [T, T], (F, IMAGE_CORRECT)),
    (Rule("any", "all", True), [T, F], [T, F], [T], (T, KEPT)),
])
def test_decide_truth_table(rule, image_correct, image_answered, caption_correct, expected):
  assert flt.decide(image_correct, image_answered, caption_correct, rule) == expected


def test_decide_rejects_bad_input():
  with pytest.raises(ValueError, match="image_correct has 2 runs but image_answered 1"):
    flt.decide([F, F], [T], [T], STRICT)
  with pytest.raises(ValueError, match="caption_correct must be a non-empty 1-D"):
    flt.decide([F], [T], None, STRICT)
  with pytest.raises(ValueError, match="image_correct must be a non-empty 1-D"):
    flt.decide([], [], [T], STRICT)
  with pytest.raises(ValueError, match="both 'ignore'"):
    Rule("ignore", "ignore")
  with pytest.raises(ValueError, match="image_wrong must be one of"):
    Rule("most", "all")


# ------------------------------------------------------------------------------------------------
# drivers over a fake policy with known answers
# ------------------------------------------------------------------------------------------------


class FakePolicy:
  """Answers from a table: problem -> {text_only: (correct, answered)} (a missing entry: None)."""

  def __init__(self, table):
    self.table = table
    self.calls: list[tuple[list[str], bool, int]] = []

  def __call__(self, rows, text_only, num_samples):
    problems = [rows[i]["problem"] for i in range(len(rows))]
    self.calls.append((problems, text_only, num_samples))
    out = []
    for p in problems:
      entry = self.table[p].get(text_only)
      out.append(None if entry is None else Outcome(np.asarray(entry[0], bool), np.asarray(entry[1], bool)))
    return out


def _row(problem, caption="a caption", images=(b"png",)):
  return {"problem": problem, "answer": "A", "images": list(images), "caption": caption}


# problem -> (image runs, caption runs) with K = 2; each (correct, answered)
TABLE = {
    "wrong_then_right": {F: ([F, F], [T, T]), T: ([T, T], [T, T])},   # kept by the paper rule
    "image_right": {F: ([T, F], [T, T]), T: ([T, T], [T, T])},
    "image_empty": {F: ([F, F], [T, F]), T: ([T, T], [T, T])},
    "caption_half": {F: ([F, F], [T, T]), T: ([T, F], [T, T])},
    "no_caption": {F: ([F, F], [T, T])},
    "image_unusable": {T: ([T, T], [T, T])},
    "caption_unusable": {F: ([F, F], [T, T])},
    "text_row": {F: ([F, F], [T, T]), T: ([T, T], [T, T])},
}


def _rows():
  rows = [_row(p) for p in TABLE]
  rows[4]["caption"] = "  "
  rows[7] = _row("text_row", caption="", images=())  # no image: its caption prompt is the question
  return rows


def test_filter_perception_strict_reasons_and_calls():
  policy = FakePolicy(TABLE)
  reasons = flt.filter_perception(_rows(), policy, rule=STRICT, k=2)
  assert reasons == [KEPT, IMAGE_CORRECT, IMAGE_UNANSWERED, CAPTION_WRONG, MISSING_CAPTION, IMAGE_UNUSABLE,
                     CAPTION_UNUSABLE, KEPT]
  (image_rows, image_text_only, k1), (caption_rows, caption_text_only, k2) = policy.calls
  assert (image_text_only, caption_text_only, k1, k2) == (F, T, 2, 2)
  assert image_rows == list(TABLE)
  # caption runs only for rows that passed the image check and have a caption (or no image)
  assert caption_rows == ["wrong_then_right", "caption_half", "caption_unusable", "text_row"]


def test_filter_perception_other_rules():
  rows = _rows()
  any_any = flt.filter_perception(rows, FakePolicy(TABLE), rule=Rule("any", "any"), k=2)
  assert any_any == [KEPT, KEPT, KEPT, KEPT, MISSING_CAPTION, IMAGE_UNUSABLE, CAPTION_UNUSABLE, KEPT]
  policy = FakePolicy(TABLE)
  image_only = flt.filter_perception(rows, policy, rule=Rule("all", "ignore"), k=2)
  assert image_only == [KEPT, IMAGE_CORRECT, IMAGE_UNANSWERED, KEPT, KEPT, IMAGE_UNUSABLE, KEPT, KEPT]
  assert [c[1] for c in policy.calls] == [F]  # no caption runs at all
  policy = FakePolicy({p: {T: e.get(T, ([F, F], [F, F]))} for p, e in TABLE.items()})
  caption_only = flt.filter_perception(rows, policy, rule=Rule("ignore", "all"), k=2)
  assert caption_only == [KEPT, KEPT, KEPT, CAPTION_WRONG, MISSING_CAPTION, KEPT, CAPTION_WRONG, KEPT]
  assert [c[1] for c in policy.calls] == [T]


def test_filter_perception_rejects_bad_policy_output():
  with pytest.raises(ValueError, match="policy returned 1 outcomes for 2 rows"):
    flt.filter_perception([_row("a"), _row("b")], lambda rows, t, k: [None], rule=STRICT)
  bad = lambda rows, t, k: [Outcome(np.zeros(3, bool), np.zeros(3, bool))] * len(rows)
  with pytest.raises(ValueError, match=r"row 0 has shapes \(3,\) / \(3,\), expected \(2,\)"):
    flt.filter_perception([_row("a")], bad, rule=STRICT, k=2)
  with pytest.raises(ValueError, match="k must be >= 1"):
    flt.filter_perception([_row("a")], bad, rule=STRICT, k=0)


def test_score_pass_rate_is_the_share_correct():
  table = {"a": {F: ([T, T, T, F], [T] * 4)}, "b": {F: ([F] * 4, [F] * 4)}, "c": {F: ([T] * 4, [T] * 4)},
           "d": {}, "e": {F: ([F, T, F, F], [T] * 4)}}
  policy = FakePolicy(table)
  rates = flt.score_pass_rate([_row(p) for p in table], policy, num_samples=4)
  assert rates == [0.75, 0.0, 1.0, -1.0, 0.25]
  assert policy.calls[0][1:] == (F, 4)


# ------------------------------------------------------------------------------------------------
# answer parsing and grading glue
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, answer_type, expected", [
    ("\\boxed{B}", "mcq", T), ("(C)", "mcq", F), ("\\boxed{cat}", "mcq", F), ("\\boxed{}", "mcq", F),
    ("B", "mcq", F), ("<answer>(d)</answer>", "mcq", T), ("\\boxed{yes}", "yes_no", T),
    ("\\boxed{maybe}", "yes_no", F), ("\\boxed{3}", "number", T), ("\\boxed{three}", "number", F),
    ("\\boxed{[1, 2, 3, 4]}", "iou", T), ("\\boxed{box}", "iou", F), ("\\boxed{red}", "math", T),
    ("\\boxed{red}", "", T), ("nothing", "math", F), ("\\boxed{ }", "ocr", F),
])
def test_is_answered(text, answer_type, expected):
  assert flt.is_answered(text, answer_type) is expected


def test_outcomes_from_grades_groups_prompt_major():
  texts = ["\\boxed{A}", "\\boxed{B}", "x", "\\boxed{4}", "\\boxed{5}", "\\boxed{no}"]
  out = flt.outcomes_from_grades([1.0, 0.0, 0.0, 0.7, 0.2, 0.0], texts, ["mcq", "number"], 3, 0.5)
  np.testing.assert_array_equal(out[0].correct, [T, F, F])
  np.testing.assert_array_equal(out[0].answered, [T, T, F])
  np.testing.assert_array_equal(out[1].correct, [T, F, F])
  np.testing.assert_array_equal(out[1].answered, [T, T, F])
  with pytest.raises(ValueError, match="5 scores / 6 texts for 2 prompts x 3 samples"):
    flt.outcomes_from_grades([0.0] * 5, texts, ["mcq", "number"], 3, 0.5)


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------


def _args(*argv):
  base = ["--model", "m", "--data", "d", "--out", "o"]
  return flt.resolve_args(flt._parser().parse_args(base + list(argv)))


def test_resolve_args_defaults_per_mode():
  a = _args("--mode", "perception")
  assert (a.k, a.temperature, a.max_new_tokens, a.rule) == (1, 0.0, 8, Rule("all", "all", False))
  assert a.instruction == flt.SHORT_ANSWER_INSTRUCTION
  b = _args("--mode", "pass_rate")
  assert (b.num_samples, b.temperature, b.max_new_tokens) == (16, 0.7, 2048)
  c = _args("--mode", "perception", "--image_wrong", "any", "--caption_right", "ignore",
            "--count_unanswered_as_wrong", "--k", "3", "--temperature", "1.0")
  assert c.rule == Rule("any", "ignore", True) and c.k == 3


@pytest.mark.parametrize("argv, message", [
    (["--mode", "perception", "--k", "2"], "would all be the same greedy answer"),
    (["--mode", "pass_rate", "--num_samples", "4", "--temperature", "0"], "would all be the same"),
    (["--mode", "perception", "--num_samples", "4"], "--num_samples do(es) not apply to --mode perception"),
    (["--mode", "pass_rate", "--k", "2", "--image_wrong", "any"], "--k, --image_wrong do(es) not apply"),
    (["--mode", "perception", "--image_wrong", "ignore", "--caption_right", "ignore"], "both 'ignore'"),
    (["--mode", "pass_rate", "--batch_size", "0"], "--batch_size must be >= 1"),
    (["--mode", "pass_rate", "--top_p", "1.5"], "--top_p must be in"),
    (["--mode", "pass_rate", "--slots", "-1"], "--slots must be >= 0"),
])
def test_resolve_args_rejects(argv, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    _args(*argv)


def test_small_helpers():
  assert flt.split_of("synth[test[:10]]") == "test"
  assert flt.split_of("synth[validation]") == "validation"
  assert flt.split_of("synth") == "train" and flt.split_of("x/rows.jsonl") == "train"
  assert flt.length_buckets(2048) == (64, 128, 256, 512, 1024, 2048)
  assert flt.length_buckets(300) == (64, 128, 256, 300)
  assert flt.perception_summary([KEPT, CAPTION_WRONG, KEPT, IMAGE_CORRECT, CAPTION_WRONG]) == (
      "kept 2 of 5 rows\n  dropped 2 x caption_wrong\n  dropped 1 x image_correct")


# ------------------------------------------------------------------------------------------------
# end to end on the tiny model
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from vlm_jax.data import synthetic, tfds_builders
  from vlm_jax.models.tiny import build_tiny_model
  root = tmp_path_factory.mktemp("filter")
  model = build_tiny_model(root / "model")
  rows = synthetic.generate("perception", 6, seed=0)
  data_dir = root / "data"
  tfds_builders.write_local_split("synth_in", "train", rows, data_dir)
  return argparse.Namespace(model=str(model), data_dir=str(data_dir), rows=rows)


def _main(setup, *argv):
  return flt.main(["--model", setup.model, "--data_dir", setup.data_dir, "--data", "synth_in[train]",
                   "--batch_size", "8", "--no_progress", *argv])


def _counts(stdout):
  """reason -> count from the printed perception summary."""
  kept_line = next(line for line in stdout.splitlines() if "kept " in line)
  counts = {KEPT: int(kept_line.split("kept ")[1].split()[0])}
  for line in stdout.splitlines():
    if line.strip().startswith("dropped "):
      n, _, reason = line.split()[1:4]
      counts[reason] = int(n)
  return counts


def test_cli_rejects_bad_input(setup, capsys):
  assert _main(setup, "--out", "x", "--mode", "perception", "--data", "nope") == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: unknown dataset 'nope'") and "\n" not in err
  assert _main(setup, "--out", "Bad-Name", "--mode", "pass_rate") == 2
  assert "Bad-Name" in capsys.readouterr().err
  assert _main(setup, "--out", "synth_in", "--mode", "pass_rate") == 2
  assert "is the input dataset" in capsys.readouterr().err
  assert _main(setup, "--out", "x", "--mode", "perception", "--k", "2") == 2
  assert "same greedy answer" in capsys.readouterr().err
  assert _main(setup, "--out", "x", "--out_split", "a/b", "--mode", "pass_rate") == 2
  assert "--out_split 'a/b'" in capsys.readouterr().err
  assert _main(setup, "--out", "x", "--mode", "pass_rate", "--model", setup.data_dir) == 2
  assert "neither a model directory nor a training workdir" in capsys.readouterr().err


def test_cli_perception_end_to_end(setup, capsys):
  from vlm_jax import data
  # A random tiny model never answers correctly (and rarely parses), so with unanswered runs
  # counted as wrong every row passes the image check and fails the caption check.
  assert _main(setup, "--out", "synth_none", "--mode", "perception", "--count_unanswered_as_wrong") == 1
  out = capsys.readouterr()
  assert "no rows kept" in out.err
  assert _counts(out.out) == {KEPT: 0, CAPTION_WRONG: 6}
  # Without the caption check every row is kept and written unchanged.
  assert _main(setup, "--out", "synth_kept", "--mode", "perception", "--count_unanswered_as_wrong",
               "--caption_right", "ignore") == 0
  out = capsys.readouterr().out
  assert _counts(out) == {KEPT: 6} and "wrote synth_kept[train] (6 rows)" in out
  kept = data.load("synth_kept", split="train", data_dir=setup.data_dir)
  assert len(kept) == 6
  for i, row in enumerate(setup.rows):
    assert (kept[i]["problem"], kept[i]["answer"], kept[i]["images"]) == (
        row["problem"], row["answer"], row["images"])
    assert kept[i]["pass_rate"] == -1.0
  # The paper rule: nothing kept (the image runs are either unanswered or wrong, captions wrong).
  assert _main(setup, "--out", "synth_strict", "--mode", "perception") == 1
  counts = _counts(capsys.readouterr().out)
  assert counts[KEPT] == 0 and sum(counts.values()) == 6
  assert set(counts) <= {KEPT, IMAGE_UNANSWERED, CAPTION_WRONG}


def test_cli_pass_rate_end_to_end(setup, capsys):
  from vlm_jax import data
  assert _main(setup, "--out", "synth_scored", "--out_split", "scored", "--mode", "pass_rate",
               "--num_samples", "4", "--max_new_tokens", "8") == 0
  out = capsys.readouterr().out
  assert "scored 6 of 6 rows" in out and "wrote synth_scored[scored] (6 rows)" in out
  scored = data.load("synth_scored[scored]", data_dir=setup.data_dir)
  assert len(scored) == 6
  rates = np.asarray([scored[i]["pass_rate"] for i in range(6)])
  assert np.all((rates >= 0) & (rates <= 1))
  np.testing.assert_allclose(rates * 4, np.round(rates * 4))
  assert [scored[i]["problem"] for i in range(6)] == [r["problem"] for r in setup.rows]


def test_evaluation_and_filter_decode_in_refilled_slots(setup, monkeypatch):
  """`evaluate_source(slots=N)` and the filter's `ModelPolicy(slots=N)` hand N to the sampler and
  grade the same greedy answers as without (the refilling sampler itself: test_sampler_refill)."""
  from vlm_jax import data
  from vlm_jax.evaluate import evaluate_source, load_for_eval
  from vlm_jax.rl import sampler
  model, params, processor = load_for_eval(setup.model)
  source = data.load("synth_in", split="train", data_dir=setup.data_dir)
  seen = []
  generate = sampler.generate

  def spy(*args, slots=0, **kw):
    seen.append(slots)
    return generate(*args, slots=slots, **kw)

  monkeypatch.setattr(sampler, "generate", spy)
  runs = [evaluate_source(model, params, processor, source, name="synth", batch_size=4, max_new_tokens=12,
                          slots=slots) for slots in (0, 3)]
  assert seen == [0, 0, 3, 3]  # two batches each
  assert runs[0]["items"] == runs[1]["items"] and runs[0]["samples"] == runs[1]["samples"]
  seen.clear()
  outcomes = [flt.ModelPolicy(model, params, processor, batch_size=4, max_new_tokens=8, temperature=0.0,
                              instruction="Answer.", progress=False, slots=slots)(setup.rows, False, 1)
              for slots in (0, 2)]
  assert seen == [0, 0, 2, 2]
  for a, b in zip(*outcomes):
    assert a is not None and b is not None
    assert a.correct.tolist() == b.correct.tolist() and a.answered.tolist() == b.answered.tolist()

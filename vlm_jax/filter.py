"""Data filtering: the paper's perception-sensitive filter and pass-rate (difficulty) scoring.

    python -m vlm_jax.filter --model PATH --data NAME[SPLIT] --out NAME_OUT --mode perception
        [--image_wrong all|any|ignore] [--caption_right all|any|ignore] [--count_unanswered_as_wrong]
        [--k K] [--temperature T] [--max_new_tokens 8] [--data_dir DIR] [--batch_size B]
    python -m vlm_jax.filter --model PATH --data NAME[SPLIT] --out NAME_OUT --mode pass_rate
        [--num_samples 16] [--temperature 0.7] [--max_new_tokens 2048] ...

`perception` keeps the rows the model cannot answer from the image but can answer from its caption:
K runs answer from image + question, K runs from caption + question (text only, the pipeline's
`text_only` prompt), and a row is kept iff the rule holds. The rule has one quantifier per condition:

  --image_wrong   all: every image run gives a wrong answer (paper); any: at least one does;
                  ignore: no image runs are made.
  --caption_right all: every caption run is right (paper); any: at least one is; ignore: no caption
                  runs are made.

"Wrong" means answered and not correct: as in the paper ("a wrong (non-empty) letter"), a run whose
answer is empty or unparseable for its `answer_type` (e.g. no `\\boxed{}`, or `\\boxed{cat}` for a
multiple-choice row) is not wrong, unless `--count_unanswered_as_wrong`. Runs are greedy with K = 1
by default, with short answers (8 new tokens, `SHORT_ANSWER_INSTRUCTION`), as in the paper; K > 1
needs `--temperature > 0`. Caption runs are made only for rows that pass the image check, so each
dropped row has one reason: the first check it fails (image, then caption).

`pass_rate` writes every row with `pass_rate` = share of N sampled answers that are correct (paper:
16 samples at T = 0.7, with the training prompt `REASONING_INSTRUCTION`); rows the pipeline cannot
encode keep -1 (unknown).

The output is a local-files dataset NAME_OUT (split: `--out_split`, default the input's split) in
`--data_dir`, read back with `vlm_jax.data.load(NAME_OUT, ...)`. Bad input: one error line, exit 2;
a perception run that keeps no row writes nothing and exits 1.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from vlm_jax.rl.rewards import parsing

Quantifier = Literal["all", "any", "ignore"]
QUANTIFIERS: tuple[str, ...] = ("all", "any", "ignore")
MODES: tuple[str, ...] = ("perception", "pass_rate")
SHORT_ANSWER_INSTRUCTION = "Give only the final answer in \\boxed{}."

# Decision reasons (stable strings: printed in the counts).
KEPT = "kept"
IMAGE_CORRECT = "image_correct"            # an image run answered correctly
IMAGE_UNANSWERED = "image_unanswered"      # an image run gave no (parseable) answer
CAPTION_WRONG = "caption_wrong"            # a caption run was not correct
MISSING_CAPTION = "missing_caption"        # an image row without a caption cannot be caption-tested
IMAGE_UNUSABLE = "image_prompt_unusable"   # the pipeline skipped the image prompt (see its reasons)
CAPTION_UNUSABLE = "caption_prompt_unusable"


class Outcome(NamedTuple):
  """The K runs of one row under one condition."""
  correct: np.ndarray   # bool [K]
  answered: np.ndarray  # bool [K] a non-empty answer that parses for the row's answer_type


# policy_fn(rows, text_only, num_samples) -> one Outcome per row (None: the row could not be run).
PolicyFn = Callable[[Sequence[Mapping[str, Any]], bool, int], Sequence["Outcome | None"]]


@dataclasses.dataclass(frozen=True)
class Rule:
  """Which runs must be wrong / right for a row to be kept (see the module docstring)."""
  image_wrong: Quantifier = "all"
  caption_right: Quantifier = "all"
  unanswered_is_wrong: bool = False

  def __post_init__(self):
    for key in ("image_wrong", "caption_right"):
      if getattr(self, key) not in QUANTIFIERS:
        raise ValueError(f"rule: {key} must be one of {list(QUANTIFIERS)}, got {getattr(self, key)!r}")
    if self.image_wrong == "ignore" and self.caption_right == "ignore":
      raise ValueError("rule: image_wrong and caption_right are both 'ignore', so nothing would be checked")

  def __str__(self) -> str:
    extra = ", unanswered counts as wrong" if self.unanswered_is_wrong else ""
    return f"image_wrong={self.image_wrong}, caption_right={self.caption_right}{extra}"


# ------------------------------------------------------------------------------------------------
# decisions (pure)
# ------------------------------------------------------------------------------------------------


def _runs(name: str, values: Any) -> np.ndarray:
  arr = np.asarray(values)
  if arr.ndim != 1 or arr.size == 0:
    raise ValueError(f"{name} must be a non-empty 1-D array of runs, got shape {arr.shape}")
  return arr.astype(bool)


def _holds(quantifier: str, flags: np.ndarray) -> bool:
  return bool(flags.all() if quantifier == "all" else flags.any())


def image_check(correct: Any, answered: Any, rule: Rule) -> str | None:
  """None if the image runs satisfy `rule.image_wrong`, else why not (IMAGE_CORRECT when some run
  was correct, IMAGE_UNANSWERED when the failing runs gave no answer)."""
  if rule.image_wrong == "ignore":
    return None
  correct, answered = _runs("image_correct", correct), _runs("image_answered", answered)
  if correct.shape != answered.shape:
    raise ValueError(f"image_correct has {correct.size} runs but image_answered {answered.size}")
  wrong = ~correct & (answered | rule.unanswered_is_wrong)
  if _holds(rule.image_wrong, wrong):
    return None
  return IMAGE_CORRECT if correct.any() else IMAGE_UNANSWERED


def caption_check(correct: Any, rule: Rule) -> str | None:
  """None if the caption runs satisfy `rule.caption_right`, else CAPTION_WRONG."""
  if rule.caption_right == "ignore":
    return None
  return None if _holds(rule.caption_right, _runs("caption_correct", correct)) else CAPTION_WRONG


def decide(image_correct: Any, image_answered: Any, caption_correct: Any, rule: Rule) -> tuple[bool, str]:
  """(keep, reason) for one row from its runs; the image check comes first. Arrays of an ignored
  condition may be None."""
  reason = image_check(image_correct, image_answered, rule) or caption_check(caption_correct, rule)
  return reason is None, reason or KEPT


def is_answered(text: str, answer_type: str) -> bool:
  r"""Whether `text` gives an answer its grader can read: a non-empty `\boxed{}` (or `<answer>`)
  that, for `mcq` / `yes_no` / `number` / box answers, parses as a letter / yes-no / number / box."""
  answer = parsing.extract_answer(text)
  if not answer:
    return False
  parser = {"mcq": parsing.parse_choice, "yes_no": parsing.parse_yes_no, "number": parsing.parse_number,
            "iou": parsing.parse_box, "giou": parsing.parse_box,
            "detection": parsing.parse_boxes}.get(answer_type or "")
  return parser is None or parser(answer) is not None


# ------------------------------------------------------------------------------------------------
# drivers over a policy
# ------------------------------------------------------------------------------------------------


class _View(Sequence):
  """Rows `indices` of a random-access source, without reading them."""

  def __init__(self, rows: Sequence[Mapping[str, Any]], indices: Sequence[int]):
    self.rows, self.indices = rows, list(indices)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i):
    return self.rows[self.indices[i]]


def _run(policy_fn: PolicyFn, rows: Sequence[Mapping[str, Any]], text_only: bool,
         num_samples: int) -> list[Outcome | None]:
  """Calls the policy and checks it returned one Outcome of `num_samples` runs (or None) per row."""
  if len(rows) == 0:
    return []
  outs = list(policy_fn(rows, text_only, num_samples))
  if len(outs) != len(rows):
    raise ValueError(f"policy returned {len(outs)} outcomes for {len(rows)} rows")
  for i, o in enumerate(outs):
    if o is not None and (np.shape(o.correct) != (num_samples,) or np.shape(o.answered) != (num_samples,)):
      raise ValueError(f"policy outcome for row {i} has shapes {np.shape(o.correct)} / "
                       f"{np.shape(o.answered)}, expected ({num_samples},)")
  return outs


def filter_perception(rows: Sequence[Mapping[str, Any]], policy_fn: PolicyFn, *, rule: Rule,
                      k: int = 1) -> list[str]:
  """The decision reason of every row (KEPT for the kept ones). Image runs for all rows, then
  caption runs for the rows that passed (rows without a caption get MISSING_CAPTION)."""
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  reasons: list[str | None] = [None] * len(rows)
  if rule.image_wrong != "ignore":
    for i, o in enumerate(_run(policy_fn, rows, False, k)):
      reasons[i] = IMAGE_UNUSABLE if o is None else image_check(o.correct, o.answered, rule)
  if rule.caption_right != "ignore":
    todo = []
    for i, r in enumerate(reasons):
      if r is None and rows[i].get("images") and not str(rows[i].get("caption", "")).strip():
        reasons[i] = MISSING_CAPTION
      elif r is None:
        todo.append(i)
    for i, o in zip(todo, _run(policy_fn, _View(rows, todo), True, k)):
      reasons[i] = CAPTION_UNUSABLE if o is None else caption_check(o.correct, rule)
  return [r or KEPT for r in reasons]


def score_pass_rate(rows: Sequence[Mapping[str, Any]], policy_fn: PolicyFn, *,
                    num_samples: int) -> list[float]:
  """Share of `num_samples` image + question runs that are correct, per row (-1.0: not run)."""
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  return [-1.0 if o is None else float(np.mean(o.correct))
          for o in _run(policy_fn, rows, False, num_samples)]


def outcomes_from_grades(scores: Sequence[float], texts: Sequence[str], answer_types: Sequence[str],
                         num_samples: int, threshold: float) -> list[Outcome]:
  """Per-prompt Outcomes from graded samples in prompt-major order (row = prompt * K + j);
  `answer_types` has one entry per prompt."""
  n = len(answer_types)
  if len(scores) != n * num_samples or len(texts) != n * num_samples:
    raise ValueError(f"{len(scores)} scores / {len(texts)} texts for {n} prompts x {num_samples} samples")
  correct = (np.asarray(scores, np.float32) >= threshold).reshape(n, num_samples)
  answered = np.asarray([is_answered(t, answer_types[j // num_samples]) for j, t in enumerate(texts)],
                        bool).reshape(n, num_samples)
  return [Outcome(c, a) for c, a in zip(correct, answered)]


# ------------------------------------------------------------------------------------------------
# the model policy
# ------------------------------------------------------------------------------------------------


def length_buckets(max_prompt_len: int) -> tuple[int, ...]:
  """Prompt buckets: powers of two from 64 below `max_prompt_len`, then `max_prompt_len`."""
  if max_prompt_len < 1:
    raise ValueError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
  return tuple(b for b in (2 ** e for e in range(6, 16)) if b < max_prompt_len) + (max_prompt_len,)


class ModelPolicy:
  """A PolicyFn that generates with a model through the data pipeline and `generate_and_grade`.

  Each call runs one pipeline over the rows (`text_only` gives the caption prompt) in batches of
  `batch_size` prompts; `skipped` counts, per condition, the rows the pipeline could not encode.
  """

  def __init__(self, model, params, processor, *, batch_size: int, max_new_tokens: int,
               temperature: float, top_p: float = 1.0, instruction: str, max_prompt_len: int = 2048,
               seed: int = 0, progress: bool = True, slots: int = 0):
    from vlm_jax.rl import rewards as rewards_lib
    self.model, self.params, self.processor = model, params, processor
    self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
    self.temperature, self.top_p, self.instruction = temperature, top_p, instruction
    self.buckets = length_buckets(max_prompt_len)
    self.seed, self.progress, self.slots = seed, progress, slots
    self.reward_fn = rewards_lib.build_reward({"auto": 1.0})
    self.skipped: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    self._calls = 0

  def __call__(self, rows: Sequence[Mapping[str, Any]], text_only: bool, num_samples: int) -> list[Outcome | None]:
    import jax
    from tqdm import tqdm

    from vlm_jax.data.pipeline import make_dataset
    from vlm_jax.evaluate import CORRECT_THRESHOLD
    from vlm_jax.rl.rollout import SamplingSpec, SpecialTokens, generate_and_grade

    condition = "caption" if text_only else "image"
    it = make_dataset([(rows, 1.0)], self.processor, batch_size=self.batch_size, seed=self.seed,
                      shard_index=0, shard_count=1, order="shuffle", length_buckets=self.buckets,
                      num_epochs=1, text_only=text_only, instruction=self.instruction)
    rng = jax.random.fold_in(jax.random.key(self.seed), self._calls)
    self._calls += 1
    out: list[Outcome | None] = [None] * len(rows)
    with tqdm(total=len(rows), desc=f"{condition} runs", unit="row", disable=not self.progress,
              file=sys.stderr) as bar:
      for b, batch in enumerate(it):
        g = generate_and_grade(
            self.model, self.params, batch, tokenizer=self.processor.tokenizer, reward_fn=self.reward_fn,
            spec=SamplingSpec(max_new_tokens=self.max_new_tokens, num_samples=num_samples,
                              temperature=self.temperature, top_p=self.top_p, prompt_buckets=tuple(self.buckets),
                              slots=self.slots),
            tokens=SpecialTokens.of(self.processor), rng=jax.random.fold_in(rng, b))
        got = outcomes_from_grades(g.components["auto"], g.texts, g.prompts["answer_type"], num_samples,
                                   CORRECT_THRESHOLD)
        for index, outcome in zip(g.prompts["index"], got):
          out[int(index)] = outcome
        bar.update(len(got))
    for reason, count in it.stats["skipped"].items():
      if count:
        self.skipped[condition][reason] += count
    return out


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m vlm_jax.filter", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", required=True, help="HF model directory or training workdir")
  ap.add_argument("--data", required=True, help="NAME, NAME[SPLIT] (default split train) or a data file")
  ap.add_argument("--out", required=True, help="name of the dataset to write")
  ap.add_argument("--out_split", default=None, help="split to write (default: the input's split)")
  ap.add_argument("--data_dir", default=None, help="default: $VLM_JAX_DATA_DIR, else ~/vlm_jax/data")
  ap.add_argument("--mode", required=True, choices=MODES)
  ap.add_argument("--image_wrong", choices=QUANTIFIERS, default=None, help="perception rule (default all)")
  ap.add_argument("--caption_right", choices=QUANTIFIERS, default=None, help="perception rule (default all)")
  ap.add_argument("--count_unanswered_as_wrong", action="store_true", help="perception rule")
  ap.add_argument("--k", type=int, default=None, help="perception runs per condition (default 1)")
  ap.add_argument("--num_samples", type=int, default=None, help="pass_rate samples (default 16)")
  ap.add_argument("--temperature", type=float, default=None, help="default 0 (perception), 0.7 (pass_rate)")
  ap.add_argument("--top_p", type=float, default=1.0)
  ap.add_argument("--max_new_tokens", type=int, default=None, help="default 8 (perception), 2048 (pass_rate)")
  ap.add_argument("--instruction", default=None, help="appended to each question (default per mode)")
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--slots", type=int, default=0,
                  help="decode slots refilled as answers finish (0: each batch decodes to its longest answer)")
  ap.add_argument("--max_prompt_len", type=int, default=2048)
  ap.add_argument("--max_examples", type=int, default=0, help="only the first N rows (0: all)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--no_progress", action="store_true")
  return ap


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
  """Fills the per-mode defaults and rejects flags of the other mode / impossible values."""
  from vlm_jax.data.rows import REASONING_INSTRUCTION
  perception = args.mode == "perception"
  wrong_mode = [f"--{k}" for k in (("num_samples",) if perception else
                                   ("k", "image_wrong", "caption_right", "count_unanswered_as_wrong"))
                if getattr(args, k) not in (None, False)]
  if wrong_mode:
    raise ValueError(f"{', '.join(wrong_mode)} do(es) not apply to --mode {args.mode}")
  defaults = (dict(k=1, temperature=0.0, max_new_tokens=8, instruction=SHORT_ANSWER_INSTRUCTION,
                   image_wrong="all", caption_right="all") if perception else
              dict(num_samples=16, temperature=0.7, max_new_tokens=2048, instruction=REASONING_INSTRUCTION))
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  for key in ("k", "num_samples", "max_new_tokens", "batch_size", "max_prompt_len"):
    if getattr(args, key) is not None and getattr(args, key) < 1:
      raise ValueError(f"--{key} must be >= 1, got {getattr(args, key)}")
  if not (math.isfinite(args.temperature) and args.temperature >= 0):
    raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
  if not 0 < args.top_p <= 1:
    raise ValueError(f"--top_p must be in (0, 1], got {args.top_p}")
  for key in ("max_examples", "slots"):
    if getattr(args, key) < 0:
      raise ValueError(f"--{key} must be >= 0, got {getattr(args, key)}")
  samples = args.k if perception else args.num_samples
  if samples > 1 and args.temperature == 0:
    raise ValueError(f"{samples} runs per row at --temperature 0 would all be the same greedy answer; "
                     f"set --temperature > 0")
  if perception:
    args.rule = Rule(args.image_wrong, args.caption_right, args.count_unanswered_as_wrong)
  return args


def split_of(spec: str) -> str:
  """The base split named by a data spec: 'x[test[:10]]' -> 'test'; a bare name or file -> 'train'."""
  if spec.endswith("]") and "[" in spec:
    return spec[spec.index("[") + 1:-1].split("[", 1)[0]
  return "train"


def perception_summary(reasons: Sequence[str]) -> str:
  """'kept X of N' and one line per drop reason, most frequent first."""
  counts = collections.Counter(reasons)
  lines = [f"kept {counts.pop(KEPT, 0)} of {len(reasons)} rows"]
  lines += [f"  dropped {n} x {reason}" for reason, n in counts.most_common()]
  return "\n".join(lines)


def _fail(err: BaseException) -> int:
  print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
  return 2


def _load_inputs(args: argparse.Namespace):
  """(rows, model, params, processor) after checking the flags; ValueError / OSError on bad input."""
  from vlm_jax import data
  from vlm_jax.data import tfds_builders
  from vlm_jax.evaluate import load_for_eval
  resolve_args(args)
  tfds_builders.check_dataset_name(args.out)
  if args.out == args.data.split("[", 1)[0]:
    raise ValueError(f"--out {args.out!r} is the input dataset; write to a new name")
  args.out_split = args.out_split or split_of(args.data)
  if not re.fullmatch(r"\w+", args.out_split):
    raise ValueError(f"--out_split {args.out_split!r} must be letters, digits and underscores")
  from vlm_jax import paths
  print(paths.describe_data_dir(args.data_dir))
  args.data_dir = str(paths.data_dir(args.data_dir))
  source = data.load(args.data, split="train", data_dir=args.data_dir)
  if len(source) == 0:
    raise ValueError(f"--data {args.data!r} has no rows")
  rows = _View(source, range(min(len(source), args.max_examples or len(source))))
  return (rows, *load_for_eval(args.model))


def _score(args: argparse.Namespace, rows: Sequence[Mapping[str, Any]], policy: PolicyFn):
  """Runs the mode, prints its counts; returns (indices to write, their output rows, lazily)."""
  if args.mode == "perception":
    reasons = filter_perception(rows, policy, rule=args.rule, k=args.k)
    print(f"perception filter on {args.data} (rule: {args.rule}; K={args.k}, T={args.temperature}): "
          + perception_summary(reasons))
    keep = [i for i, r in enumerate(reasons) if r == KEPT]
    return keep, (rows[i] for i in keep)
  rates = score_pass_rate(rows, policy, num_samples=args.num_samples)
  scored = [r for r in rates if r >= 0]
  mean = f", mean pass_rate {np.mean(scored):.3f}" if scored else ""
  print(f"pass_rate on {args.data} (N={args.num_samples}, T={args.temperature}): scored {len(scored)} "
        f"of {len(rates)} rows{mean}; {len(rates) - len(scored)} unscored (pass_rate -1)")
  keep = list(range(len(rows)))
  return keep, ({**rows[i], "pass_rate": rates[i]} for i in keep)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    rows, model, params, processor = _load_inputs(args)
  except (ValueError, OSError) as err:
    return _fail(err)
  policy = ModelPolicy(model, params, processor, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       instruction=args.instruction, max_prompt_len=args.max_prompt_len, seed=args.seed,
                       progress=not args.no_progress, slots=args.slots)
  try:
    keep, out_rows = _score(args, rows, policy)
  except ValueError as err:  # a bad value in the data, e.g. an unknown answer_type
    return _fail(err)
  for condition, counts in policy.skipped.items():
    print(f"  pipeline skipped {condition} prompts: "
          + ", ".join(f"{reason} {n}" for reason, n in counts.most_common()))
  if not keep:
    print("error: no rows kept; nothing written", file=sys.stderr)
    return 1
  from vlm_jax.data import tfds_builders
  path = tfds_builders.write_local_split(args.out, args.out_split, out_rows, args.data_dir,
                                         description=f"vlm_jax.filter --mode {args.mode} of {args.data}")
  print(f"wrote {args.out}[{args.out_split}] ({len(keep)} rows) to {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

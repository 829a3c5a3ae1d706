"""Rollout orchestration (`vlm_jax.rl.rollout`): row surgery on processor batches keeps each row's
images, and `collect_rollout` with DAPO dynamic sampling drops equal-reward groups, draws more
prompts, respects its cap and fills the batch.

One tiny real-format model directory (byte-level BPE tokenizer, PIL image processor) is shared by
every test. Every drawn prompt batch has the same layout (a text-only row, then a one-image row),
so the sampler compiles once.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vlm_jax import models
from vlm_jax.config import GRPOConfig
from vlm_jax.data.processor import Processor
from vlm_jax.models.tiny import build_tiny_model
from vlm_jax.rl.policy import score_responses
from vlm_jax.rl.rollout import SpecialTokens, collect_rollout, concat_batches, select_rows

IMG = "<|vision_start|><|image_pad|><|vision_end|>"
G = 4          # samples per prompt
NEW = 4        # max new tokens


def image(h: int, w: int, seed: int) -> Image.Image:
  pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
  return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  path = build_tiny_model(tmp_path_factory.mktemp("rollout_tiny"))
  proc = Processor.from_pretrained(path)
  model, params = models.from_pretrained(path)
  return SimpleNamespace(proc=proc, model=model, params=params)


def valid_rows(batch) -> list[np.ndarray]:
  ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"]).astype(bool)
  return [ids[b][mask[b]] for b in range(len(ids))]


# ------------------------------------------------------------------------------------------------
# select_rows / concat_batches
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def surgery(env):
  # Same-size images everywhere in `a`, so only the pixels tell whose image a row got.
  a_texts = ["Is it blue?", f"{IMG}How many?", f"{IMG}Left or {IMG}right?"]
  a_images = [None, [image(56, 56, 1)], [image(56, 56, 2), image(56, 56, 3)]]
  b_texts = [f"{IMG}What shape?", "Name a colour."]
  b_images = [[image(56, 84, 4)], None]
  a = {**env.proc(a_texts, a_images), "answer": ["a0", "a1", "a2"], "task": ["t"] * 3}
  b = {**env.proc(b_texts, b_images), "answer": ["b0", "b1"], "task": ["t"] * 2}
  return SimpleNamespace(a=a, b=b, texts=a_texts + b_texts, images=a_images + b_images,
                         logits_a=np.asarray(models.forward(env.model, env.params, a)),
                         logits_b=np.asarray(models.forward(env.model, env.params, b)))


def valid_logits(logits, batch, row) -> np.ndarray:
  return logits[row][np.asarray(batch["attention_mask"][row]).astype(bool)]


def test_select_rows_keeps_each_rows_images(env, surgery):
  a = surgery.a
  sel = select_rows(a, [2, 0], env.proc.image_token_id)
  assert sel["answer"] == ["a2", "a0"] and sel["task"] == ["t", "t"]
  np.testing.assert_array_equal(sel["image_grid_thw"], a["image_grid_thw"][1:3])
  np.testing.assert_array_equal(sel["pixel_values"], a["pixel_values"][16:48])   # 16 patches each
  assert sel["attention_mask"][1, 0] == 0 and sel["attention_mask"][1, -1] == 1  # left aligned
  logits = np.asarray(models.forward(env.model, env.params, sel))
  for new_row, old_row in ((0, 2), (1, 0)):
    np.testing.assert_allclose(valid_logits(logits, sel, new_row),
                               valid_logits(surgery.logits_a, a, old_row), atol=1e-4, rtol=0)
  # The comparison can fail: swapping the two-image row's images changes its logits.
  swapped = {**sel, "pixel_values": np.concatenate([sel["pixel_values"][16:32],
                                                    sel["pixel_values"][:16]])}
  logits_swapped = np.asarray(models.forward(env.model, env.params, swapped))
  assert np.abs(valid_logits(logits_swapped, sel, 0) - valid_logits(logits, sel, 0)).max() > 1e-2


def test_concat_batches_matches_processor_and_logits(env, surgery):
  a, b = surgery.a, surgery.b
  cat = concat_batches([a, b], env.proc.image_token_id)
  assert cat["answer"] == ["a0", "a1", "a2", "b0", "b1"]
  # same tokens and images as processing all five rows at once
  ref = env.proc(surgery.texts, surgery.images)
  for got, want in zip(valid_rows(cat), valid_rows(ref), strict=True):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(cat["image_grid_thw"], ref["image_grid_thw"])
  np.testing.assert_array_equal(cat["pixel_values"], ref["pixel_values"])
  logits = np.asarray(models.forward(env.model, env.params, cat))
  sources = [(surgery.logits_a, a, r) for r in range(3)]
  sources += [(surgery.logits_b, b, r) for r in range(2)]
  for row, (src_logits, src, src_row) in enumerate(sources):
    np.testing.assert_allclose(valid_logits(logits, cat, row),
                               valid_logits(src_logits, src, src_row), atol=1e-4, rtol=0,
                               err_msg=f"row {row}")


def test_row_images_must_match_grids(env, surgery):
  bad = {**surgery.a, "image_grid_thw": surgery.a["image_grid_thw"][:2]}
  with pytest.raises(ValueError, match="3 image-token runs but 2 images"):
    select_rows(bad, [0], env.proc.image_token_id)


# ------------------------------------------------------------------------------------------------
# collect_rollout with dynamic sampling
# ------------------------------------------------------------------------------------------------


class GroupReward:
  """Reward by prompt: answers starting with "varied" score j / G for sample j (varied group),
  every other answer scores 0.5 for all samples (an equal-reward group). Records each call."""

  def __init__(self):
    self.calls: list[list[str]] = []

  def __call__(self, texts, answers, **fields):
    assert len(texts) == len(answers) == len(fields["task"]) == len(fields["answer_type"])
    self.calls.append(sorted(set(answers), key=answers.index))
    total = np.asarray([(i % G) / G if a.startswith("varied") else 0.5
                        for i, a in enumerate(answers)], np.float32)
    return total, {"accuracy": total, "format": np.ones_like(total)}


def prompt_stream(env, answers: list[tuple[str, str]], shards: int = 1) -> Iterator[dict]:
  """Processor batches of two prompts each: a text-only row, then a one-image row (with
  `shards=2`, from data shard 0 and 1)."""
  for k, (text_answer, image_answer) in enumerate(answers):
    batch = env.proc(["Count the dots.", f"{IMG}Which shape?"], [None, [image(56, 56, 10 + k)]])
    batch = {**batch, "answer": [text_answer, image_answer], "task": ["toy", "toy"],
             "answer_type": ["number", "number"]}
    yield {**batch, "shard": [0, 1]} if shards == 2 else batch


def collect(env, answers, *, batch_size=2, dynamic=True, max_extra_draws=4, seed=0, shards=1):
  cfg = GRPOConfig(num_samples=G, max_new_tokens=NEW, kl_coef=0.0, dynamic_sampling=dynamic,
                   max_extra_draws=max_extra_draws)
  reward = GroupReward()
  stream = prompt_stream(env, answers, shards)
  batch, graded, metrics = collect_rollout(
      env.model, env.params, env.params, stream, cfg=cfg, tokenizer=env.proc.tokenizer,
      reward_fn=reward, rng=jax.random.key(seed), tokens=SpecialTokens.of(env.proc),
      batch_size=batch_size, shards=shards)
  return SimpleNamespace(batch=batch, graded=graded, metrics=metrics, reward=reward,
                         left=sum(1 for _ in stream))


STREAM = [("flat0", "varied1"), ("flat2", "flat3"), ("varied4", "varied5"), ("varied6", "flat7")]


def test_dynamic_sampling_drops_flat_groups_and_draws_more(env):
  out = collect(env, STREAM, max_extra_draws=4)
  assert out.graded.prompts["answer"] == ["varied1", "varied4"]
  assert out.reward.calls == [["flat0", "varied1"], ["flat2", "flat3"], ["varied4", "varied5"]]
  assert out.left == 1                                      # the fourth batch was never drawn
  m = out.metrics
  assert m["dynamic/extra_draws"] == 2 and m["rollout/draws"] == 3
  assert m["rollout/prompts_seen"] == 6
  assert m["dynamic/filled_equal_reward_groups"] == 0
  assert m["reward/zero_std_group_frac"] == 0.0
  np.testing.assert_allclose(out.graded.rewards, np.tile(np.arange(G) / G, 2))
  assert out.batch.responses_NT.shape == (2 * G, NEW)
  assert out.batch.prompt.input_ids_BL.shape[0] == 2


def test_dynamic_sampling_fills_each_data_shard_from_its_own_rows(env):
  """Two data shards (row 0 of each draw from shard 0, row 1 from shard 1), one prompt each: shard 1
  is full after the first draw (varied1), shard 0 only at the third (varied4), and the batch is
  shard 0's prompts, then shard 1's - what two processes reading one shard each would build."""
  out = collect(env, STREAM, max_extra_draws=4, shards=2)
  assert out.graded.prompts["answer"] == ["varied4", "varied1"]
  assert out.graded.prompts["shard"] == [0, 1]
  m = out.metrics
  assert m["rollout/draws"] == 3 and m["rollout/prompts_seen"] == 6 and out.left == 1
  np.testing.assert_allclose(out.graded.rewards, np.tile(np.arange(G) / G, 2))
  # capped at one extra draw: shard 0 fills with its own first equal-reward group (flat0), not
  # with another shard's
  out = collect(env, STREAM, max_extra_draws=1, shards=2)
  assert out.graded.prompts["answer"] == ["flat0", "varied1"]
  assert out.metrics["dynamic/filled_equal_reward_groups"] == 1
  with pytest.raises(ValueError, match="batch_size 3 does not split over 2 data shards"):
    collect(env, STREAM, batch_size=3, shards=2)


def test_rollout_batch_rows_score_against_their_own_prompts(env):
  """The kept groups (an image prompt from the first draw, a text prompt from the third) are
  re-assembled with their images: teacher-forced log-probs of each response under its prompt
  equal the sampler's, so no response was paired with another prompt."""
  out = collect(env, STREAM, max_extra_draws=4)
  assert len(out.graded.prompts["image_grid_thw"]) == 1
  rb = out.batch
  scored = np.asarray(score_responses(env.model.graphdef, env.params, rb.prompt, rb.responses_NT,
                                      group_size=G))
  mask = np.asarray(rb.mask_NT) > 0
  assert mask.sum() > 0
  np.testing.assert_allclose(scored[mask], np.asarray(rb.old_logp_NT)[mask], atol=1e-4, rtol=0)
  # Swapping the two prompts' responses breaks the match (the check can fail).
  swapped = jnp.concatenate([rb.responses_NT[G:], rb.responses_NT[:G]])
  other = np.asarray(score_responses(env.model.graphdef, env.params, rb.prompt, swapped,
                                     group_size=G))
  other = np.concatenate([other[G:], other[:G]])
  assert np.abs(other[mask] - np.asarray(rb.old_logp_NT)[mask]).max() > 1e-2
  np.testing.assert_array_equal(np.asarray(rb.ref_logp_NT), 0.0)   # kl_coef == 0: no reference


def test_extra_draw_cap_fills_with_equal_reward_groups(env):
  out = collect(env, STREAM, max_extra_draws=1)
  assert out.reward.calls == [["flat0", "varied1"], ["flat2", "flat3"]]
  assert out.left == 2
  m = out.metrics
  assert m["dynamic/extra_draws"] == 1 and m["rollout/draws"] == 2
  assert m["dynamic/filled_equal_reward_groups"] == 1
  assert m["reward/zero_std_group_frac"] == 0.5
  assert out.graded.prompts["answer"] == ["varied1", "flat0"]   # first dropped group fills
  assert out.batch.responses_NT.shape == (2 * G, NEW)
  adv = np.asarray(out.batch.advantages_N)
  np.testing.assert_array_equal(adv[G:], 0.0)                   # no signal from the filled group
  assert np.all(np.diff(adv[:G]) > 0)                           # rewards j / G -> increasing


def test_without_dynamic_sampling_flat_groups_are_kept(env):
  out = collect(env, STREAM, dynamic=False)
  assert out.graded.prompts["answer"] == ["flat0", "varied1"]
  assert len(out.reward.calls) == 1
  assert "dynamic/extra_draws" not in out.metrics
  assert out.metrics["reward/zero_std_group_frac"] == 0.5


def test_exhausted_data_fills_or_fails_clearly(env):
  out = collect(env, [("flat0", "varied1")], max_extra_draws=4)
  assert out.graded.prompts["answer"] == ["varied1", "flat0"]
  assert out.metrics["dynamic/filled_equal_reward_groups"] == 1
  with pytest.raises(RuntimeError, match="only 2 of 3 prompts"):
    collect(env, [("flat0", "varied1")], batch_size=3)
  with pytest.raises(RuntimeError, match="only 0 of 2 prompts"):
    collect(env, [])


def test_chunked_sampling_and_scoring_keep_rows_with_their_prompts(env):
  """One prompt per sampler call (`rollout_chunk=1`) and reference scoring G completions at a
  time (`score_chunk`): the reference log-probs (same weights) equal the sampler's on every row."""
  cfg = GRPOConfig(num_samples=G, max_new_tokens=NEW, kl_coef=0.01, dynamic_sampling=False,
                   rollout_chunk=1, score_chunk=G)
  batch, graded, _ = collect_rollout(
      env.model, env.params, env.params, prompt_stream(env, STREAM), cfg=cfg,
      tokenizer=env.proc.tokenizer, reward_fn=GroupReward(), rng=jax.random.key(1),
      tokens=SpecialTokens.of(env.proc), batch_size=2)
  mask = np.asarray(batch.mask_NT) > 0
  assert mask.sum() > 0 and batch.responses_NT.shape == (2 * G, NEW)
  np.testing.assert_allclose(np.asarray(batch.ref_logp_NT)[mask], np.asarray(batch.old_logp_NT)[mask],
                             atol=1e-4, rtol=0)

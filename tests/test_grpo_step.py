"""The jitted GRPO update (`vlm_jax.rl.policy`) and the optimizer / train state
(`vlm_jax.train_state`).

Per model family (Qwen2.5-VL and Qwen3-VL, the `env` fixture's parameter) one tiny random reference
checkpoint (vocab 256) and one prompt batch (text-only, one-image and two-image rows) are shared by
every test. `grpo_step` compiles once per (optimizer, mu, minibatch)
combination, so the tests use exactly two: optimizer `lm_only` with mu=1 / one mini-batch, and
optimizer `all_modules` with mu=2 / two mini-batches (the learning run).
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_reference import build_reference, make_batch
from vlm_jax import models
from vlm_jax.config import OptimizerConfig
from vlm_jax.rl import grpo, sampler
from vlm_jax.rl.policy import RolloutBatch, grpo_step, response_logprobs, score_responses
from vlm_jax.train_state import (apply_gradients, init_state, make_optimizer, module_labels,
                                 module_of)

ROWS = [[(4, 4)], [], [(4, 4), (4, 4)], []]   # 4 prompts: 1 image, text, 2 images, text
G = 8                                         # samples per prompt -> N = 32 completions
T = 6                                         # response tokens
EOS = (254, 255)                              # stop ids; a few samples end early
LOSS = grpo.GRPOLossConfig(kl_coef=1e-3)      # k3 KL to the initial policy
GOOD = 64                                     # toy task: a response token is correct if id < 64
LEARN_ITERS = 25


def host_copy(tree):
  """Bitwise host copy (grpo_step donates its state, so keep copies before calling it)."""
  return jax.tree.map(lambda a: np.array(a, copy=True), tree)


def fresh_state(params, optimizer):
  return init_state(jax.tree.map(jnp.copy, params), optimizer)


def leaves_by_module(tree) -> dict[str, list[tuple[str, np.ndarray]]]:
  out: dict[str, list] = {"vision": [], "merger": [], "language_model": []}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    out[module_of(path)].append((jax.tree_util.keystr(path), np.asarray(leaf)))
  return out


def toy_reward(roll: sampler.Rollout) -> np.ndarray:
  """Fraction of a response's tokens (the end token included) with id < GOOD: ~0.25 at random."""
  real = np.arange(roll.tokens.shape[1])[None] < roll.lengths[:, None]
  return ((roll.tokens < GOOD) & real).sum(-1) / np.maximum(roll.lengths, 1)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def env(tmp_path_factory, request):
  family = request.param
  path = tmp_path_factory.mktemp(f"grpo_ref_{family}")
  small = dict(layers=2, vision_depth=2, deepstack=(0, 1)) if family == "qwen3_vl" else {}
  build_reference(path, seed=0, family=family, **small)
  model, params = models.from_pretrained(path)
  batch = make_batch(ROWS, padding="left", seed=1, patch=16 if family == "qwen3_vl" else 14)
  prompt = sampler.prepare_prompts(model, batch)
  lm_only = make_optimizer(OptimizerConfig(lr=1e-2, weight_decay=0.0), 100, ("language_model",))
  all_modules = make_optimizer(OptimizerConfig(lr=3e-3, weight_decay=0.0), 100,
                               ("vision", "merger", "language_model"))
  return SimpleNamespace(model=model, params=params, batch=batch, prompt=prompt, lm_only=lm_only,
                         all_modules=all_modules)


def sample(env, params, key) -> sampler.Rollout:
  return sampler.generate(env.model, params, env.batch, max_new_tokens=T, temperature=1.0,
                          num_samples=G, rng=key, eos_token_ids=EOS)


def rollout_batch(env, params, key, *, ref_params=None) -> tuple[RolloutBatch, sampler.Rollout]:
  """Samples from `params` and builds the GRPO batch (reference log-probs under `ref_params`)."""
  roll = sample(env, params, key)
  adv = grpo.compute_advantages(jnp.asarray(toy_reward(roll), jnp.float32), G)
  mask = grpo.response_mask(jnp.asarray(roll.lengths), T).astype(jnp.float32)
  tokens = jnp.asarray(roll.tokens)
  ref = score_responses(env.model.graphdef, env.params if ref_params is None else ref_params,
                        env.prompt, tokens, group_size=G)
  return RolloutBatch(env.prompt, tokens, mask, jnp.asarray(roll.logprobs), ref, adv), roll


def step(env, state, batch, key, *, optimizer, mu=1, minibatch=0):
  return grpo_step(state, batch, key, graphdef=env.model.graphdef, optimizer=optimizer,
                   group_size=G, loss_cfg=LOSS, mu=mu, minibatch=minibatch)


# ------------------------------------------------------------------------------------------------
# first update: the training forward scores exactly what the sampler sampled
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_update(env):
  # key 10: its rollout has rows that stopped early (see the first test)
  batch, roll = rollout_batch(env, env.params, jax.random.key(10))
  before = host_copy(env.params)
  state, metrics = step(env, fresh_state(env.params, env.lm_only), batch, jax.random.key(8),
                        optimizer=env.lm_only)
  return SimpleNamespace(batch=batch, roll=roll, before=before, after=host_copy(state.params),
                         state=state, metrics={k: float(v) for k, v in metrics.items()})


def test_training_logprobs_equal_sampler_logprobs_with_images(env, first_update):
  roll = first_update.roll
  assert roll.lengths.min() < T, "fixture should contain responses that stopped early"
  scored = np.asarray(score_responses(env.model.graphdef, env.params, env.prompt,
                                      jnp.asarray(roll.tokens), group_size=G))
  real = np.arange(T)[None] < roll.lengths[:, None]
  np.testing.assert_allclose(scored[real], roll.logprobs[real], atol=1e-5, rtol=0)
  # scored in chunks, each encoding only its own prompts' images: the same log-probs
  for chunk in (G, 1):  # one prompt per chunk; a prompt's group spread over G chunks
    chunked = np.asarray(score_responses(env.model.graphdef, env.params, env.prompt,
                                         jnp.asarray(roll.tokens), group_size=G, chunk=chunk))
    np.testing.assert_allclose(chunked[real], scored[real], atol=1e-5, rtol=0, err_msg=f"chunk {chunk}")
  # The check can fail: scoring the responses against the wrong prompts (rows of another image
  # layout) gives different log-probs.
  shuffled = np.asarray(score_responses(env.model.graphdef, env.params, env.prompt,
                                        jnp.asarray(roll.tokens[::-1]), group_size=G))
  assert np.abs(shuffled[::-1][real] - roll.logprobs[real]).max() > 1e-2


def test_minibatch_rows_are_scored_against_their_own_prompts(env, first_update):
  """`response_logprobs` on a shuffled subset of completions (what one mini-batch sees) gathers
  each completion's prompt, images included."""
  roll = first_update.roll
  rows = np.asarray([30, 5, 17, 8, 0, 23, 12, 31])   # prompts 3, 0, 2, 1, 0, 2, 1, 3

  @jax.jit
  def subset_logprobs(params, prompt, tokens, rows_n):
    model = nnx.merge(env.model.graphdef, params)
    return response_logprobs(model, prompt, tokens[rows_n], rows_n // G)[0]

  got = np.asarray(subset_logprobs(env.params, env.prompt, jnp.asarray(roll.tokens),
                                   jnp.asarray(rows)))
  real = np.arange(T)[None] < roll.lengths[rows][:, None]
  np.testing.assert_allclose(got[real], roll.logprobs[rows][real], atol=1e-5, rtol=0)


def test_first_update_has_ratio_one_and_zero_kl(first_update):
  m = first_update.metrics
  for key in ("ratio/mean", "ratio/max", "ratio/min"):
    assert abs(m[key] - 1.0) < 1e-4, (key, m[key])
  assert m["kl"] < 1e-6            # reference = the policy that sampled = the params scored
  assert m["update_ok"] == 1.0
  assert 0.0 < m["entropy"] < np.log(256) + 1e-3
  assert int(first_update.state.step) == 1 and int(first_update.state.skipped) == 0


def test_kl_and_ratio_move_after_the_first_update(env, first_update):
  """Second rollout from the updated policy: ratio is 1 again (fresh old log-probs), KL to the
  unchanged reference is now positive."""
  state = jax.tree.map(jnp.copy, first_update.state)   # grpo_step donates its input state
  batch, _ = rollout_batch(env, state.params, jax.random.key(9))
  _, metrics = step(env, state, batch, jax.random.key(10), optimizer=env.lm_only)
  assert abs(float(metrics["ratio/mean"]) - 1.0) < 1e-4
  assert float(metrics["kl"]) > 1e-5


def test_frozen_vision_unchanged_language_model_trained(first_update):
  before = leaves_by_module(first_update.before)
  after = leaves_by_module(first_update.after)
  assert before["vision"] and before["merger"] and before["language_model"]
  for module in ("vision", "merger"):
    for (name, old), (_, new) in zip(before[module], after[module]):
      np.testing.assert_array_equal(new, old, err_msg=f"frozen {name} changed")
  pairs = zip(before["language_model"], after["language_model"])
  changed = [name for (name, old), (_, new) in pairs if not np.array_equal(old, new)]
  assert len(changed) == len(before["language_model"]), "every language-model tensor gets a grad"


# ------------------------------------------------------------------------------------------------
# non-finite guard
# ------------------------------------------------------------------------------------------------


def guarded_step(env, first_update, **replace):
  state = fresh_state(env.params, env.lm_only)
  before = host_copy((state.params, state.opt_state))
  new, metrics = step(env, state, first_update.batch._replace(**replace), jax.random.key(8),
                      optimizer=env.lm_only)
  return before, new, metrics


def assert_tree_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("field", ["advantages_N", "old_logp_NT"])
def test_nan_in_loss_skips_update_bitwise(env, first_update, field):
  value = np.array(getattr(first_update.batch, field), copy=True)
  value.reshape(-1)[0] = np.nan   # row 0, first token: always a real token
  before, new, metrics = guarded_step(env, first_update, **{field: jnp.asarray(value)})
  assert not np.isfinite(float(metrics["loss"]))
  assert float(metrics["update_ok"]) == 0.0
  assert int(new.step) == 1 and int(new.skipped) == 1
  assert_tree_equal(new.params, before[0])
  assert_tree_equal(new.opt_state, before[1])


def test_nan_old_logp_on_a_masked_position_is_harmless(env, first_update):
  """A NaN where the mask is 0 (padding) must neither reach the loss nor skip the update."""
  mask = np.array(first_update.batch.mask_NT, copy=True)
  old = np.array(first_update.batch.old_logp_NT, copy=True)
  mask[0, -1] = 0.0
  old[0, -1] = np.nan
  before, new, metrics = guarded_step(env, first_update, mask_NT=jnp.asarray(mask),
                                      old_logp_NT=jnp.asarray(old))
  assert np.isfinite(float(metrics["loss"])) and float(metrics["update_ok"]) == 1.0
  assert int(new.skipped) == 0
  lm_before = leaves_by_module(before[0])["language_model"]
  lm_after = leaves_by_module(new.params)["language_model"]
  assert any(not np.array_equal(a, b) for (_, a), (_, b) in zip(lm_before, lm_after))


# ------------------------------------------------------------------------------------------------
# learning: several updates per rollout (mu=2, two mini-batches) raise the reward
# ------------------------------------------------------------------------------------------------


def eval_reward(env, params) -> float:
  return float(toy_reward(sample(env, params, jax.random.key(12345))).mean())


@pytest.fixture(scope="module")
def learned(env):
  state = fresh_state(env.params, env.all_modules)
  start = eval_reward(env, env.params)
  steps = []
  rng = jax.random.key(0)
  for it in range(LEARN_ITERS):
    batch, _ = rollout_batch(env, state.params, jax.random.fold_in(rng, it))
    state, metrics = step(env, state, batch, jax.random.fold_in(rng, 1000 + it),
                          optimizer=env.all_modules, mu=2, minibatch=G * len(ROWS) // 2)
    steps.append((int(state.step), int(state.skipped)))
  return SimpleNamespace(start=start, end=eval_reward(env, state.params), steps=steps, state=state)


def test_grpo_raises_reward_on_toy_task(learned):
  assert learned.start < 0.4, learned.start
  assert learned.end > 0.8, (learned.start, learned.end)


def test_mu_two_half_minibatches_make_four_updates_per_step(learned):
  assert learned.steps[0] == (4, 0)
  assert learned.steps[-1] == (4 * LEARN_ITERS, 0)


def test_all_trainable_modules_change_when_unfrozen(env, learned):
  """Counterpart of the frozen test: with every module trainable the vision tower does move."""
  before = leaves_by_module(env.params)
  after = leaves_by_module(learned.state.params)
  for module in ("vision", "merger"):
    assert any(not np.array_equal(a, b) for (_, a), (_, b) in zip(before[module], after[module]))


def test_minibatch_must_divide_completions(env, first_update):
  with pytest.raises(ValueError, match="do not split"):
    step(env, fresh_state(env.params, env.lm_only), first_update.batch, jax.random.key(0),
         optimizer=env.lm_only, minibatch=5)


# ------------------------------------------------------------------------------------------------
# optimizer: per-module learning rates, frozen modules and clipping (no model forward needed)
# ------------------------------------------------------------------------------------------------


def toy_params():
  """A small parameter tree with the model's module layout (the optimizer only sees paths)."""
  rng = np.random.default_rng(0)
  shapes = {"visual": {"patch_embed": {"w": (3, 4)}, "merger": {"w": (4,)}},
            "language_model": {"embed": (5, 2), "norm": (2,)}, "lm_head": {"w": (2, 5)}}
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def fake_grads(params, scale_by_module: dict[str, float]):
  """Deterministic gradient tree: leaf values in [-0.65, 0.85] times the module's scale."""
  def make(path, p):
    g = (np.arange(p.size, dtype=np.float32) % 7 - 3.0) / 4.0 + 0.1
    return jnp.asarray(g.reshape(p.shape) * scale_by_module[module_of(path)])
  return jax.tree_util.tree_map_with_path(make, params)


def test_lr_multipliers_scale_sgd_updates():
  lr = 0.1
  cfg = OptimizerConfig(name="sgd", lr=lr, weight_decay=0.0, max_grad_norm=0.0,
                        lr_multipliers=(("vision", 0.5),))
  opt = make_optimizer(cfg, 10, ("vision", "language_model"))
  params = toy_params()
  grads = fake_grads(params, {"vision": 1.0, "merger": 1.0, "language_model": 1.0})
  new, metrics = apply_gradients(init_state(params, opt), grads, jnp.float32(0.0), opt)
  assert float(metrics["update_ok"]) == 1.0
  expected_lr = {"vision": 0.5 * lr, "merger": 0.0, "language_model": lr}
  old_by, new_by, g_by = (leaves_by_module(t) for t in (params, new.params, grads))
  for module, mlr in expected_lr.items():
    assert old_by[module]
    for (name, old), (_, upd), (_, g) in zip(old_by[module], new_by[module], g_by[module]):
      np.testing.assert_allclose(upd - old, -mlr * g, rtol=1e-5, atol=1e-7, err_msg=name)


def test_clipping_ignores_gradients_of_frozen_modules():
  """Only trainable gradients count in the global norm: a huge vision gradient must not shrink the
  language-model update when the vision tower is frozen."""
  lr, max_norm = 0.1, 1.0
  cfg = OptimizerConfig(name="sgd", lr=lr, weight_decay=0.0, max_grad_norm=max_norm)
  opt = make_optimizer(cfg, 10, ("language_model",))
  params = toy_params()
  grads = fake_grads(params, {"vision": 1e3, "merger": 1e3, "language_model": 2.0})
  new, metrics = apply_gradients(init_state(params, opt), grads, jnp.float32(0.0), opt)
  g_lm = leaves_by_module(grads)["language_model"]
  lm_norm = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for _, g in g_lm))
  assert lm_norm > max_norm   # clipping is active
  # the reported norm is the trained modules' (before clipping), not the frozen tower's 1e3-scale one
  np.testing.assert_allclose(float(metrics["grad_norm"]), lm_norm, rtol=1e-5)
  for (name, old), (_, upd), (_, g) in zip(leaves_by_module(params)["language_model"],
                                           leaves_by_module(new.params)["language_model"], g_lm):
    np.testing.assert_allclose(upd - old, -lr * g * max_norm / lm_norm, rtol=1e-5, atol=1e-7,
                               err_msg=name)
  for module in ("vision", "merger"):
    for (name, old), (_, upd) in zip(leaves_by_module(params)[module],
                                     leaves_by_module(new.params)[module]):
      np.testing.assert_array_equal(upd, old, err_msg=name)


def test_module_labels_and_unknown_module():
  labels = module_labels({"visual": {"blocks": {"w": 0}, "merger": {"w": 0}},
                          "language_model": {"w": 0}, "lm_head": {"w": 0}})
  assert labels == {"visual": {"blocks": {"w": "vision"}, "merger": {"w": "merger"}},
                    "language_model": {"w": "language_model"}, "lm_head": {"w": "language_model"}}
  # Qwen3-VL: the learned position embedding is vision, the DeepStack mergers are mergers
  labels = module_labels({"visual": {"pos_embed": 0, "deepstack_merger_list": {0: {"w": 0}}}})
  assert labels == {"visual": {"pos_embed": "vision", "deepstack_merger_list": {0: {"w": "merger"}}}}
  with pytest.raises(ValueError, match="vison"):
    make_optimizer(OptimizerConfig(), 10, ("vison",))

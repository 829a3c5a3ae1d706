"""The cross-entropy objective and its update step (`vlm_jax.sft`): hand-computed token NLL and
normalisations, masked positions carry no gradient, the model-level loss matches a manual one, and
repeated steps on one batch lower the loss."""

from __future__ import annotations

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import build_reference, make_batch
from vlm_jax import models
from vlm_jax.config import OptimizerConfig
from vlm_jax.sft import SFTBatch, sft_loss_value, sft_step, token_nll
from vlm_jax.train_state import init_state, make_optimizer

LN2, LN3, LN5 = math.log(2), math.log(3), math.log(5)


# ------------------------------------------------------------------------------------------------
# pure loss math
# ------------------------------------------------------------------------------------------------


def test_token_nll_by_hand():
  # Position i's logits predict token i + 1; the last position predicts nothing.
  logits = jnp.asarray([
      [[0.0, 0.0, 0.0], [LN2, 0.0, 0.0], [9.0, 9.0, 9.0]],  # p(1)=1/3; p(0)=2/4
      [[0.0, LN3, 0.0], [0.0, 0.0, LN2], [-9.0, 0.0, 9.0]],  # p(0)=1/5; p(2)=2/4
  ])
  ids = jnp.asarray([[2, 1, 0], [0, 0, 2]])
  expected = [[LN3, LN2], [LN5, LN2]]
  np.testing.assert_allclose(token_nll(logits, ids), expected, rtol=1e-6)
  # invariant to a per-position shift of the logits; float32 even for bf16 logits
  np.testing.assert_allclose(token_nll(logits + 100.0, ids), expected, rtol=1e-5)
  assert token_nll(logits.astype(jnp.bfloat16), ids).dtype == jnp.float32


NLL = jnp.arange(1.0, 13.0).reshape(3, 4)
RAGGED = jnp.asarray([[1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]])


def test_token_normalisation_weighs_every_token_equally():
  loss, n_tok = sft_loss_value(NLL, RAGGED, "token")
  assert float(n_tok) == 3.0
  np.testing.assert_allclose(float(loss), (1 + 2 + 8) / 3, rtol=1e-6)


def test_sequence_normalisation_averages_rows_with_targets():
  loss, n_tok = sft_loss_value(NLL, RAGGED, "sequence")
  assert float(n_tok) == 3.0
  # row means 1.5 and 8; the row without targets is not counted
  np.testing.assert_allclose(float(loss), (1.5 + 8.0) / 2, rtol=1e-6)


@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_no_target_tokens_gives_zero_loss_and_zero_gradient(normalize):
  zero = jnp.zeros_like(RAGGED)
  loss, grad = jax.value_and_grad(lambda x: sft_loss_value(x, zero, normalize)[0])(NLL)
  assert float(loss) == 0.0
  assert not np.any(np.asarray(grad))


@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_masked_positions_get_no_gradient(normalize):
  """Pipeline convention: loss_mask[b, i] = 1 when token i is a target. Logits at position p
  predict token p + 1, so they get a gradient exactly where loss_mask[b, p + 1] == 1."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((2, 6, 11)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 11, (2, 6)))
  loss_mask = np.asarray([[0, 0, 1, 1, 0, 0],    # target in the middle, right padding after
                          [0, 0, 0, 0, 1, 1]])   # target at the end
  def loss(x):
    return sft_loss_value(token_nll(x, ids), jnp.asarray(loss_mask)[:, 1:], normalize)[0]
  grad_norm = np.abs(np.asarray(jax.grad(loss)(logits))).sum(-1)   # [B, L]
  predicts_target = np.zeros((2, 6), bool)
  predicts_target[:, :-1] = loss_mask[:, 1:] == 1
  assert np.all(grad_norm[~predicts_target] == 0.0)
  assert np.all(grad_norm[predicts_target] > 1e-4)


# ------------------------------------------------------------------------------------------------
# the model-level loss and the update step
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  path = tmp_path_factory.mktemp("sft_ref")
  build_reference(path, seed=0)
  model, params = models.from_pretrained(path)
  batch = make_batch([[(4, 4)], [], [(4, 4), (4, 4)]], padding="right", seed=3)
  valid = np.asarray(batch["attention_mask"]).astype(bool)
  loss_mask = np.zeros(valid.shape, np.float32)
  for b, n_targets in enumerate((3, 2, 4)):   # ragged: the last few real tokens of each row
    last = int(valid[b].sum())
    loss_mask[b, last - n_targets:last] = 1.0
  return SimpleNamespace(model=model, params=params, batch=batch, loss_mask=loss_mask)


def manual_loss(logits: np.ndarray, ids: np.ndarray, loss_mask: np.ndarray) -> float:
  """Token-mean NLL of the target tokens, each predicted from the previous position (float64)."""
  x = logits.astype(np.float64)
  logp = x - x.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  terms = [-logp[b, i - 1, ids[b, i]] for b in range(ids.shape[0]) for i in range(1, ids.shape[1])
           if loss_mask[b, i]]
  return float(np.mean(terms))


@pytest.fixture(scope="module")
def trained(env):
  opt = make_optimizer(OptimizerConfig(lr=1e-2, weight_decay=0.0), 100,
                       ("vision", "merger", "language_model"))
  state = init_state(jax.tree.map(jnp.copy, env.params), opt)
  batch = SFTBatch(env.model.prepare(env.batch), jnp.asarray(env.loss_mask))
  history = []
  for _ in range(8):
    state, metrics = sft_step(state, batch, graphdef=env.model.graphdef, optimizer=opt)
    history.append({k: float(v) for k, v in metrics.items()})
  return SimpleNamespace(history=history, state=state)


def test_first_step_loss_matches_manual_loss(env, trained):
  logits = np.asarray(models.forward(env.model, env.params, env.batch))
  expected = manual_loss(logits, np.asarray(env.batch["input_ids"]), env.loss_mask)
  first = trained.history[0]
  np.testing.assert_allclose(first["loss"], expected, rtol=1e-4)
  assert first["target_tokens"] == 3 + 2 + 4
  # Counting the prompt tokens as well would give a different loss (the check can fail).
  everything = np.asarray(env.batch["attention_mask"], np.float32)
  assert abs(manual_loss(logits, np.asarray(env.batch["input_ids"]), everything) - expected) > 1e-2


def test_repeated_steps_lower_the_loss(trained):
  losses = [h["loss"] for h in trained.history]
  assert all(h["update_ok"] == 1.0 for h in trained.history)
  assert int(trained.state.step) == len(losses) and int(trained.state.skipped) == 0
  assert losses[-1] < 0.5 * losses[0], losses


# ------------------------------------------------------------------------------------------------
# the training programs' compile options
# ------------------------------------------------------------------------------------------------


def test_train_compiler_options_are_named_only_for_the_jax_line_they_were_measured_on(monkeypatch):
  import jaxlib

  from vlm_jax import train_state

  monkeypatch.setattr(jaxlib, "__version__", "0.10.7")
  assert train_state.train_compiler_options() == {
      "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
  for other in ("0.9.1", "0.11.0", "1.0.0"):  # an unknown option would fail every compile
    monkeypatch.setattr(jaxlib, "__version__", other)
    assert train_state.train_compiler_options() == {}


def test_the_installed_xla_accepts_the_training_compile_options_and_computes_the_same():
  """The options `sft_step` / `grpo_step` / `score_responses` compile with are accepted by this JAX
  (a renamed option would fail every compile) and leave a gradient of transposed matmuls unchanged."""
  from vlm_jax.train_state import train_compiler_options

  options = train_compiler_options()
  if not options:
    pytest.skip(f"no training compile options are named for jaxlib {jax.lib.__version__}")

  def loss(w, x):
    return jnp.sum(jax.nn.silu(x @ w[0]) @ w[1])

  rng = np.random.default_rng(0)
  w = tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((32, 64), (64, 32)))
  x = jnp.asarray(rng.normal(size=(48, 32)), jnp.float32)
  lowered = jax.jit(jax.grad(loss)).lower(w, x)
  default = lowered.compile()(w, x)
  tuned = lowered.compile(options)(w, x)
  for a, b in zip(default, tuned):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)

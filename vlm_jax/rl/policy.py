"""Teacher-forced scoring of sampled responses, and the jitted GRPO update step.

A `RolloutBatch` holds B prompts (model inputs, images once per prompt) and N = B * G responses. The
prompt embedding (vision tower included) is computed once per prompt and gathered for its G
responses, so images are never encoded G times.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.rl import grpo
from vlm_jax.train_state import TrainState, apply_gradients


class RolloutBatch(NamedTuple):
    prompt: Any  # ModelInputs for the B prompts (left aligned)
    responses_NT: jax.Array  # int32 generated tokens
    mask_NT: jax.Array  # float32 1 on response tokens that count in the loss
    old_logp_NT: jax.Array  # float32 sampler log-probs (policy before this update)
    ref_logp_NT: jax.Array  # float32 reference log-probs (zeros when kl_coef == 0)
    advantages_N: jax.Array  # float32


def response_logprobs(model, prompt, responses_NT, rows_n, group_size: int, *, entropy=False):
    """log p(response token) [n, T] for completions `rows_n` (indices into N) under `model`."""
    L = prompt.input_ids_BL.shape[1]
    T = responses_NT.shape[1]
    prompt_of = rows_n // group_size
    x_prompt = model.embed(prompt.input_ids_BL, prompt.vision)[prompt_of]  # [n, L, D]
    resp = responses_NT[rows_n]
    x = jnp.concatenate([x_prompt, model.embed(resp, None)], axis=1)
    pos_prompt = prompt.positions_3BL[:, prompt_of]  # [3, n, L]
    start = pos_prompt.max(axis=(0, 2)) + 1
    pos_resp = jnp.broadcast_to((start[:, None] + jnp.arange(T))[None], (3, len(rows_n), T))
    positions = jnp.concatenate([pos_prompt, pos_resp], axis=2)
    valid = jnp.concatenate(
        [prompt.attention_mask_BL[prompt_of] > 0, jnp.ones((len(rows_n), T), bool)], axis=1
    )
    S = L + T
    mask = jnp.tril(jnp.ones((S, S), bool))[None] & valid[:, None, :]
    h, _ = model.decode(x, positions, mask)
    logits = model.logits(h[:, L - 1 : S - 1]).astype(jnp.float32)  # predicts resp tokens
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_all, resp[..., None], axis=-1)[..., 0]
    if not entropy:
        return logp, None
    return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "group_size"))
def score_responses(graphdef, params, prompt, responses_NT, *, group_size: int):
    """Log-probs of all N responses (e.g. under the frozen reference model)."""
    model = nnx.merge(graphdef, params)
    rows = jnp.arange(responses_NT.shape[0])
    return response_logprobs(model, prompt, responses_NT, rows, group_size)[0]


def _grpo_minibatch_loss(params, graphdef, batch: RolloutBatch, rows, group_size, loss_cfg):
    model = nnx.merge(graphdef, params)
    logp, ent = response_logprobs(model, batch.prompt, batch.responses_NT, rows, group_size, entropy=True)
    mask = batch.mask_NT[rows]
    ref = batch.ref_logp_NT[rows] if loss_cfg.kl_coef > 0 else None
    loss, metrics = grpo.grpo_loss(
        logp, batch.old_logp_NT[rows], ref, batch.advantages_N[rows], mask, loss_cfg
    )
    metrics["entropy"] = grpo.masked_mean(ent, mask)
    return loss, metrics


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "optimizer", "group_size", "loss_cfg", "mu", "minibatch"),
    donate_argnums=(0,),
)
def grpo_step(
    state: TrainState,
    batch: RolloutBatch,
    rng,
    *,
    graphdef,
    optimizer,
    group_size: int,
    loss_cfg: grpo.GRPOLossConfig,
    mu: int = 1,
    minibatch: int = 0,
):
    """`mu` passes over the rollout batch, each split into shuffled mini-batches of `minibatch`
    completions (0 = all), one guarded optimizer update per mini-batch. Returns the new state and
    the metrics averaged over updates."""
    N = batch.responses_NT.shape[0]
    mb = N if minibatch in (0, None) else minibatch
    if N % mb:
        raise ValueError(f"{N} completions do not split into mini-batches of {mb}")
    n_mb = N // mb
    perms = jnp.stack(
        [
            jax.random.permutation(jax.random.fold_in(rng, e), N) if n_mb > 1 else jnp.arange(N)
            for e in range(mu)
        ]
    )
    rows_all = perms.reshape(mu * n_mb, mb)
    grad_fn = jax.value_and_grad(_grpo_minibatch_loss, has_aux=True)

    def update(state, rows):
        (loss, metrics), grads = grad_fn(state.params, graphdef, batch, rows, group_size, loss_cfg)
        state, upd = apply_gradients(state, grads, loss, optimizer)
        return state, {**metrics, **upd}

    state, metrics = jax.lax.scan(update, state, rows_all)
    return state, jax.tree.map(jnp.mean, metrics)

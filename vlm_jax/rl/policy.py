"""Teacher-forced scoring of sampled responses, and the jitted GRPO update step.

A `RolloutBatch` holds B prompts (model inputs, images once per prompt, laid out per row) and N = B * G
responses. The prompt embedding (vision tower included) is computed once per prompt and gathered for
its G responses, so images are never encoded G times; a GRPO micro-batch encodes only its own
prompts' images. With `share_prompt` the decoder also runs each distinct prompt once per
micro-batch / scoring chunk, its completions attending to its keys and values
(`shared_response_logprobs`), instead of once per [prompt + completion] row. Under a mesh, rows
stay on the batch shard they were placed on: mini- and micro-batches take the same number of rows
from every shard.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vlm_jax import sharding as shd
from vlm_jax.logprobs import batch_shards, token_logprobs
from vlm_jax.models import lora
from vlm_jax.rl import grpo
from vlm_jax.shapes import chunk_size
from vlm_jax.train_state import TrainState, apply_gradients, train_compiler_options


class RolloutBatch(NamedTuple):
    prompt: Any  # ModelInputs for the B prompts (left aligned)
    responses_NT: jax.Array  # int32 generated tokens
    mask_NT: jax.Array  # float32 1 on response tokens that count in the loss
    old_logp_NT: jax.Array  # float32 sampler log-probs (policy before this update)
    ref_logp_NT: jax.Array  # float32 reference log-probs (zeros when kl_coef == 0)
    advantages_N: jax.Array  # float32


def response_logprobs(model, prompt, responses_nT, prompt_of_n, *, entropy=False, constrain=None,
                      x_prompt=None):
    """log p(response token) [n, T] (and the entropy) of completions `responses_nT` whose prompts are
    rows `prompt_of_n` of `prompt`, under `model`. Attention is causal over prompt + response with
    the prompt's padding masked (no [S, S] mask); log-probs are computed per sequence chunk.
    `x_prompt` [n, L, D]: the prompts' embeddings when already computed (images encoded)."""
    constrain = constrain or (lambda a: a)
    L = prompt.input_ids_BL.shape[1]
    n, T = responses_nT.shape
    if x_prompt is None:  # embed just these rows (the vision inputs are laid out per row)
        vision = None if prompt.vision is None else jax.tree.map(lambda a: a[prompt_of_n], prompt.vision)
        x_prompt = model.embed(prompt.input_ids_BL[prompt_of_n], vision, constrain)
    x = constrain(jnp.concatenate([x_prompt, model.embed(responses_nT, None)], axis=1))
    pos_prompt = prompt.positions_3BL[:, prompt_of_n]  # [3, n, L]
    start = pos_prompt.max(axis=(0, 2)) + 1
    pos_resp = jnp.broadcast_to((start[:, None] + jnp.arange(T))[None], (3, n, T))
    positions = jnp.concatenate([pos_prompt, pos_resp], axis=2)
    valid = jnp.concatenate([prompt.attention_mask_BL[prompt_of_n] > 0, jnp.ones((n, T), bool)], axis=1)
    h, _ = model.decode(x, positions, None, key_valid_BS=valid, constrain=constrain)
    # position L - 1 + t predicts response token t
    return token_logprobs(
        model.logits, h[:, L - 1 : L + T - 1], responses_nT, chunk=model.options.logits_chunk, entropy=entropy
    )


def shared_response_logprobs(model, prompt, responses_nT, prompt_local_sk, shards: int, *, num_prompts: int,
                             entropy=False, constrain=None, x_all=None):
    """`response_logprobs` with each distinct prompt computed once for all its completions
    (`decode_shared`): completion rows `responses_nT` [shards * k, T] of prompts `prompt_local_sk`
    [shards, k] (local rows of each contiguous row shard of `prompt`), at most `num_prompts`
    (static, `distinct_prompts`) distinct ones per shard. The decoder runs shards * U prompt rows
    of length L and n response rows of length T instead of n rows of L + T; each response token
    sees the same keys, positions and mask, so the values equal `response_logprobs`' (tested), and
    in the backward pass a prompt's activations receive the sum over its completions. `x_all`
    [B, L, D]: all prompts' embeddings when already computed. Gathers stay within the shard."""
    constrain = constrain or (lambda a: a)
    B = prompt.input_ids_BL.shape[0]
    n, T = responses_nT.shape
    uniq_sU, inv_sk = prompt_groups(prompt_local_sk, B // shards, num_prompts)
    rows = functools.partial(_take_rows, shards=shards, idx_sk=uniq_sU)  # prompt rows [shards * U]
    take = functools.partial(_take_rows, shards=shards, idx_sk=inv_sk)  # prompt rows -> completion rows
    if x_all is None:
        vision = None if prompt.vision is None else jax.tree.map(rows, prompt.vision)
        x_prompt = model.embed(rows(prompt.input_ids_BL), vision, constrain)
    else:
        x_prompt = rows(x_all)
    pos_prompt = rows(prompt.positions_3BL, axis=1)  # [3, shards * U, L]
    start = take(pos_prompt.max(axis=(0, 2)) + 1)
    pos_resp = jnp.broadcast_to((start[:, None] + jnp.arange(T))[None], (3, n, T))
    h_prompt, h_resp = model.decode_shared(
        x_prompt, pos_prompt, rows(prompt.attention_mask_BL) > 0, model.embed(responses_nT, None), pos_resp, take,
        constrain=constrain,
    )
    # the prompt's last position predicts response token 0, response position t - 1 token t
    h = jnp.concatenate([take(h_prompt[:, -1:]), h_resp[:, : T - 1]], axis=1)
    return token_logprobs(model.logits, h, responses_nT, chunk=model.options.logits_chunk, entropy=entropy)


def _take_rows(x, shards: int, idx_sk, axis: int = 0):
    """Rows `idx_sk` [shards, k] (indices within each contiguous row shard) of `x` along `axis`:
    a gather that stays on each shard's devices. Returns [shards * k] rows along `axis`."""
    x = jnp.moveaxis(x, axis, 0)
    R = x.shape[0]
    xs = x.reshape(shards, R // shards, *x.shape[1:])
    idx = idx_sk.reshape(idx_sk.shape + (1,) * (xs.ndim - 2))
    out = jnp.take_along_axis(xs, idx, axis=1)
    return jnp.moveaxis(out.reshape(-1, *x.shape[1:]), 0, axis)


def distinct_prompts(rows: int, per_shard: int, group_size: int, *, contiguous: bool) -> int:
    """A static bound on the distinct prompts among `rows` completions of one shard (of `per_shard`
    completions, G = `group_size` per prompt, a prompt's completions adjacent): the blocks
    [s, s + rows) for s = 0, rows, 2 * rows, ... when `contiguous` (unshuffled micro-batches,
    scoring chunks), else any `rows` completions."""
    B_local = per_shard // group_size
    if not contiguous:
        return min(rows, B_local)
    return min(B_local, max((s + rows - 1) // group_size - s // group_size + 1 for s in range(0, per_shard, rows)))


def prompt_groups(prompt_local_sk, B_local: int, size: int):
    """(uniq_sU, inv_sk): per shard, the distinct prompts (local rows) named in `prompt_local_sk`
    [shards, k] and each entry's index among them, `size` >= the distinct count per shard (static;
    all B_local prompts in order when size >= B_local, unused slots repeat a named prompt)."""
    shards, k = prompt_local_sk.shape
    if size >= B_local:
        return jnp.broadcast_to(jnp.arange(B_local), (shards, B_local)), prompt_local_sk
    uniq_sU, inv_sk = jax.vmap(lambda p: jnp.unique(p, size=size, fill_value=p[0], return_inverse=True))(
        prompt_local_sk
    )
    return uniq_sU, inv_sk.reshape(shards, k)


def embed_prompts(model, prompt, prompt_local_sk, shards: int, constrain=None):
    """Embeddings [shards * k, L, D] of the prompts `prompt_local_sk` [shards, k] (rows within each
    shard), each distinct prompt of a shard embedded (its images encoded) once: all the shard's
    prompts when k covers them, else the at most k distinct ones it names. Gathers stay within the
    shard."""
    B_local = prompt.input_ids_BL.shape[0] // shards
    uniq_sU, inv_sk = prompt_groups(prompt_local_sk, B_local, prompt_local_sk.shape[1])
    rows = functools.partial(_take_rows, shards=shards, idx_sk=uniq_sU)
    vision = None if prompt.vision is None else jax.tree.map(rows, prompt.vision)
    x_U = model.embed(rows(prompt.input_ids_BL), vision, constrain)
    return _take_rows(x_U, shards, inv_sk)


def _select(batch: "RolloutBatch", idx_sk, shards: int, group_size: int):
    """The completions `idx_sk` (local rows per shard) of a rollout batch, with their prompts
    (prompt rows gathered the same way; per shard, local prompt = local row // group size)."""
    take = functools.partial(_take_rows, shards=shards, idx_sk=idx_sk)
    B = batch.prompt.input_ids_BL.shape[0]
    prompt_local = idx_sk // group_size  # [shards, k]
    prompt_global = (jnp.arange(shards)[:, None] * (B // shards) + prompt_local).reshape(-1)
    fields = dict(
        responses=take(batch.responses_NT),
        mask=take(batch.mask_NT),
        old=take(batch.old_logp_NT),
        ref=take(batch.ref_logp_NT),
        adv=take(batch.advantages_N),
    )
    return fields, prompt_global


@functools.partial(jax.jit, static_argnames=("graphdef", "group_size", "chunk", "mesh", "share_prompt"),
                   compiler_options=train_compiler_options())
def score_responses(graphdef, params, prompt, responses_NT, *, group_size: int, chunk: int = 0, mesh=None,
                    share_prompt: bool = False):
    """Log-probs of all N responses (e.g. under the frozen reference model), `chunk` completions
    at a time (0 = all at once): memory set by the chunk, not by N. `share_prompt`: each chunk's
    distinct prompts run once for their completions (`shared_response_logprobs`; same values)."""
    model = lora.bind(graphdef, params)
    constrain = shd.batch_constraint(mesh)
    N = responses_NT.shape[0]
    B = prompt.input_ids_BL.shape[0]
    shards = batch_shards(mesh, N, B)
    C = chunk_size(N // shards, chunk // shards if chunk else 0)
    n_chunks = N // shards // C
    # images: all prompts' at once when one chunk scores everything, else each chunk encodes only its
    # own prompts (once each; a prompt whose group straddles two chunks is encoded in both), so the
    # vision tower's memory is set by the chunk too
    x_all = None
    if prompt.vision is not None and n_chunks == 1:
        x_all = model.embed(prompt.input_ids_BL, prompt.vision, constrain)

    num_prompts = distinct_prompts(C, N // shards, group_size, contiguous=True)

    def one(idx_sk):
        resp = _take_rows(responses_NT, shards, idx_sk)
        if share_prompt:
            return shared_response_logprobs(model, prompt, resp, idx_sk // group_size, shards,
                                            num_prompts=num_prompts, constrain=constrain, x_all=x_all)[0]
        prompt_global = (jnp.arange(shards)[:, None] * (B // shards) + idx_sk // group_size).reshape(-1)
        if prompt.vision is None:
            x_prompt = None
        elif x_all is not None:
            x_prompt = _take_rows(x_all, shards, idx_sk // group_size)
        else:
            x_prompt = embed_prompts(model, prompt, idx_sk // group_size, shards, constrain)
        return response_logprobs(model, prompt, resp, prompt_global, constrain=constrain, x_prompt=x_prompt)[0]

    local = jnp.arange(N // shards).reshape(n_chunks, 1, C)
    idx = jnp.broadcast_to(local, (n_chunks, shards, C))
    if n_chunks == 1:
        return one(idx[0])
    out = jax.lax.map(one, idx)  # [n_chunks, shards * C, T]: chunk c holds local rows c*C.. of every shard
    T = responses_NT.shape[1]
    out = out.reshape(n_chunks, shards, C, T).transpose(1, 0, 2, 3)
    return out.reshape(N, T)


def _grpo_micro_loss(params, graphdef, batch: RolloutBatch, idx_sk, weights, token_weights, shards,
                     group_size, loss_cfg, mesh, frozen=None, share_prompts: int = 0):
    """The loss of one micro-batch. `share_prompts` > 0: each distinct prompt runs once for its
    completions in the micro-batch, at most that many per shard (`shared_response_logprobs`)."""
    model = lora.bind(graphdef, lora.with_adapters(frozen, params))
    f, prompt_rows = _select(batch, idx_sk, shards, group_size)
    constrain = shd.batch_constraint(mesh)
    if share_prompts:  # the micro-batch's prompts run (and go through the vision tower) once each
        logp, ent = shared_response_logprobs(model, batch.prompt, f["responses"], idx_sk // group_size, shards,
                                             num_prompts=share_prompts, entropy=True, constrain=constrain)
    else:
        # only this micro-batch's prompts go through the vision tower, each once
        x_prompt = embed_prompts(model, batch.prompt, idx_sk // group_size, shards, constrain)
        logp, ent = response_logprobs(
            model, batch.prompt, f["responses"], prompt_rows, entropy=True, constrain=constrain, x_prompt=x_prompt,
        )
    ref = f["ref"] if loss_cfg.kl_coef > 0 else None
    loss, metrics = grpo.grpo_loss(
        logp, f["old"], ref, f["adv"], f["mask"], loss_cfg, weights_BT=weights, token_weights_BT=token_weights
    )
    metrics["entropy"] = jnp.sum(jnp.where(f["mask"] != 0, ent, 0.0) * token_weights)
    return loss, metrics


# metrics summed over micro-batches (weighted shares) and those reduced by max / min
_MAX_METRICS, _MIN_METRICS = ("ratio/max",), ("ratio/min",)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "optimizer", "group_size", "loss_cfg", "mu", "minibatch", "micro_batch",
                     "mesh", "share_prompt"),
    donate_argnums=(0,),
    compiler_options=train_compiler_options(),
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
    micro_batch: int = 0,
    mesh=None,
    frozen: lora.Frozen | None = None,
    share_prompt: bool = False,
):
    """`mu` passes over the rollout batch, each split into shuffled mini-batches of `minibatch`
    completions (0 = all), one guarded optimizer update per mini-batch; each mini-batch's gradient is
    accumulated over micro-batches of `micro_batch` completions (0 = the mini-batch), which changes
    memory, not the result. On a mesh, rows are shuffled within each batch shard and every mini- and
    micro-batch takes the same number of rows from every shard, so no row moves between devices.
    With `frozen` (a LoRA stage) `state.params` are the adapters, the only thing differentiated and
    updated. `share_prompt`: each distinct prompt of a micro-batch runs through the decoder once
    for its completions there (`shared_response_logprobs`; the same loss and gradients, less work
    when a micro-batch holds several completions of one prompt, as unshuffled ones do). Returns the
    new state and the metrics averaged over updates."""
    N = batch.responses_NT.shape[0]
    B = batch.prompt.input_ids_BL.shape[0]
    mb = N if minibatch in (0, None) else minibatch
    if N % mb:
        raise ValueError(f"{N} completions do not split into mini-batches of {mb}")
    micro = mb if micro_batch in (0, None) else micro_batch
    if mb % micro:
        raise ValueError(f"mini-batches of {mb} completions do not split into micro-batches of {micro}")
    n_mb, n_micro = N // mb, mb // micro
    shards = batch_shards(mesh, N, B, mb, micro)
    per = N // shards  # rows per shard
    if n_mb > 1:
        # one shuffle per pass; on several shards, one per shard (within its own rows)
        keys = [jax.random.fold_in(rng, e) for e in range(mu)]
        if shards == 1:
            perms = jnp.stack([jax.random.permutation(k, N) for k in keys])[:, None]
        else:
            perms = jnp.stack(
                [jax.vmap(lambda kk: jax.random.permutation(kk, per))(jax.random.split(k, shards)) for k in keys]
            )
    else:
        perms = jnp.broadcast_to(jnp.arange(per), (mu, shards, per))
    # [updates, micro-batches, shards, rows per shard in a micro-batch]
    idx_all = perms.reshape(mu, shards, n_mb, n_micro, micro // shards)
    idx_all = idx_all.transpose(0, 2, 3, 1, 4).reshape(mu * n_mb, n_micro, shards, micro // shards)
    share = distinct_prompts(micro // shards, per, group_size, contiguous=n_mb == 1) if share_prompt else 0
    grad_fn = jax.value_and_grad(functools.partial(_grpo_micro_loss, share_prompts=share), has_aux=True)

    def update(state, idx_u):  # idx_u: [n_micro, shards, k] one mini-batch
        idx_mb = jnp.moveaxis(idx_u, 0, 1).reshape(shards, -1)  # the mini-batch's rows per shard
        mask_mb = _take_rows(batch.mask_NT, shards, idx_mb)
        # weights over the whole mini-batch, then split the way the micro-batches take rows
        w = grpo.aggregate_weights(mask_mb, mode=loss_cfg.loss_agg, norm_length=loss_cfg.norm_length)
        tw = grpo.aggregate_weights(mask_mb, mode="token_mean")
        split = lambda a: jnp.moveaxis(a.reshape(shards, n_micro, -1, a.shape[-1]), 1, 0).reshape(  # noqa: E731
            n_micro, -1, a.shape[-1]
        )

        def micro_step(acc, xs):
            idx_sk, w_u, tw_u = xs
            (loss, metrics), grads = grad_fn(
                state.params, graphdef, batch, idx_sk, w_u, tw_u, shards, group_size, loss_cfg, mesh, frozen
            )
            g_acc, m_acc = acc
            g_acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), g_acc, grads)
            metrics = {**metrics, "loss": loss}
            m_acc = {
                k: (jnp.maximum(m_acc[k], v) if k in _MAX_METRICS else
                    jnp.minimum(m_acc[k], v) if k in _MIN_METRICS else m_acc[k] + v)
                for k, v in metrics.items()
            }
            return (g_acc, m_acc), None

        if n_micro == 1:
            (loss, metrics), grads = grad_fn(
                state.params, graphdef, batch, idx_u[0], w, tw, shards, group_size, loss_cfg, mesh, frozen
            )
        else:
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            m0 = {k: jnp.full((), -jnp.inf if k in _MAX_METRICS else jnp.inf if k in _MIN_METRICS else 0.0)
                  for k in grpo.LOSS_METRICS + ("entropy",)}
            (grads, metrics), _ = jax.lax.scan(micro_step, (zeros, m0), (idx_u, split(w), split(tw)))
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
            loss = metrics["loss"]
        state, upd = apply_gradients(state, grads, loss, optimizer)
        return state, {**metrics, **upd}

    state, metrics = jax.lax.scan(update, state, idx_all)
    return state, jax.tree.map(jnp.mean, metrics)

"""Length-grouped reference scoring and GRPO update: work that follows the real lengths.

`policy.grpo_step` and `policy.score_responses` run every completion at `max_new_tokens` response
positions and every prompt at the rollout's longest prompt bucket. Here (`grpo.length_groups` > 0)
each mini-batch's completions are sorted by response length (within each batch shard: rows never
move between devices) and cut into `length_groups` micro-batches; a micro-batch's responses are
cut to its own length bucket (a multiple of `ceil(max_new_tokens / LENGTH_BUCKETS)`) and its
prompts to its own prompt bucket (left padding dropped). Each (length, prompt) bucket pair
compiles once. The loss weights come from the whole mini-batch (`grpo.aggregate_weights`), so the
summed gradient is the padded path's up to fp32 round-off; positions past a row's length carry
zero weight in both. The micro-batches run as separate jitted calls (their shapes differ), their
gradients summed in place, then one guarded optimizer update per mini-batch, as in `grpo_step`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import sharding as shd
from vlm_jax.logprobs import batch_shards
from vlm_jax.models import lora
from vlm_jax.rl import grpo
from vlm_jax.rl.policy import (_MAX_METRICS, _MIN_METRICS, RolloutBatch, _take_rows, embed_prompts,
                               response_logprobs, shared_response_logprobs)
from vlm_jax.shapes import bucket
from vlm_jax.train_state import apply_gradients, train_compiler_options

LENGTH_BUCKETS = 8  # response-length buckets: multiples of ceil(max_new_tokens / 8)


def length_bucket(n: int, cap: int, buckets: int = LENGTH_BUCKETS) -> int:
    """The smallest multiple of `ceil(cap / buckets)` that holds `n` tokens, at most `cap`."""
    step = -(-cap // buckets)
    return int(min(cap, max(step, -(-n // step) * step)))


def mask_lengths(mask_NT) -> np.ndarray:
    """Each row's last counted position + 1 (host), from a loss mask [N, T]."""
    mask = np.asarray(shd.to_host(mask_NT)) != 0
    return np.where(mask.any(1), mask.shape[1] - np.argmax(mask[:, ::-1], axis=1), 0)


def plan_groups(lengths_N, prompt_len_B, rows_sk, groups: int, *, group_size: int, cap: int, L: int,
                prompt_buckets) -> list[tuple[np.ndarray, int, int]]:
    """(rows [shards, k], response bucket T, prompt bucket L) per micro-batch of the completions
    `rows_sk` (local rows of each shard): each shard's rows sorted by length (longest first), the
    j-th micro-batch taking the j-th `k` of every shard; T and L fit its longest row of any shard."""
    shards, m = rows_sk.shape
    if m % groups:
        raise ValueError(f"{m} completions per shard do not split into {groups} length groups")
    k = m // groups
    lens = np.asarray(lengths_N).reshape(shards, -1)
    plen = np.asarray(prompt_len_B).reshape(shards, -1)
    mine = np.take_along_axis(lens, rows_sk, 1)
    order = np.argsort(-mine, axis=1, kind="stable")
    sorted_sk = np.take_along_axis(rows_sk, order, 1)
    out = []
    for j in range(groups):
        idx = sorted_sk[:, j * k:(j + 1) * k]
        T = length_bucket(int(np.take_along_axis(lens, idx, 1).max()), cap)
        longest = int(np.take_along_axis(plen, idx // group_size, 1).max())
        out.append((idx.astype(np.int32), T, min(L, bucket(longest, prompt_buckets))))
    return out


def _logprobs(model, prompt, responses_NT, idx_sk, *, T: int, L: int, shards: int, group_size: int,
              share: bool, constrain, entropy: bool):
    """Log-probs (and entropies) [shards * k, T] of completions `idx_sk` cut to T response tokens,
    their distinct prompts gathered (within each shard) and cut to their last L positions."""
    B_local = prompt.input_ids_BL.shape[0] // shards
    k = idx_sk.shape[1]
    U = min(k, B_local)
    uniq_sU, inv_sk = jax.vmap(lambda p: jnp.unique(p, size=U, fill_value=p[0], return_inverse=True))(
        idx_sk // group_size)
    inv_sk = inv_sk.reshape(shards, k)
    rows = functools.partial(_take_rows, shards=shards, idx_sk=uniq_sU)
    sub = prompt._replace(
        input_ids_BL=rows(prompt.input_ids_BL)[:, -L:],
        attention_mask_BL=rows(prompt.attention_mask_BL)[:, -L:],
        positions_3BL=rows(prompt.positions_3BL, axis=1)[:, :, -L:],
        vision=None if prompt.vision is None else jax.tree.map(rows, prompt.vision),
    )
    resp = _take_rows(responses_NT, shards, idx_sk)[:, :T]
    if share:
        return shared_response_logprobs(model, sub, resp, inv_sk, shards, num_prompts=U, entropy=entropy,
                                        constrain=constrain)
    x_prompt = None if sub.vision is None else embed_prompts(model, sub, inv_sk, shards, constrain)
    prompt_rows = (jnp.arange(shards)[:, None] * U + inv_sk).reshape(-1)
    return response_logprobs(model, sub, resp, prompt_rows, entropy=entropy, constrain=constrain, x_prompt=x_prompt)


def work(lengths_N, prompt_len_B, groups: int, *, group_size: int, cap: int, L: int, prompt_buckets,
         share: bool) -> dict:
    """Positions one pass over all N completions computes in `groups` length groups (one shard),
    and how many are real tokens: prompt (each distinct prompt of a group once with `share`, else
    once per completion) and response positions."""
    lengths_N, prompt_len_B = np.asarray(lengths_N), np.asarray(prompt_len_B)
    rows = np.arange(len(lengths_N))[None]
    out = dict(prompt_real=0, prompt_positions=0, response_real=int(lengths_N.sum()), response_positions=0)
    for idx, T, Lb in plan_groups(lengths_N, prompt_len_B, rows, groups, group_size=group_size, cap=cap, L=L,
                                  prompt_buckets=prompt_buckets):
        prompts = np.unique(idx // group_size) if share else (idx // group_size).ravel()
        out["prompt_real"] += int(prompt_len_B[prompts].sum())
        out["prompt_positions"] += len(prompts) * Lb
        out["response_positions"] += idx.size * T
    return out


_STATIC = ("graphdef", "T", "L", "shards", "group_size", "mesh", "share")


@functools.partial(jax.jit, static_argnames=_STATIC, compiler_options=train_compiler_options())
def _score_group(params, prompt, responses_NT, idx_sk, *, graphdef, T, L, shards, group_size, mesh, share):
    model = lora.bind(graphdef, params)
    return _logprobs(model, prompt, responses_NT, idx_sk, T=T, L=L, shards=shards, group_size=group_size,
                     share=share, constrain=shd.batch_constraint(mesh), entropy=False)[0]


@functools.partial(jax.jit, static_argnames=("shards",), donate_argnums=(0,))
def _scatter(out_NT, idx_sk, vals_nT, *, shards: int):
    """`out_NT` with rows `idx_sk` (local rows per shard) set to `vals_nT` (zero-padded to T)."""
    N, T = out_NT.shape
    vals = jnp.pad(vals_nT, ((0, 0), (0, T - vals_nT.shape[1]))).reshape(shards, -1, T)
    s = jnp.arange(shards)[:, None]
    return out_NT.reshape(shards, N // shards, T).at[s, idx_sk].set(vals).reshape(N, T)


def score_grouped(graphdef, params, prompt, responses_NT, lengths_N, *, groups: int, group_size: int,
                  prompt_buckets, mesh=None, share_prompt: bool = False):
    """`policy.score_responses` with the completions in `groups` length groups (`plan_groups`):
    the same log-probs [N, T] (0 past each group's bucket, where the padded path's are unused)."""
    N, cap = responses_NT.shape
    B, L = prompt.input_ids_BL.shape
    shards = batch_shards(mesh, N, B)
    prompt_len = np.asarray(shd.to_host(prompt.attention_mask_BL)).sum(-1)
    rows = np.broadcast_to(np.arange(N // shards), (shards, N // shards))
    out = jnp.zeros((N, cap), jnp.float32)
    if mesh is not None:
        out = shd.shard_batch(np.zeros((N, cap), np.float32), mesh)
    for idx, T, Lb in plan_groups(lengths_N, prompt_len, rows, groups, group_size=group_size, cap=cap, L=L,
                                  prompt_buckets=prompt_buckets):
        vals = _score_group(params, prompt, responses_NT, idx, graphdef=graphdef, T=T, L=Lb, shards=shards,
                            group_size=group_size, mesh=mesh, share=share_prompt)
        out = _scatter(out, idx, vals, shards=shards)
    return out


@functools.partial(jax.jit, static_argnames=("shards", "mode", "norm_length"))
def _weights(mask_NT, idx_sk, *, shards: int, mode: str, norm_length):
    """The loss weights and token-mean weights [N, T] of the mini-batch `idx_sk` (0 elsewhere)."""
    N, T = mask_NT.shape
    mask = _take_rows(mask_NT, shards, idx_sk)
    s = jnp.arange(shards)[:, None]
    put = lambda w: jnp.zeros((shards, N // shards, T), jnp.float32).at[s, idx_sk].set(  # noqa: E731
        w.reshape(shards, -1, T)).reshape(N, T)
    return (put(grpo.aggregate_weights(mask, mode=mode, norm_length=norm_length)),
            put(grpo.aggregate_weights(mask, mode="token_mean")))


@functools.partial(jax.jit, static_argnames=_STATIC + ("loss_cfg",), compiler_options=train_compiler_options())
def _micro_grad(params, batch: RolloutBatch, idx_sk, w_NT, tw_NT, frozen, *, graphdef, T, L, shards,
                group_size, mesh, share, loss_cfg):
    def loss_fn(p):
        model = lora.bind(graphdef, lora.with_adapters(frozen, p))
        take = lambda a: _take_rows(a, shards, idx_sk)[:, :T]  # noqa: E731
        logp, ent = _logprobs(model, batch.prompt, batch.responses_NT, idx_sk, T=T, L=L, shards=shards,
                              group_size=group_size, share=share, constrain=shd.batch_constraint(mesh),
                              entropy=True)
        mask, tw = take(batch.mask_NT), take(tw_NT)
        ref = take(batch.ref_logp_NT) if loss_cfg.kl_coef > 0 else None
        loss, metrics = grpo.grpo_loss(logp, take(batch.old_logp_NT), ref, _take_rows(batch.advantages_N, shards, idx_sk),
                                       mask, loss_cfg, weights_BT=take(w_NT), token_weights_BT=tw)
        metrics["entropy"] = jnp.sum(jnp.where(mask != 0, ent, 0.0) * tw)
        return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return jax.tree.map(lambda g: g.astype(jnp.float32), grads), {**metrics, "loss": loss}


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _accumulate(g_acc, m_acc, grads, metrics):
    g = jax.tree.map(jnp.add, g_acc, grads)
    m = {k: (jnp.maximum(m_acc[k], v) if k in _MAX_METRICS else jnp.minimum(m_acc[k], v) if k in _MIN_METRICS
             else m_acc[k] + v) for k, v in metrics.items()}
    return g, m


@functools.partial(jax.jit, static_argnames=("optimizer",), donate_argnums=(0,))
def _apply(state, grads, loss, *, optimizer):
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    return apply_gradients(state, grads, loss, optimizer)


def grpo_step_grouped(state, batch: RolloutBatch, rng, lengths_N=None, *, graphdef, optimizer, group_size: int,
                      loss_cfg: grpo.GRPOLossConfig, groups: int, prompt_buckets, mu: int = 1, minibatch: int = 0,
                      mesh=None, frozen=None, share_prompt: bool = False):
    """`policy.grpo_step` with each mini-batch's completions in `groups` length groups: the same
    mini-batches (the same shuffles from `rng`), losses, gradients and updates up to fp32
    round-off. `lengths_N` (host): each completion's tokens that count (default: from the loss mask;
    a row masked out entirely, e.g. a truncated one under `mask_truncated`, costs one bucket step).
    Returns (state, metrics)."""
    N, cap = batch.responses_NT.shape
    B, L = batch.prompt.input_ids_BL.shape
    mb = N if minibatch in (0, None) else minibatch
    if N % mb:
        raise ValueError(f"{N} completions do not split into mini-batches of {mb}")
    n_mb = N // mb
    shards = batch_shards(mesh, N, B, mb, mb // groups)
    per = N // shards
    if n_mb > 1:  # the shuffles `grpo_step` draws
        keys = [jax.random.fold_in(rng, e) for e in range(mu)]
        if shards == 1:
            perms = np.stack([np.asarray(jax.random.permutation(k, N)) for k in keys])[:, None]
        else:
            perms = np.stack([np.asarray(jax.vmap(lambda kk: jax.random.permutation(kk, per))(jax.random.split(k, shards)))
                              for k in keys])
    else:
        perms = np.broadcast_to(np.arange(per), (mu, shards, per))
    prompt_len = np.asarray(shd.to_host(batch.prompt.attention_mask_BL)).sum(-1)
    if lengths_N is None:
        lengths_N = mask_lengths(batch.mask_NT)
    norm = loss_cfg.norm_length if loss_cfg.loss_agg == "seq_mean_token_sum_norm" else None
    history = []
    for e in range(mu):
        for u in range(n_mb):
            idx_mb = np.ascontiguousarray(perms[e][:, u * (mb // shards):(u + 1) * (mb // shards)]).astype(np.int32)
            w, tw = _weights(batch.mask_NT, idx_mb, shards=shards, mode=loss_cfg.loss_agg, norm_length=norm)
            acc = None
            for idx, T, Lb in plan_groups(lengths_N, prompt_len, idx_mb, groups, group_size=group_size, cap=cap,
                                          L=L, prompt_buckets=prompt_buckets):
                grads, metrics = _micro_grad(state.params, batch, idx, w, tw, frozen, graphdef=graphdef, T=T, L=Lb,
                                             shards=shards, group_size=group_size, mesh=mesh, share=share_prompt,
                                             loss_cfg=loss_cfg)
                acc = (grads, metrics) if acc is None else _accumulate(*acc, grads, metrics)
            grads, metrics = acc
            state, upd = _apply(state, grads, metrics["loss"], optimizer=optimizer)
            history.append({**metrics, **upd})
    return state, jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *history)

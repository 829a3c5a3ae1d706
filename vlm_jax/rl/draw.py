"""Token draws of the sampler: top-k / top-p truncation and one draw per row from one uniform
number (a two-level inverse CDF, O(V) per row), with the drawn token's log-probability at
temperature 1 (what the GRPO importance ratio needs)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def filter_logits(logits_NV, top_p, top_k):
    """Masks logits outside the top-k (k > 0) and outside the top-p nucleus (p < 1) to -inf.
    The most likely token always survives."""
    V = logits_NV.shape[-1]
    sorted_desc = -jnp.sort(-logits_NV, axis=-1)
    rank_ok = jnp.where(top_k > 0, jnp.arange(V) < top_k, True)
    probs = jax.nn.softmax(jnp.where(rank_ok, sorted_desc, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
    keep_sorted = rank_ok & (before < top_p)
    # threshold = smallest kept logit per row
    n_keep = jnp.maximum(keep_sorted.sum(-1), 1)
    threshold = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
    return jnp.where(logits_NV >= threshold, logits_NV, -jnp.inf)


def block_size(V: int, shards: int = 1) -> int:
    """The inner block of `inverse_cdf` for a vocabulary of V split into `shards` equal parts: about
    sqrt(V) (a power of two), smaller where needed so that blocks never straddle two parts."""
    C = 1 << max(0, math.ceil(math.log2(math.sqrt(V))))
    if shards > 1 and V % shards == 0:
        while C > 1 and (V // shards) % C:
            C //= 2
    return C


def inverse_cdf(uniform_N, weights_NV, shards: int = 1):
    """Per row, an index drawn with probability weights / sum(weights) (weights >= 0, some > 0),
    given one uniform [0, 1) number per row.

    The uniform is located in two levels: the block of C ~ sqrt(V) tokens holding it, then
    the token inside that block. Costs O(V) per row and N random numbers per step, where
    Gumbel-max (`jax.random.categorical`) draws N * V. A zero-weight token is never returned,
    even when float round-off puts the target past the last cumulative sum. With the vocabulary
    split over `shards` devices (the decoding layout), blocks stay inside a device's part and the
    chosen block is selected by a masked sum, so only [N, blocks] and [N, C] arrays cross devices,
    never a whole [N, V] row."""
    N, V = weights_NV.shape
    C = block_size(V, shards)
    nb = -(-V // C)
    w = jnp.pad(weights_NV, ((0, 0), (0, nb * C - V))) if nb * C > V else weights_NV
    w = w.reshape(N, nb, C)
    block = w.sum(-1)  # [N, nb]
    cum = jnp.cumsum(block, -1)
    target = uniform_N.astype(cum.dtype) * cum[:, -1]
    last = lambda x: jnp.max(jnp.where(x > 0, jnp.arange(x.shape[-1]), 0), -1)
    b = jnp.minimum(jnp.sum(cum <= target[:, None], -1), last(block))
    inside = jnp.sum(jnp.where((jnp.arange(nb) == b[:, None])[:, :, None], w, 0.0), 1)  # [N, C] block b
    before = jnp.where(b > 0, jnp.take_along_axis(cum, jnp.maximum(b - 1, 0)[:, None], 1)[:, 0], 0.0)
    icum = jnp.cumsum(inside, -1)
    i = jnp.minimum(jnp.sum(icum <= (target - before)[:, None], -1), last(inside))
    return (b * C + i).astype(jnp.int32)


def sample_token(uniform_N, logits_NV, sp: Any, *, greedy: bool, filtered: bool, shards: int = 1):
    """(token [N], its log-probability under softmax(logits) at temperature 1 [N]); `uniform_N`
    holds one uniform [0, 1) number per row (unused when greedy).

    Greedy argmax, or a draw from softmax(logits / temperature) truncated to top-k then top-p.
    Temperature is applied before truncation (transformers' and vLLM's order), so the nucleus is
    the top-p mass of the distribution actually sampled from. `shards`: the vocabulary's split over
    devices (see `inverse_cdf`); the token's logit is read by a masked sum, which stays on them."""
    logits = logits_NV.astype(jnp.float32)
    top = logits.max(-1, keepdims=True)
    lse = top[:, 0] + jnp.log(jnp.exp(logits - top).sum(-1))
    if greedy:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        scaled = logits / sp.temperature
        if filtered:
            scaled = filter_logits(scaled, sp.top_p, sp.top_k)
        tok = inverse_cdf(uniform_N, jnp.exp(scaled - scaled.max(-1, keepdims=True)), shards)
    picked = jnp.sum(jnp.where(jnp.arange(logits.shape[-1]) == tok[:, None], logits, 0.0), -1)
    return tok, picked - lse

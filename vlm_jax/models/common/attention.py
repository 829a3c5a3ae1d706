"""The decoder's attention cores, shared by both families: causal over query chunks (training,
scoring, prefill), dense under a given mask, and one new token per row over a shared prompt cache
(decoding). All take grouped queries (query head h reads kv head h // (H / K)), softmax in fp32.

Shapes in names: B batch, L query length, S key length, K kv heads, G (or Hg) query heads per kv
head, E head dim, N sampled rows (B * G samples), T generated slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.models.common.layers import NEG_INF
from vlm_jax.shapes import chunk_size


def causal_attention(q_BLKGE, k_BSKE, v_BSKE, key_valid_BS, chunk: int, q_offset: int = 0):
    """Causal GQA attention of L queries over S = q_offset + L keys (query i sits at key position
    q_offset + i and sees the valid keys at or before it; q_offset > 0: the keys start with a
    prefix, e.g. a shared prompt, that every query may see), over query chunks: each chunk's
    scores [B, K, G, C, S] and mask are built, used and (in the backward pass) rebuilt inside the
    chunk, so no [L, S] mask or score tensor over the whole sequence exists. Softmax in fp32 as
    in the dense path; returns [B, L, K, G, E]."""
    B, L, K, G, E = q_BLKGE.shape
    S = k_BSKE.shape[1]
    if S != q_offset + L:
        raise ValueError(f"causal attention needs q_offset + queries = keys, got {q_offset} + {L} vs {S}")
    C = chunk_size(L, chunk)
    dt = q_BLKGE.dtype
    k, v = k_BSKE.astype(dt), v_BSKE.astype(dt)

    def block(q_c, start):
        scores = jnp.einsum("bckgd,bskd->bkgcs", q_c, k) * E**-0.5
        allowed = (q_offset + start + jnp.arange(C))[:, None] >= jnp.arange(S)[None, :]  # [C, S]
        allowed = allowed[None] & key_valid_BS[:, None, :]  # [B, C, S]
        scores = jnp.where(allowed[:, None, None], scores.astype(jnp.float32), NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        return jnp.einsum("bkgcs,bskd->bckgd", probs, v)

    if C == L:
        return block(q_BLKGE, 0)
    q_chunks = jnp.moveaxis(q_BLKGE.reshape(B, L // C, C, K, G, E), 1, 0)
    starts = jnp.arange(L // C) * C
    out = jax.lax.map(lambda a: jax.checkpoint(block)(*a), (q_chunks, starts))  # [n, B, C, K, G, E]
    return jnp.moveaxis(out, 0, 1).reshape(B, L, K, G, E)


def attend(q_BLHE, k_BSKE, v_BSKE, mask_BLS, key_valid_BS=None, chunk: int = 0):
    """Attention of queries [B, L, H, E] over keys/values [B, S, K, E]; returns [B, L, H * E].
    With `mask_BLS`, dense over all S keys; with `mask_BLS=None`, causal over S = L keys with
    `key_valid_BS`, per query chunk of `chunk` (`causal_attention`, no [L, S] mask)."""
    B, L, H, E = q_BLHE.shape
    K = k_BSKE.shape[2]
    qg = q_BLHE.reshape(B, L, K, H // K, E)
    if mask_BLS is None:
        if k_BSKE.shape[1] != L:
            raise ValueError(f"mask_BLS=None needs as many keys as queries, got {k_BSKE.shape[1]} vs {L}")
        return causal_attention(qg, k_BSKE, v_BSKE, key_valid_BS, chunk).reshape(B, L, H * E)
    k, v = k_BSKE.astype(q_BLHE.dtype), v_BSKE.astype(q_BLHE.dtype)
    scores = jnp.einsum("blkgd,bskd->bkgls", qg, k) * E**-0.5
    scores = jnp.where(mask_BLS[:, None, None], scores.astype(jnp.float32), NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_BLHE.dtype)
    return jnp.einsum("bkgls,bskd->blkgd", probs, v).reshape(B, L, H * E)


def decode_attention(q_NKGE, pk_BKEL, pv_BKLE, prompt_mask_BL, gk_NKET, gv_NKTE, gen_valid_T, num_samples):
    """Attention of one new query per row over its prompt's shared keys/values and its own
    generated ones (`DecodeCache` layouts), with one softmax over both parts (a common max, one
    normaliser). A prompt's G samples x Hg query heads attend to that prompt's keys together
    (rows split as [B, G], never transposed, so a batch / KV-head sharding carries through without
    moving queries between devices). `gen_valid_T`: the generated slots every row sees [T], or
    each row's own [N, 1, 1, T]. Returns [N, K, Hg, E]."""
    N, K, Hg, E = q_NKGE.shape
    G, B, dt, f32 = num_samples, N // num_samples, q_NKGE.dtype, jnp.float32
    prompt = lambda a: a.reshape(B, G, *a.shape[1:])  # noqa: E731  [N, ...] -> [B, G, ...]
    rows = lambda a: a.reshape(N, *a.shape[2:])  # noqa: E731  inverse of `prompt`

    s_p = jnp.einsum("bgkhe,bkel->bgkhl", prompt(q_NKGE), pk_BKEL.astype(dt)).astype(f32) * E**-0.5
    s_p = jnp.where(prompt_mask_BL[:, None, None, None, :], s_p, NEG_INF)  # [B, G, K, Hg, L]
    s_g = jnp.einsum("nkhe,nket->nkht", q_NKGE, gk_NKET.astype(dt)).astype(f32) * E**-0.5
    s_g = jnp.where(gen_valid_T, s_g, NEG_INF)  # [N, K, Hg, T]
    m = jnp.maximum(rows(s_p.max(-1)), s_g.max(-1))  # [N, K, Hg]
    e_p = jnp.exp(s_p - prompt(m)[..., None])
    e_g = jnp.exp(s_g - m[..., None])
    denom = rows(e_p.sum(-1)) + e_g.sum(-1)
    out = rows(jnp.einsum("bgkhl,bkle->bgkhe", e_p.astype(dt), pv_BKLE.astype(dt)))
    out = out + jnp.einsum("nkht,nkte->nkhe", e_g.astype(dt), gv_NKTE.astype(dt))
    return (out.astype(f32) / denom[..., None]).astype(dt)

"""Log-probabilities, entropy and per-token loss weights without a [tokens, vocab] fp32 tensor.

`token_logprobs` runs the vocabulary projection, log-softmax and target gather over chunks of the
sequence, each chunk under `jax.checkpoint`: the forward keeps one chunk's logits at a time and the
backward recomputes them per chunk, so memory is proportional to the chunk, not to the sequence.
Values and gradients equal the one-block computation (row-wise operations; tested).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.shapes import chunk_size


def token_logprobs(logits_fn, h_BTD, targets_BT, *, chunk: int = 0, entropy: bool = False):
    """(log p(targets) [B, T], entropy [B, T] or None) in fp32, from the hidden states `h_BTD`
    that predict each target (`logits_fn(h) -> logits`), over sequence chunks of `chunk` tokens."""
    B, T, D = h_BTD.shape
    C = chunk_size(T, chunk)

    def block(h_c, t_c):
        logp_all = jax.nn.log_softmax(logits_fn(h_c).astype(jnp.float32), axis=-1)
        logp = jnp.take_along_axis(logp_all, t_c[..., None], axis=-1)[..., 0]
        ent = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1) if entropy else jnp.zeros_like(logp)
        return logp, ent

    if C == T:
        logp, ent = block(h_BTD, targets_BT)
    else:
        h_c = jnp.moveaxis(h_BTD.reshape(B, T // C, C, D), 1, 0)
        t_c = jnp.moveaxis(targets_BT.reshape(B, T // C, C), 1, 0)
        logp, ent = jax.lax.map(lambda a: jax.checkpoint(block)(*a), (h_c, t_c))
        logp, ent = (jnp.moveaxis(a, 0, 1).reshape(B, T) for a in (logp, ent))
    return logp, (ent if entropy else None)


def batch_shards(mesh, *sizes: int) -> int:
    """How many contiguous row shards the batch axes (data, fsdp) of `mesh` cut rows into (1 when
    there is no mesh or they do not divide every size)."""
    if mesh is None:
        return 1
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    return n if all(s % n == 0 for s in sizes) else 1

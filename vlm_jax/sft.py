"""Cross-entropy (SFT) objective on response tokens only, and its jitted update step.

The batch is the pipeline's SFT batch: prompt + target sequences (right padded) with `loss_mask` 1 on
target tokens (and their closing `<|im_end|>`), 0 on prompt, image and padding tokens. Token `i` is
predicted from position `i - 1`. Used for the reasoning stages and for the caption-SFT ablation.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from vlm_jax import sharding as shd
from vlm_jax.logprobs import batch_shards, token_logprobs
from vlm_jax.models import lora
from vlm_jax.train_state import TrainState, apply_gradients, train_compiler_options


class SFTBatch(NamedTuple):
    inputs: object  # ModelInputs
    loss_mask_BL: jax.Array  # float32


def token_nll(logits_BLV, input_ids_BL):
    """-log p(token i | < i) at positions 1..L-1, shape [B, L-1], in float32."""
    logp = jax.nn.log_softmax(logits_BLV[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, input_ids_BL[:, 1:, None], axis=-1)[..., 0]


def sft_loss_value(nll_BT, mask_BT, normalize: Literal["token", "sequence"] = "token"):
    """Token-normalised: sum(nll * m) / sum(m). Sequence-normalised: mean over rows with targets of
    each row's token mean. Returns (loss, number of target tokens)."""
    return jnp.sum(nll_BT * sft_loss_weights(mask_BT, normalize)), mask_BT.astype(jnp.float32).sum()


def sft_loss_weights(mask_BT, normalize: Literal["token", "sequence"] = "token"):
    """Per-token weights with loss = sum(nll * weights): token-normalised m / sum(m); sequence-
    normalised m / (row's target count) / (rows with targets). Computed over the whole batch, so
    micro-batches' weighted sums add up to the batch's loss."""
    mask = mask_BT.astype(jnp.float32)
    if normalize == "token":
        return mask / jnp.maximum(mask.sum(), 1.0)
    per_row_n = mask.sum(-1, keepdims=True)
    has = (per_row_n > 0).astype(jnp.float32).sum()
    return mask / jnp.maximum(per_row_n, 1.0) / jnp.maximum(has, 1.0)


def sft_loss(params, graphdef, inputs, weights_BT, x_BLD=None, mesh=None, frozen=None):
    """sum(-log p(target) * weights) over a (micro-)batch; `x_BLD`: its embeddings when already
    computed; `frozen`: the base when `params` are adapters."""
    model = lora.bind(graphdef, lora.with_adapters(frozen, params))
    constrain = shd.batch_constraint(mesh)
    x = model.embed(inputs.input_ids_BL, inputs.vision, constrain) if x_BLD is None else x_BLD
    h, _ = model.decode(
        x, inputs.positions_3BL, None, key_valid_BS=inputs.attention_mask_BL > 0, constrain=constrain
    )
    logp, _ = token_logprobs(model.logits, h[:, :-1], inputs.input_ids_BL[:, 1:], chunk=model.options.logits_chunk)
    return -jnp.sum(logp * weights_BT)


def _micro(x, shards: int, n_micro: int, axis: int = 0):
    """[.., B, ..] -> [n_micro, .., B / n_micro, ..]: micro-batch u takes rows u*r .. u*r + r - 1 of
    each of the `shards` contiguous batch shards (r = B / shards / n_micro), so no row changes device."""
    x = jnp.moveaxis(x, axis, 0)
    B = x.shape[0]
    x = x.reshape(shards, n_micro, B // shards // n_micro, *x.shape[1:])
    x = jnp.moveaxis(x, 1, 0).reshape(n_micro, B // n_micro, *x.shape[3:])
    return jnp.moveaxis(x, 1, axis + 1)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "optimizer", "normalize", "micro_batch", "mesh"),
    donate_argnums=(0,),
    compiler_options=train_compiler_options(),
)
def sft_step(state: TrainState, batch: SFTBatch, *, graphdef, optimizer, normalize="token", micro_batch=0,
             mesh=None, frozen: lora.Frozen | None = None):
    """One guarded optimizer update on the SFT loss, its gradient accumulated over micro-batches of
    `micro_batch` rows (0 = the whole batch; the result is the same, the memory that of one
    micro-batch). With `frozen` (a LoRA stage) `state.params` are the adapters, the only thing
    differentiated and updated; the base stays as it is."""
    inputs = batch.inputs
    B = inputs.input_ids_BL.shape[0]
    mask = batch.loss_mask_BL[:, 1:]
    weights = sft_loss_weights(mask, normalize)
    n_tok = mask.astype(jnp.float32).sum()
    micro = B if micro_batch in (0, None) else micro_batch
    if B % micro:
        raise ValueError(f"a batch of {B} rows does not split into micro-batches of {micro}")
    n_micro = B // micro
    grad_fn = jax.value_and_grad(sft_loss)
    if n_micro == 1:
        loss, grads = grad_fn(state.params, graphdef, inputs, weights, None, mesh, frozen)
    else:
        shards = batch_shards(mesh, B, micro)
        split = functools.partial(_micro, shards=shards, n_micro=n_micro)
        # the vision inputs are laid out per row: each micro-batch takes (and encodes) only its rows' images
        vision = None if inputs.vision is None else jax.tree.map(split, inputs.vision)
        xs = (
            inputs._replace(
                input_ids_BL=split(inputs.input_ids_BL),
                attention_mask_BL=split(inputs.attention_mask_BL),
                positions_3BL=split(inputs.positions_3BL, axis=1),
                vision=vision,
            ),
            split(weights),
        )

        def micro_step(acc, x):
            inputs_u, w_u = x
            loss_u, g = grad_fn(state.params, graphdef, inputs_u, w_u, None, mesh, frozen)
            g_acc, l_acc = acc
            return (jax.tree.map(lambda a, b: a + b.astype(a.dtype), g_acc, g), l_acc + loss_u), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        (grads, loss), _ = jax.lax.scan(micro_step, (zeros, jnp.zeros((), jnp.float32)), xs)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    state, upd = apply_gradients(state, grads, loss, optimizer)
    return state, {"loss": loss, "target_tokens": n_tok, **upd}

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
from flax import nnx

from vlm_jax.train_state import TrainState, apply_gradients


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
    mask = mask_BT.astype(jnp.float32)
    n_tok = mask.sum()
    if normalize == "token":
        return jnp.sum(nll_BT * mask) / jnp.maximum(n_tok, 1.0), n_tok
    per_row_n = mask.sum(-1)
    per_row = jnp.sum(nll_BT * mask, -1) / jnp.maximum(per_row_n, 1.0)
    has = (per_row_n > 0).astype(jnp.float32)
    return jnp.sum(per_row * has) / jnp.maximum(has.sum(), 1.0), n_tok


def sft_loss(params, graphdef, batch: SFTBatch, normalize: str):
    model = nnx.merge(graphdef, params)
    x = batch.inputs
    logits = model(x.input_ids_BL, x.attention_mask_BL, x.positions_3BL, x.vision)
    nll = token_nll(logits, x.input_ids_BL)
    loss, n_tok = sft_loss_value(nll, batch.loss_mask_BL[:, 1:], normalize)
    return loss, {"loss": loss, "target_tokens": n_tok}


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "normalize"), donate_argnums=(0,))
def sft_step(state: TrainState, batch: SFTBatch, *, graphdef, optimizer, normalize="token"):
    """One guarded optimizer update on the SFT loss."""
    (loss, metrics), grads = jax.value_and_grad(sft_loss, has_aux=True)(
        state.params, graphdef, batch, normalize
    )
    state, upd = apply_gradients(state, grads, loss, optimizer)
    return state, {**metrics, **upd}

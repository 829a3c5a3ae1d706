"""The decoder layer, written once for both families and every mode.

`DecoderLayer.__call__(x, core)` is the one layer body: `x += o_proj(core(self_attn, norm(x)))`,
`x += mlp(norm(x))`. Training, scoring, prefill, scoring with shared prompts and one-token decoding
all run it; what varies is the attention core passed in (projections, rotary, which keys a query
sees, which cache is written):

- `sequence_core`: this call's tokens, causal over query chunks (training, scoring; prefill with a
  KV cache written at `write_index`) or under a dense mask;
- `shared_prompt_core`: two streams, prompt rows and response rows, each prompt computed once for
  all its responses (`VisionLanguageModel.decode_shared`);
- `decode_core`: one new token per row through the layer's fused projections (`DecoderLayer.fused`)
  over the sampler's `DecodeCache`.

A family chooses its attention's biases and whether queries and keys get an RMSNorm over the head
dim before the rotary (Qwen3); the rotary layout itself comes from the model (`text_rope`).

Shapes in names: B batch, L query length, S key length, D hidden, H heads, K kv heads, E head dim,
N sampled rows, T generated slots, U prompt rows of a shared-prompt forward.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.models.common.attention import attend, causal_attention, decode_attention
from vlm_jax.models.common.layers import Dense, GatedMLP, RMSNorm, apply_rope, init_param


class KVCache(NamedTuple):
    """Per-layer preallocated keys/values [B, S, K, E] (tuples over layers) and the valid-key mask."""

    k: tuple
    v: tuple
    mask_BS: jax.Array  # bool: key slot holds a real token


class DecodeCache(NamedTuple):
    """The sampler's cache. The prompt part is stored once per prompt and shared by its samples
    (rows b*G .. b*G+G-1); the generated part is per sample. Per-layer tuples, laid out so that
    both attention products of a one-token step are plain batched matmuls on CPU (keys with the
    head dim before the length, values length-major):

    prompt_k [B, K, E, L] / prompt_v [B, K, L, E]: written by the prefill, read-only afterwards;
    k [N, K, E, T] / v [N, K, T, E], N = B * G: slot t holds generated token t.

    With `prompt_rows` [N] (a refilling sampler), the prompt part is a store of every prompt of
    the call and row n reads prompt `prompt_rows[n]`, whatever the rows' order and count.
    """

    prompt_k: tuple
    prompt_v: tuple
    prompt_mask_BL: jax.Array  # bool: prompt slot holds a real token
    k: tuple
    v: tuple
    prompt_rows: jax.Array | None = None  # int32 [N]: each row's prompt; None: row n reads prompt n // G


class DecodeLayer(NamedTuple):
    """A decoder layer's projections fused for one-token steps, built once per `generate` call
    (outside the decode loop): q/k/v grouped per kv head (its Hg query heads, then its key and
    value) and gate/up stacked. The grouping keeps the kv-head and mlp dims whole, so tensor-sharded
    kernels stay sharded the same way and splitting the result needs no communication."""

    w_qkv_DKCE: jax.Array  # C = Hg + 2
    b_qkv_KCE: jax.Array | None  # None when q/k/v have no bias
    w_gate_up_D2I: jax.Array


def mrope_angles(positions_3BL, t):
    """Rotary angles [3, B, L, E/2] of each multimodal position row (T, H, W), in fp32; a family's
    layout picks, per frequency, which row it reads (`mrope_cos_sin` in the family's model)."""
    E = t.head_dim
    inv_freq = 1.0 / (t.rope_theta ** (jnp.arange(0, E, 2, dtype=jnp.float32) / E))
    return positions_3BL.astype(jnp.float32)[..., None] * inv_freq


def rope_cos_sin(freqs_BLF, dtype):
    """(cos, sin) [B, L, E] of angles [B, L, E/2] for NeoX `rotate_half`: cat(freq, freq), cast to
    the activation dtype."""
    emb = jnp.concatenate([freqs_BLF, freqs_BLF], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


class Attention(nnx.Module):
    """GQA self-attention projections (query head h reads kv head h // (H / K)). `qkv_bias` /
    `o_bias`: whether the projections have biases; `qk_norm`: an RMSNorm over the head dim on
    queries and keys before the rotary (Qwen3)."""

    def __init__(self, t, *, qkv_bias: bool, o_bias: bool, qk_norm: bool, dtype, rngs):
        self.H, self.K, self.E = t.num_attention_heads, t.num_key_value_heads, t.head_dim
        D, H, K, E = t.hidden_size, self.H, self.K, self.E
        self.q_proj = Dense(D, H * E, ("embed", "heads"), bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Dense(D, K * E, ("embed", "kv_heads"), bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Dense(D, K * E, ("embed", "kv_heads"), bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Dense(H * E, D, ("heads", "embed"), bias=o_bias, dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(E, t.rms_norm_eps, dtype=dtype) if qk_norm else None
        self.k_norm = RMSNorm(E, t.rms_norm_eps, dtype=dtype) if qk_norm else None

    def _norm_rope(self, q, k, cos, sin):
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def project(self, x_BLD, cos_BLE, sin_BLE):
        """Queries [B, L, H, E], keys and values [B, L, K, E], rotary applied to q and k."""
        B, L, _ = x_BLD.shape
        q = self.q_proj(x_BLD).reshape(B, L, self.H, self.E)
        k = self.k_proj(x_BLD).reshape(B, L, self.K, self.E)
        v = self.v_proj(x_BLD).reshape(B, L, self.K, self.E)
        q, k = self._norm_rope(q, k, cos_BLE[:, :, None, :], sin_BLE[:, :, None, :])
        return q, k, v

    def project_fused(self, x_ND, fused: DecodeLayer, cos, sin):
        """One token per row through the fused kernel (`fused`): q [N, K, Hg, E], k and v
        [N, K, 1, E]; `cos`/`sin` [N, 1, 1, E]."""
        Hg = self.H // self.K
        qkv = jnp.einsum("nd,dkce->nkce", x_ND, fused.w_qkv_DKCE.astype(x_ND.dtype))
        if fused.b_qkv_KCE is not None:
            qkv = qkv + fused.b_qkv_KCE.astype(x_ND.dtype)
        q, k = self._norm_rope(qkv[:, :, :Hg], qkv[:, :, Hg : Hg + 1], cos, sin)
        return q, k, qkv[:, :, Hg + 1 :]

    def fused(self):
        """(q/k/v kernels grouped per kv head [D, K, Hg + 2, E], their biases [K, Hg + 2, E] or
        None), adapters merged in."""
        K, Hg, E = self.K, self.H // self.K, self.E
        parts = ((self.q_proj, Hg), (self.k_proj, 1), (self.v_proj, 1))
        w = jnp.concatenate([p.weight().reshape(-1, K, n, E) for p, n in parts], axis=2)
        if self.q_proj.bias is None:
            return w, None
        return w, jnp.concatenate([p.bias[...].reshape(K, n, E) for p, n in parts], axis=1)


class DecoderLayer(nnx.Module):
    def __init__(self, t, *, attention: dict, dtype, rngs):
        self.input_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(t, **attention, dtype=dtype, rngs=rngs)
        self.mlp = GatedMLP(t.hidden_size, t.intermediate_size, ("embed", "mlp"), bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x, core, fused: DecodeLayer | None = None):
        """The layer body. `x`: the residual stream [..., D], or a tuple of streams (each stream
        gets the norms, projections and MLP on its own; the core couples them). `core(self_attn,
        h) -> (attention output [..., H * E] per stream, aux)` is the attention core (module doc);
        `fused`: this layer's fused weights (`fused`) for one-token steps. Returns (x, aux)."""
        h = jax.tree.map(self.input_layernorm, x)
        out, aux = core(self.self_attn, h)
        x = jax.tree.map(lambda x_, o: x_ + self.self_attn.o_proj(o), x, out)
        gate_up = None if fused is None else fused.w_gate_up_D2I
        return jax.tree.map(lambda x_: x_ + self.mlp(self.post_attention_layernorm(x_), gate_up), x), aux

    def fused(self) -> DecodeLayer:
        """The projections fused for one-token steps; built once per generation, outside the loop."""
        w, b = self.self_attn.fused()
        return DecodeLayer(w, b, self.mlp.fused())


class TextModel(nnx.Module):
    def __init__(self, t, *, attention: dict, dtype, rngs):
        self.embed_tokens = nnx.Param(
            init_param(rngs, (t.vocab_size, t.hidden_size), 1.0, dtype), sharding_names=("vocab", "embed")
        )
        self.layers = nnx.List(
            [DecoderLayer(t, attention=attention, dtype=dtype, rngs=rngs) for _ in range(t.num_hidden_layers)]
        )
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Attention cores: `core(attn, h) -> (out, aux)` with the other arguments bound (functools.partial)
# ----------------------------------------------------------------------------------------------


def sequence_core(attn: Attention, h_BLD, cos_BLE, sin_BLE, *, mask_BLS=None, key_valid_BS=None, chunk: int = 0,
                  kv=None, write_index=None):
    """This call's L tokens. Without `kv`, keys are this call's tokens (S = L). With `kv` = (k, v)
    caches [B, S, K, E] (prefill), this call's keys are written at `write_index` first and all S
    slots are attended; aux = the written caches. With `mask_BLS=None`, key j is seen by query i
    iff j <= i and `key_valid_BS[:, j]` (S = L), per query chunk of `chunk` (`causal_attention`);
    otherwise dense under `mask_BLS`."""
    q, k, v = attn.project(h_BLD, cos_BLE, sin_BLE)
    new_kv = None
    if kv is not None:
        k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), write_index, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), write_index, axis=1)
        new_kv = (k, v)
    return attend(q, k, v, mask_BLS, key_valid_BS, chunk), new_kv


def shared_prompt_core(attn: Attention, h, rope, *, prompt_valid_UL, take, chunk: int):
    """Two streams, `h` = (prompt rows [U, Lp, D], response rows [N, Lr, D]) and `rope` = ((cos,
    sin) of the prompts, (cos, sin) of the responses). The prompt rows attend causally to
    themselves (padding masked by `prompt_valid_UL`); response row n attends to its prompt's
    keys/values (`take` gathers prompt rows into response rows, so a prompt's G responses share
    one computation of it) followed causally by its own: for every response token, the same keys,
    values and mask as a [prompt + response] row, without running the prompt once per row."""
    (hp, hr), ((cos_p, sin_p), (cos_r, sin_r)) = h, rope
    qp, kp, vp = attn.project(hp, cos_p, sin_p)
    qr, kr, vr = attn.project(hr, cos_r, sin_r)
    (U, Lp, H, E), (N, Lr) = qp.shape, hr.shape[:2]
    K = kp.shape[2]
    op = causal_attention(qp.reshape(U, Lp, K, H // K, E), kp, vp, prompt_valid_UL, chunk)
    keys = jnp.concatenate([take(kp), kr.astype(kp.dtype)], axis=1)  # [N, Lp + Lr, K, E]
    values = jnp.concatenate([take(vp), vr.astype(vp.dtype)], axis=1)
    valid = jnp.concatenate([take(prompt_valid_UL), jnp.ones((N, Lr), bool)], axis=1)
    orr = causal_attention(qr.reshape(N, Lr, K, H // K, E), keys, values, valid, chunk, q_offset=Lp)
    return (op.reshape(U, Lp, H * E), orr.reshape(N, Lr, H * E)), None


def decode_core(attn: Attention, h_ND, cos, sin, *, fused: DecodeLayer, cache: DecodeCache, layer: int, slot,
                gen_valid, num_samples: int, view=None):
    """One new token per row (`h_ND`; rotary `cos`/`sin` [N, 1, 1, E]): its key and value written
    at generated slot `slot` of layer `layer`'s cache (one slot for every row, or [N] slots, one
    per row), then attention over its prompt's keys plus the generated slots `gen_valid` ([T] or
    [N, 1, 1, T]; `decode_attention`). With `cache.prompt_rows` each row reads its own prompt from
    the store (gathered per row, so `num_samples` is 1). `view` = (static view lengths, index):
    the attention reads only the first `views[index]` generated slots (a `lax.switch` with one
    branch per length, each a static slice of the buffer), not the whole buffer. aux = the layer's
    new (k, v) generated caches."""
    q, k, v = attn.project_fused(h_ND, fused, cos, sin)  # k, v: [N, K, 1, E]
    gk, gv = cache.k[layer], cache.v[layer]
    k, v = jnp.swapaxes(k, 2, 3).astype(gk.dtype), v.astype(gv.dtype)  # k [N, K, E, 1], v [N, K, 1, E]
    if jnp.ndim(slot) == 0:
        new_k = jax.lax.dynamic_update_slice_in_dim(gk, k, slot, axis=3)
        new_v = jax.lax.dynamic_update_slice_in_dim(gv, v, slot, 2)
    else:  # a slot per row: a scatter of one key and value per row
        rows = jnp.arange(gk.shape[0])
        new_k = gk.at[rows, :, :, slot].set(k[..., 0], unique_indices=True)
        new_v = gv.at[rows, :, slot].set(v[:, :, 0], unique_indices=True)
    pk, pv, pmask = cache.prompt_k[layer], cache.prompt_v[layer], cache.prompt_mask_BL
    if cache.prompt_rows is not None:
        take = lambda a: jnp.take(a, cache.prompt_rows, axis=0)  # noqa: E731
        pk, pv, pmask, num_samples = take(pk), take(pv), take(pmask), 1

    def attend(T: int):  # over the first T generated slots
        return decode_attention(q, pk, pv, pmask, new_k[..., :T], new_v[:, :, :T], gen_valid[..., :T], num_samples)

    if view is None:
        out = attend(new_k.shape[-1])
    else:
        views, index = view
        out = jax.lax.switch(index, [functools.partial(attend, T) for T in views])
    N, K, Hg, E = q.shape
    return out.reshape(N, K * Hg * E), (new_k, new_v)

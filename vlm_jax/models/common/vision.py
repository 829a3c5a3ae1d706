"""Vision pieces both families share: attention within segments of patches (frames or windows),
memory linear in the patches; the vision attention block (qkv / proj with bias, fp32 2-D rope);
the 2-D rope; where image features go in the token sequence.

Shapes in names: B batch, P vision patches, H heads, E head dim, M merged vision tokens, L tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.models.common.layers import NEG_INF, Dense, rotate_half
from vlm_jax.shapes import chunk_size

# Vision attention runs over query chunks of this many patches (memory: chunk x key span per step).
VISION_CHUNK = 128
# Query chunks evaluated together in one step of the chunk loop: about this many scores per step.
VISION_SCORES_PER_STEP = 1 << 22


def segment_attention(q_BPHE, k_BPHE, v_BPHE, seg_BP, *, halo: int | None = None, chunk: int = VISION_CHUNK):
    """Non-causal attention of each patch over the patches of its segment (same id in `seg_BP`, per
    row), memory linear in the patches: queries in chunks of `chunk`, each chunk's keys a static
    span of its own row. `halo=None`: the span is the whole row (full attention within each frame of
    a row of one image or a few). `halo=W`: segments are contiguous runs of at most W patches
    (windows), so a chunk [s, s + C) only needs keys [s - W, s + C + W). Masked keys get a finite
    large negative score, so padding rows stay NaN-free; softmax in fp32. Returns [B, P, H, E]."""
    B, P, H, E = q_BPHE.shape
    C = chunk_size(P, chunk)
    dt = q_BPHE.dtype
    k, v = k_BPHE.astype(dt), v_BPHE.astype(dt)
    if halo is None:
        span, seg_k = P, seg_BP
    else:
        pad = ((0, 0), (halo, halo), (0, 0), (0, 0))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
        seg_k = jnp.pad(seg_BP, ((0, 0), (halo, halo)), constant_values=-2)
        span = C + 2 * halo

    def block(q_c, seg_c, start):  # one query chunk of every row: q_c [B, C, H, E], keys from `start`
        k_c = jax.lax.dynamic_slice_in_dim(k, start, span, axis=1)
        v_c = jax.lax.dynamic_slice_in_dim(v, start, span, axis=1)
        s_c = jax.lax.dynamic_slice_in_dim(seg_k, start, span, axis=1)
        scores = jnp.einsum("bchd,bshd->bhcs", q_c, k_c) * E**-0.5
        allowed = seg_c[:, :, None] == s_c[:, None, :]  # [B, C, span]
        scores = jnp.where(allowed[:, None], scores.astype(jnp.float32), NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        return jnp.einsum("bhcs,bshd->bchd", probs, v_c)

    # The loop runs over the chunk index; rows stay a batch dimension (split over the batch axes
    # under a mesh, so each device loops over its own rows' chunks).
    n = P // C
    q_n = jnp.moveaxis(q_BPHE.reshape(B, n, C, H, E), 1, 0)
    seg_n = jnp.moveaxis(seg_BP.reshape(B, n, C), 1, 0)
    starts = jnp.arange(n) * C if halo is not None else jnp.zeros(n, jnp.int32)
    per_step = max(1, min(n, VISION_SCORES_PER_STEP // (B * C * span * H)))
    out = jax.lax.map(lambda a: jax.checkpoint(block)(*a), (q_n, seg_n, starts), batch_size=per_step)
    return jnp.moveaxis(out, 0, 1).reshape(B, P, H, E)


def image_slots(input_ids_BL, image_token_id: int, num_slots: int):
    """(is_image [B, L], slot [B, L]): image token j of a row (in order) reads its row's merged
    feature j (clipped into [0, num_slots))."""
    is_img = input_ids_BL == image_token_id
    slot = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, num_slots - 1)
    return is_img, slot


class VisionAttention(nnx.Module):
    """Both families' vision attention: qkv and proj with bias, the 2-D rope in fp32."""

    def __init__(self, cfg, *, dtype, rngs):
        v = cfg.vision
        self.num_heads, self.head_dim = v.num_heads, v.head_dim
        self.qkv = Dense(
            v.hidden_size, 3 * v.hidden_size, ("vision_embed", "vision_heads"), bias=True, dtype=dtype, rngs=rngs
        )
        self.proj = Dense(
            v.hidden_size, v.hidden_size, ("vision_heads", "vision_embed"), bias=True, dtype=dtype, rngs=rngs
        )

    def __call__(self, x_BPD, cos_BPE, sin_BPE, seg_BP, halo: int | None = None):
        """Attention within segments of each row (`segment_attention`): frames (`halo=None`) or
        windows of at most `halo` patches."""
        B, P, _ = x_BPD.shape
        qkv = self.qkv(x_BPD).reshape(B, P, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        cos, sin = cos_BPE[:, :, None, :], sin_BPE[:, :, None, :]
        q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
        q = (q32 * cos + rotate_half(q32) * sin).astype(x_BPD.dtype)
        k = (k32 * cos + rotate_half(k32) * sin).astype(x_BPD.dtype)
        out = segment_attention(q, k, v, seg_BP, halo=halo).reshape(B, P, -1)
        return self.proj(out)


def vision_rope(pos_BP2, v):
    """2-D vision rope of vision config `v`: cos/sin [..., P, E] in fp32 for (row, col) positions
    [..., P, 2]."""
    spatial = v.head_dim // 2
    inv_freq = 1.0 / (v.rope_theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
    f = pos_BP2.astype(jnp.float32)[..., None] * inv_freq  # [..., P, 2, E/4]
    f = jnp.concatenate([f[..., 0, :], f[..., 1, :]], axis=-1)
    f = jnp.concatenate([f, f], axis=-1)
    return jnp.cos(f), jnp.sin(f)

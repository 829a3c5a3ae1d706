"""Qwen2.5-VL in Flax NNX: vision tower (window + full attention, 2-D RoPE, patch merger) and a Qwen2
decoder with GQA and blocked multimodal RoPE. Matches transformers 5.x to fp32 round-off.

Parameters carry logical axis names (`sharding_names`); `vlm_jax.sharding` maps them onto the mesh.
Shapes in names: B batch, L query length, S key length, D hidden, H heads, K kv heads, E head dim,
P vision patches, M merged vision tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from vlm_jax.shapes import chunk_size

NEG_INF = -1e30  # finite: fully-masked rows (padding) stay NaN-free

REMAT_POLICIES = ("none", "full", "save_dots")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How the model computes (static; part of the graphdef, so a change recompiles).

    `compute_dtype`: activations and matmuls (None: the stored parameters' dtype); parameters are
    cast to it where they are used, so fp32 storage with bf16 compute works. `remat`: per decoder
    layer and vision block, "none", "full" (recompute everything in the backward pass) or
    "save_dots" (keep matmul outputs, recompute the rest). `attention_chunk`: training / prefill
    attention over query chunks of this many tokens with masks computed per chunk (memory linear in
    the sequence; 0 = one dense block). `logits_chunk`: log-probs, entropy and cross-entropy over
    sequence chunks of this many tokens, each chunk's [tokens, vocab] logits recomputed in the
    backward pass (0 = all at once). `scan_layers`: the decoder layers of training, scoring and
    prefill (and the vision blocks, per run of one kind: `run_blocks`) run as one `jax.lax.scan`
    over their parameters stacked at call time (`scan_layers`
    below), so the program holds one layer body and compile time stops growing with depth (layers
    of different structures, e.g. adapters on some layers only, run in the loop)."""

    compute_dtype: str | None = None
    remat: str = "none"
    attention_chunk: int = 512
    logits_chunk: int = 256
    scan_layers: bool = False

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
        if self.attention_chunk < 0 or self.logits_chunk < 0:
            raise ValueError("attention_chunk and logits_chunk must be >= 0")


def remat(fn, policy: str):
    """`fn` under `jax.checkpoint` with the named policy ("none": `fn` itself)."""
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn)
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


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


def same_structure(layers) -> bool:
    """Whether `layers` can run as one scan: the same modules and parameter shapes in each, and no
    LoRA adapters attached (they are attributes, not parameters, so the stacked state would miss
    them: a LoRA forward runs the layers in the loop)."""
    if any(getattr(m, "lora", None) is not None for layer in layers for _, m in nnx.iter_graph(layer)):
        return False  # adapters attached for one forward (`lora.bind`) are not in the split state
    first = nnx.split(layers[0])
    shapes = lambda st: jax.tree.map(lambda a: (a.shape, a.dtype), st)  # noqa: E731
    return all(
        gd == first[0] and shapes(st) == shapes(first[1]) for gd, st in (nnx.split(layer) for layer in layers[1:])
    )


def scan_layers(layers, body, x, xs=None, *, policy: str = "none", dtype=None):
    """Runs `body(layer, x, xs_i) -> (x, ys_i)` over `layers` (modules of one structure) as one
    `jax.lax.scan`: the layers' parameters are stacked at call time into [n, ...] arrays (cast to
    `dtype` first when given, so a bf16-compute stack of fp32 weights costs half their bytes) and
    each iteration merges its slice back into a layer. Storage stays per layer (checkpoints, HF
    import/export, sharding rules and adapters are unchanged); the stack is a transient copy, split
    like the parameters (a stack of FSDP-sharded arrays is sharded the same way, locally). The
    body runs under the remat `policy`. Returns (x, stacked ys)."""
    graphdef, _ = nnx.split(layers[0])
    states = [nnx.split(layer)[1] for layer in layers]

    def cast(a):
        return a.astype(dtype) if dtype is not None and jnp.issubdtype(a.dtype, jnp.floating) else a

    stacked = jax.tree.map(lambda *a: jnp.stack([cast(b) for b in a]), *states)

    def step(carry, inputs):
        state_i, xs_i = inputs
        return body(nnx.merge(graphdef, state_i), carry, xs_i)

    return jax.lax.scan(remat(step, policy), x, (stacked, xs))


def run_blocks(blocks, x, call, *, kinds=None, cuts=(), scan: bool = False, policy: str = "none", dtype=None,
               after=None):
    """`x` through `blocks` with `call(block, x, i) -> x` (`i`: the index of the block, or of the
    first block of its segment: `call` may only depend on `kinds[i]`). Without `scan`, a loop with
    each block under the remat `policy`. With `scan`, each run of consecutive blocks of one kind
    (`kinds`, e.g. window vs full attention) not crossing a cut (an index after which `after(i, x)`
    needs the output, e.g. a DeepStack tap) is one `scan_layers`, so the program holds one body per
    segment, not per block. `after(i, x)` runs after block i for every i in `cuts`."""
    n = len(blocks)
    kinds = kinds or [None] * n
    starts = [0] + [i for i in range(1, n) if kinds[i] != kinds[i - 1] or (i - 1) in cuts]
    for a, b in zip(starts, starts[1:] + [n]):
        seg = list(blocks)[a:b]
        if scan and same_structure(seg):
            x, _ = scan_layers(seg, lambda blk, x_, _, i=a: (call(blk, x_, i), None), x, policy=policy, dtype=dtype)
        else:
            for i, blk in enumerate(seg, start=a):
                x = remat(lambda x_, blk=blk, i=i: call(blk, x_, i), policy)(x)
        if after is not None and (b - 1) in cuts:
            after(b - 1, x)
    return x


def _init(rngs: nnx.Rngs, shape, scale: float, dtype):
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * scale).astype(dtype)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] (a transposed torch Linear weight)."""

    def __init__(
        self, din: int, dout: int, axes: tuple[str | None, str | None], *, bias: bool, dtype, rngs: nnx.Rngs
    ):
        self.kernel = nnx.Param(_init(rngs, (din, dout), din**-0.5, dtype), sharding_names=axes)
        self.bias = nnx.Param(jnp.zeros((dout,), dtype), sharding_names=(axes[1],)) if bias else None

    # Low-rank adapter (a [in, r], b [r, out], scale) or None: set only on a transient module bound
    # by `vlm_jax.models.lora.bind` (never part of the parameters); applied, not merged.
    lora = None

    def __call__(self, x):
        y = x @ self.kernel[...].astype(x.dtype)
        if self.lora is not None:
            a, b, scale = self.lora
            y = y + ((x @ a.astype(x.dtype)) @ b.astype(x.dtype)) * scale
        return y + self.bias[...].astype(x.dtype) if self.bias is not None else y

    def weight(self):
        """The effective kernel [in, out] (the adapter merged in, when one is bound)."""
        w = self.kernel[...]
        if self.lora is None:
            return w
        a, b, scale = self.lora
        return (w.astype(jnp.float32) + (a.astype(jnp.float32) @ b.astype(jnp.float32)) * scale).astype(w.dtype)


class RMSNorm(nnx.Module):
    """Normalise in fp32, cast back to the input dtype, then multiply by the weight (as transformers)."""

    def __init__(self, dim: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), sharding_names=("norm",))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


def rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


# ----------------------------------------------------------------------------------------------
# Vision tower
# ----------------------------------------------------------------------------------------------


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


def scatter_image_features(input_ids_BL, image_token_id: int, feats_BMD, x_BLD):
    """(mask, features, x) for `jnp.where`: each row's image tokens take its own row's merged
    features in order (a gather within the row, no global index)."""
    is_img, slot = image_slots(input_ids_BL, image_token_id, feats_BMD.shape[1])
    feats_BLD = jnp.take_along_axis(feats_BMD, slot[..., None], axis=1)
    return is_img[..., None], feats_BLD, x_BLD


class VisionAttention(nnx.Module):
    def __init__(self, cfg: Qwen25VLConfig, *, dtype, rngs):
        v = cfg.vision
        self.num_heads, self.head_dim = v.num_heads, v.head_dim
        self.qkv = Dense(
            v.hidden_size,
            3 * v.hidden_size,
            ("vision_embed", "vision_heads"),
            bias=True,
            dtype=dtype,
            rngs=rngs,
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


class GatedMLP(nnx.Module):
    """down(silu(gate(x)) * up(x)); the vision tower's has biases, the decoder's does not."""

    def __init__(self, d: int, i: int, axes: tuple[str, str], *, bias: bool, dtype, rngs):
        inner, outer = axes  # logical names of the hidden (d) and intermediate (i) dims
        self.gate_proj = Dense(d, i, (inner, outer), bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Dense(d, i, (inner, outer), bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Dense(i, d, (outer, inner), bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: Qwen25VLConfig, *, dtype, rngs):
        self.norm1 = RMSNorm(cfg.vision.hidden_size, 1e-6, dtype=dtype)
        self.norm2 = RMSNorm(cfg.vision.hidden_size, 1e-6, dtype=dtype)
        self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)
        v = cfg.vision
        self.mlp = GatedMLP(
            v.hidden_size,
            v.intermediate_size,
            ("vision_embed", "vision_mlp"),
            bias=True,
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x, cos, sin, seg, halo=None):
        x = x + self.attn(self.norm1(x), cos, sin, seg, halo)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    def __init__(self, cfg: Qwen25VLConfig, *, dtype, rngs):
        v = cfg.vision
        self.hidden = v.hidden_size * v.merge_unit
        self.ln_q = RMSNorm(v.hidden_size, 1e-6, dtype=dtype)
        self.mlp_0 = Dense(
            self.hidden, self.hidden, ("merger_in", "vision_mlp"), bias=True, dtype=dtype, rngs=rngs
        )
        self.mlp_2 = Dense(
            self.hidden, v.out_hidden_size, ("vision_mlp", "embed"), bias=True, dtype=dtype, rngs=rngs
        )

    def __call__(self, x_BPD):
        x = self.ln_q(x_BPD)
        x = x.reshape(*x.shape[:-2], -1, self.hidden)
        return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))


class VisionTower(nnx.Module):
    def __init__(self, cfg: Qwen25VLConfig, *, dtype, rngs, compute_dtype=None, remat_policy="none", scan=False):
        v = cfg.vision
        self.cfg = cfg
        self.compute_dtype = compute_dtype or dtype
        self.remat_policy = remat_policy
        self.scan = scan  # blocks of one kind in a row run as one scan (`run_blocks`)
        self.patch_embed = Dense(
            v.patch_dim, v.hidden_size, ("vision_patch", "vision_embed"), bias=False, dtype=dtype, rngs=rngs
        )
        self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(v.depth)])
        self.merger = PatchMerger(cfg, dtype=dtype, rngs=rngs)

    def rope(self, pos_BP2):
        """2-D vision rope: cos/sin [..., P, E] in fp32 for (row, col) positions [..., P, 2]."""
        v = self.cfg.vision
        spatial = v.head_dim // 2
        inv_freq = 1.0 / (v.rope_theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
        f = pos_BP2.astype(jnp.float32)[..., None] * inv_freq  # [..., P, 2, E/4]
        f = jnp.concatenate([f[..., 0, :], f[..., 1, :]], axis=-1)
        f = jnp.concatenate([f, f], axis=-1)
        return jnp.cos(f), jnp.sin(f)

    def window_patches(self) -> int:
        """The most patches one attention window holds (the window-attention halo)."""
        v = self.cfg.vision
        vws = v.window_size // v.spatial_merge_size // v.patch_size
        return vws * vws * v.merge_unit

    def __call__(self, vision, constrain=None):
        """Merged features [B, M, D_text] per row, in image order (`VisionInputs`: each row holds its
        own images; the slots after a row's images are garbage). `constrain` pins the rows to the
        batch axes at every block boundary (as the decoder's layers)."""
        constrain = constrain or (lambda a: a)
        x = constrain(self.patch_embed(vision.patches_BPC.astype(self.compute_dtype)))
        cos, sin = self.rope(vision.rope_pos_BP2)
        full = set(self.cfg.vision.fullatt_block_indexes)
        W = self.window_patches()

        def call(block, x, i):
            seg, halo = (vision.full_seg_BP, None) if i in full else (vision.window_seg_BP, W)
            return constrain(block(x, cos, sin, seg, halo))

        x = run_blocks(self.blocks, x, call, kinds=[i in full for i in range(len(self.blocks))], scan=self.scan,
                       policy=self.remat_policy, dtype=self.compute_dtype)
        merged = constrain(self.merger(x))  # [B, M, D] window order
        return jnp.take_along_axis(merged, vision.window_inverse_BM[..., None], axis=1)


# ----------------------------------------------------------------------------------------------
# Text decoder
# ----------------------------------------------------------------------------------------------


class KVCache(NamedTuple):
    """Per-layer preallocated keys/values [B, S, K, E] (tuples over layers) and the valid-key mask."""

    k: tuple
    v: tuple
    mask_BS: jax.Array  # bool: key slot holds a real token


def mrope_cos_sin(positions_3BL, cfg: Qwen25VLConfig, dtype):
    """Blocked multimodal RoPE: frequency chunk k (sizes `mrope_section`) reads position row k."""
    t = cfg.text
    E = t.head_dim
    inv_freq = 1.0 / (t.rope_theta ** (jnp.arange(0, E, 2, dtype=jnp.float32) / E))
    freqs = positions_3BL.astype(jnp.float32)[..., None] * inv_freq  # [3, B, L, E/2]
    bounds, start = [], 0
    for size in t.mrope_section:
        bounds.append((start, start + size))
        start += size
    f = jnp.concatenate([freqs[k % 3, ..., a:b] for k, (a, b) in enumerate(bounds)], axis=-1)
    f = jnp.concatenate([f, f], axis=-1)
    return jnp.cos(f).astype(dtype), jnp.sin(f).astype(dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen25VLConfig, *, dtype, rngs):
        t = cfg.text
        self.H, self.K, self.E = t.num_attention_heads, t.num_key_value_heads, t.head_dim
        self.q_proj = Dense(
            t.hidden_size, self.H * self.E, ("embed", "heads"), bias=True, dtype=dtype, rngs=rngs
        )
        self.k_proj = Dense(
            t.hidden_size, self.K * self.E, ("embed", "kv_heads"), bias=True, dtype=dtype, rngs=rngs
        )
        self.v_proj = Dense(
            t.hidden_size, self.K * self.E, ("embed", "kv_heads"), bias=True, dtype=dtype, rngs=rngs
        )
        self.o_proj = Dense(
            self.H * self.E, t.hidden_size, ("heads", "embed"), bias=False, dtype=dtype, rngs=rngs
        )

    def project(self, x_BLD, cos_BLE, sin_BLE):
        """Queries [B, L, H, E], keys and values [B, L, K, E], rotary applied to q and k."""
        B, L, _ = x_BLD.shape
        q = self.q_proj(x_BLD).reshape(B, L, self.H, self.E)
        k = self.k_proj(x_BLD).reshape(B, L, self.K, self.E)
        v = self.v_proj(x_BLD).reshape(B, L, self.K, self.E)
        cos, sin = cos_BLE[:, :, None, :], sin_BLE[:, :, None, :]
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def __call__(self, x_BLD, cos_BLE, sin_BLE, mask_BLS, kv=None, write_index=None, key_valid_BS=None,
                 chunk: int = 0):
        """Causal GQA attention. Without `kv`, keys are this call's tokens (S = L). With `kv` = (k, v)
        caches [B, S, K, E], this call's keys are written at `write_index` and all S slots are attended
        under `mask_BLS`. With `mask_BLS=None`, key j is seen by query i iff j <= i and
        `key_valid_BS[:, j]` (S = L), computed per query chunk of `chunk` (`causal_attention`).
        Returns (out, new_kv)."""
        B, L, _ = x_BLD.shape
        q, k, v = self.project(x_BLD, cos_BLE, sin_BLE)
        if kv is not None:
            k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), write_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), write_index, axis=1)
            new_kv = (k, v)
        else:
            new_kv = None
        # GQA: query head h reads kv head h // (H / K)  (repeat, not tile)
        qg = q.reshape(B, L, self.K, self.H // self.K, self.E)
        if mask_BLS is None:
            if k.shape[1] != L:
                raise ValueError(f"mask_BLS=None needs as many keys as queries, got {k.shape[1]} vs {L}")
            out = causal_attention(qg, k, v, key_valid_BS, chunk).reshape(B, L, self.H * self.E)
            return self.o_proj(out), new_kv
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        if L == 1 and kv is not None:
            # Decode step: multiply-and-reduce over the cache in its own [B, S, K, E] layout. A matmul
            # (einsum) here makes XLA transpose the whole cache on every step and layer.
            scores = (qg[:, 0, None] * k[:, :, :, None, :]).sum(-1) * self.E**-0.5  # [B, S, K, G]
            scores = jnp.where(mask_BLS[:, 0, :, None, None], scores.astype(jnp.float32), NEG_INF)
            probs = jax.nn.softmax(scores, axis=1).astype(q.dtype)
            out = (probs[..., None] * v[:, :, :, None, :]).sum(1).reshape(B, 1, self.H * self.E)
            return self.o_proj(out), new_kv
        scores = jnp.einsum("blkgd,bskd->bkgls", qg, k) * self.E**-0.5
        scores = jnp.where(mask_BLS[:, None, None], scores.astype(jnp.float32), NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("bkgls,bskd->blkgd", probs, v).reshape(B, L, self.H * self.E)
        return self.o_proj(out), new_kv


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen25VLConfig, *, dtype, rngs):
        eps = cfg.text.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.text.hidden_size, eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.text.hidden_size, eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        t = cfg.text
        self.mlp = GatedMLP(
            t.hidden_size, t.intermediate_size, ("embed", "mlp"), bias=False, dtype=dtype, rngs=rngs
        )

    def __call__(self, x, cos, sin, mask, kv=None, write_index=None, key_valid=None, chunk: int = 0):
        h, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, write_index, key_valid, chunk)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), new_kv


def shared_prompt_layer(layer, x, rope, prompt_valid_UL, take, chunk: int):
    """One decoder layer (either family's: norms, `self_attn.project` / `o_proj`, MLP) over the
    two streams of a shared-prompt forward: `x` = (prompt rows [U, Lp, D], response rows [N, Lr, D]),
    `rope` = ((cos, sin) of the prompts, (cos, sin) of the responses). The prompt rows attend
    causally to themselves (padding masked by `prompt_valid_UL`); response row n attends to its
    prompt's keys/values (`take` gathers prompt rows into response rows, so a prompt's G responses
    share one computation of it) followed causally by its own: for every response token, the same
    keys, values and mask as a [prompt + response] row, without running the prompt once per row.
    Returns the new (prompt rows, response rows)."""
    xp, xr = x
    (cos_p, sin_p), (cos_r, sin_r) = rope
    a = layer.self_attn
    qp, kp, vp = a.project(layer.input_layernorm(xp), cos_p, sin_p)
    qr, kr, vr = a.project(layer.input_layernorm(xr), cos_r, sin_r)
    (U, Lp, H, E), (N, Lr) = qp.shape, xr.shape[:2]
    K = kp.shape[2]
    op = causal_attention(qp.reshape(U, Lp, K, H // K, E), kp, vp, prompt_valid_UL, chunk)
    keys = jnp.concatenate([take(kp), kr.astype(kp.dtype)], axis=1)  # [N, Lp + Lr, K, E]
    values = jnp.concatenate([take(vp), vr.astype(vp.dtype)], axis=1)
    valid = jnp.concatenate([take(prompt_valid_UL), jnp.ones((N, Lr), bool)], axis=1)
    orr = causal_attention(qr.reshape(N, Lr, K, H // K, E), keys, values, valid, chunk, q_offset=Lp)
    xp = xp + a.o_proj(op.reshape(U, Lp, H * E))
    xr = xr + a.o_proj(orr.reshape(N, Lr, H * E))
    xp = xp + layer.mlp(layer.post_attention_layernorm(xp))
    xr = xr + layer.mlp(layer.post_attention_layernorm(xr))
    return xp, xr


class TextModel(nnx.Module):
    def __init__(self, cfg: Qwen25VLConfig, *, dtype, rngs):
        t = cfg.text
        self.embed_tokens = nnx.Param(
            _init(rngs, (t.vocab_size, t.hidden_size), 1.0, dtype), sharding_names=("vocab", "embed")
        )
        self.layers = nnx.List(
            [DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(t.num_hidden_layers)]
        )
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# One-token decode steps for the sampler: shared prompt cache, fused projections
# ----------------------------------------------------------------------------------------------


class DecodeCache(NamedTuple):
    """The sampler's cache. The prompt part is stored once per prompt and shared by its samples
    (rows b*G .. b*G+G-1); the generated part is per sample. Per-layer tuples, laid out so that
    both attention products of a one-token step are plain batched matmuls on CPU (keys with the
    head dim before the length, values length-major):

    prompt_k [B, K, E, L] / prompt_v [B, K, L, E]: written by the prefill, read-only afterwards;
    k [N, K, E, T] / v [N, K, T, E], N = B * G: slot t holds generated token t.
    """

    prompt_k: tuple
    prompt_v: tuple
    prompt_mask_BL: jax.Array  # bool: prompt slot holds a real token
    k: tuple
    v: tuple


class DecodeLayer(NamedTuple):
    """A decoder layer's projections fused for one-token steps, built once per `generate` call
    (outside the decode loop): q/k/v grouped per kv head (its Hg query heads, then its key and
    value) and gate/up stacked. The grouping keeps the kv-head and mlp dims whole, so tensor-sharded
    kernels stay sharded the same way and splitting the result needs no communication."""

    w_qkv_DKCE: jax.Array  # C = Hg + 2
    b_qkv_KCE: jax.Array
    w_gate_up_D2I: jax.Array


def decode_attention(q_NKGE, pk_BKEL, pv_BKLE, prompt_mask_BL, gk_NKET, gv_NKTE, gen_valid_T, num_samples):
    """Attention of one new query per row over its prompt's shared keys/values and its own
    generated ones (`DecodeCache` layouts), with one softmax over both parts (a common max, one
    normaliser). A prompt's G samples x Hg query heads attend to that prompt's keys together
    (rows split as [B, G], never transposed, so a batch / KV-head sharding carries through without
    moving queries between devices). Returns [N, K, Hg, E]."""
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


class Qwen25VL(nnx.Module):
    """The full model. Use `vlm_jax.models.forward` / the sampler rather than calling it directly."""

    def __init__(self, cfg: Qwen25VLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, options=ModelOptions()):
        self.config = cfg
        self.options = options
        self.param_dtype = dtype  # how the parameters are stored
        self.dtype = jnp.dtype(options.compute_dtype) if options.compute_dtype else dtype  # activations
        self.visual = VisionTower(
            cfg, dtype=dtype, rngs=rngs, compute_dtype=self.dtype, remat_policy=options.remat,
            scan=options.scan_layers,
        )
        self.language_model = TextModel(cfg, dtype=dtype, rngs=rngs)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Dense(
                cfg.text.hidden_size,
                cfg.text.vocab_size,
                ("embed", "vocab"),
                bias=False,
                dtype=dtype,
                rngs=rngs,
            )
        )

    # -- pieces shared by the training forward and the sampler ------------------------------------

    KV_AXES = ("batch", "kv_length", "kv_heads", "head_dim")  # logical axes of one cache array

    def init_cache(self, batch: int, length: int, key_valid_BS, constrain=lambda a: a) -> KVCache:
        """Zeroed per-layer key/value caches [batch, length, K, E] (`constrain` places them)."""
        t = self.config.text
        zeros = constrain(jnp.zeros((batch, length, t.num_key_value_heads, t.head_dim), self.dtype))
        n = t.num_hidden_layers
        return KVCache((zeros,) * n, (zeros,) * n, key_valid_BS)

    def embed(self, input_ids_BL, vision, constrain=None):
        """Token embeddings with image features written at image-token positions: each row's image
        tokens, in order, take its own row's merged features. `constrain`: the batch-axes pin."""
        emb = self.language_model.embed_tokens[...]
        x = jnp.take(emb, input_ids_BL, axis=0).astype(self.dtype)
        if vision is None:
            return x
        feats_BMD = self.visual(vision, constrain).astype(self.dtype)
        return jnp.where(*scatter_image_features(input_ids_BL, self.config.image_token_id, feats_BMD, x))

    def decode(
        self,
        x_BLD,
        positions_3BL,
        mask_BLS,
        cache: KVCache | None = None,
        write_index=None,
        *,
        key_valid_BS=None,
        constrain=None,
    ):
        """Decoder stack; returns (final hidden [B, L, D] after the norm, new per-layer kv or None).

        `mask_BLS=None` means causal over this call's tokens with `key_valid_BS` [B, L] marking the
        real ones, computed per query chunk (no [L, S] mask). `constrain` (e.g.
        `sharding.batch_constraint(mesh)`) places the activations at the embedding and every layer
        boundary (batch split over the data axes). Each layer runs under the remat policy."""
        constrain = constrain or (lambda a: a)
        cos, sin = mrope_cos_sin(positions_3BL, self.config, x_BLD.dtype)
        x_BLD = constrain(x_BLD)
        chunk = self.options.attention_chunk
        if self.options.scan_layers and same_structure(self.language_model.layers):
            x_BLD, kv = self._scan_layers(
                self.language_model.layers, x_BLD, cos, sin, mask_BLS, cache, write_index, key_valid_BS, constrain
            )
            return self.language_model.norm(x_BLD), kv
        new_k, new_v = [], []
        for i, layer in enumerate(self.language_model.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            run = remat(lambda x, c, s_, kv_, lyr=layer: lyr(x, c, s_, mask_BLS, kv_, write_index, key_valid_BS, chunk),
                        self.options.remat if cache is None else "none")
            x_BLD, kv = run(x_BLD, cos, sin, kv)
            x_BLD = constrain(x_BLD)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        return self.language_model.norm(x_BLD), (tuple(new_k), tuple(new_v))

    def _scan_layers(self, layers, x_BLD, cos, sin, mask_BLS, cache, write_index, key_valid_BS, constrain):
        """`layers` as one scan (`scan_layers`): returns (x, (per-layer k, per-layer v)) like the
        loop in `decode` (empty tuples without a cache). With a cache, each layer's cache slice
        goes in and its written keys/values come out as the scan's stacked outputs."""
        chunk = self.options.attention_chunk

        def body(layer, x, kv):
            x, kv = layer(x, cos, sin, mask_BLS, kv, write_index, key_valid_BS, chunk)
            return constrain(x), kv

        if cache is None:
            x_BLD, _ = scan_layers(layers, lambda lyr, x, _: body(lyr, x, None), x_BLD,
                                   policy=self.options.remat, dtype=self.dtype)
            return x_BLD, ((), ())
        n = len(layers)
        kv_in = (jnp.stack(cache.k[:n]), jnp.stack(cache.v[:n]))
        x_BLD, (ks, vs) = scan_layers(layers, body, x_BLD, kv_in, dtype=self.dtype)
        return x_BLD, (tuple(ks), tuple(vs))

    def text_rope(self, positions_3BL, dtype):
        """The decoder's (cos, sin) [B, L, E] for multimodal positions [3, B, L]."""
        return mrope_cos_sin(positions_3BL, self.config, dtype)

    def decode_shared(self, xp_ULD, positions_p_3UL, prompt_valid_UL, xr_NLD, positions_r_3NL, take, *,
                      constrain=None):
        """The decoder stack over U prompt rows and N response rows, each prompt computed once for
        all the responses that follow it (`shared_prompt_layer`; `take(a)` maps prompt rows [U, ...]
        to response rows [N, ...], e.g. a gather of each response's prompt). Equal to `decode` over
        the [prompt + response] rows (same positions, keys, masks). Inputs as `embed` returns them
        (Qwen3-VL: widened with the DeepStack features, added to the prompt rows after layer j; a
        response row has none). Layers run in a loop under the remat policy or, with
        `scan_layers`, as one scan (past the DeepStack layers); `constrain` pins both streams at
        every layer boundary. Returns (prompt hidden [U, Lp, D], response hidden [N, Lr, D]) after
        the final norm."""
        constrain = constrain or (lambda a: a)
        D = self.config.text.hidden_size
        deep = xp_ULD[..., D:]
        n_deep = deep.shape[-1] // D
        x = (constrain(xp_ULD[..., :D]), constrain(xr_NLD[..., :D]))
        dt = x[0].dtype
        rope = (self.text_rope(positions_p_3UL, dt), self.text_rope(positions_r_3NL, dt))
        chunk, policy = self.options.attention_chunk, self.options.remat
        layers = list(self.language_model.layers)
        n_loop = min(n_deep, len(layers))
        if not (self.options.scan_layers and n_loop < len(layers) and same_structure(layers[n_loop:])):
            n_loop = len(layers)

        def body(layer, x, rope):
            xp, xr = shared_prompt_layer(layer, x, rope, prompt_valid_UL, take, chunk)
            return constrain(xp), constrain(xr)

        for i, layer in enumerate(layers[:n_loop]):
            x = remat(lambda x_, r_, lyr=layer: body(lyr, x_, r_), policy)(x, rope)
            if i < n_deep:
                x = (constrain(x[0] + deep[..., i * D : (i + 1) * D]), x[1])
        if n_loop < len(layers):
            x, _ = scan_layers(layers[n_loop:], lambda lyr, x_, _: (body(lyr, x_, rope), None), x,
                               policy=policy, dtype=self.dtype)
        norm = self.language_model.norm
        return norm(x[0]), norm(x[1])

    # logical axes of the DecodeCache arrays: keys [., K, E, length], values [., K, length, E]
    DECODE_K_AXES = ("batch", "kv_heads", "head_dim", "kv_length")
    DECODE_V_AXES = ("batch", "kv_heads", "kv_length", "head_dim")

    def init_decode_cache(
        self, prefill_kv, prompt_mask_BL, num_samples: int, gen_len: int, constrain=lambda a, names: a
    ) -> DecodeCache:
        """The sampler's cache from the prefill's per-layer (k, v) [B, L, K, E]: the prompt part
        moved once into the `DecodeCache` layout, and a zeroed generated part for
        B * num_samples rows and `gen_len` slots (`constrain(array, logical axes)` places each)."""
        ks, vs = prefill_kv
        t = self.config.text
        N, K, E = prompt_mask_BL.shape[0] * num_samples, t.num_key_value_heads, t.head_dim
        k_axes, v_axes = self.DECODE_K_AXES, self.DECODE_V_AXES
        pk = tuple(constrain(jnp.transpose(k, (0, 2, 3, 1)), k_axes) for k in ks)
        pv = tuple(constrain(jnp.swapaxes(v, 1, 2), v_axes) for v in vs)
        gk = constrain(jnp.zeros((N, K, E, gen_len), self.dtype), k_axes)
        gv = constrain(jnp.zeros((N, K, gen_len, E), self.dtype), v_axes)
        n = t.num_hidden_layers
        return DecodeCache(pk, pv, prompt_mask_BL, (gk,) * n, (gv,) * n)

    def decode_weights(self) -> tuple[DecodeLayer, ...]:
        """Per-layer fused projections (`DecodeLayer`); call once, outside the decode loop."""
        t = self.config.text
        K, Hg, E = t.num_key_value_heads, t.num_attention_heads // t.num_key_value_heads, t.head_dim
        out = []
        for layer in self.language_model.layers:
            a, mlp = layer.self_attn, layer.mlp
            parts = ((a.q_proj, Hg), (a.k_proj, 1), (a.v_proj, 1))
            w = jnp.concatenate([p.weight().reshape(-1, K, n, E) for p, n in parts], axis=2)
            b = jnp.concatenate([p.bias[...].reshape(K, n, E) for p, n in parts], axis=1)
            gate_up = jnp.stack([mlp.gate_proj.weight(), mlp.up_proj.weight()], axis=1)
            out.append(DecodeLayer(w, b, gate_up))
        return tuple(out)

    def decode_rope(self, positions_N):
        """(cos, sin) [N, 1, 1, E] of one new token per row at text positions `positions_N` (all
        three mrope rows equal, as for every generated token). The sampler computes them one step
        ahead and carries them in its loop state: computed inside the step, XLA fuses cos/sin into
        each layer's rope and evaluates them again for every query and key element."""
        N = positions_N.shape[0]
        pos = jnp.broadcast_to(positions_N[None, :, None], (3, N, 1))
        cos, sin = mrope_cos_sin(pos, self.config, self.dtype)
        return cos[:, 0, None, None, :], sin[:, 0, None, None, :]

    def decode_step(
        self, weights: tuple[DecodeLayer, ...], tokens_N, rope, cache: DecodeCache, slot, num_samples: int
    ):
        """One new token per row: embeds `tokens_N` (rotary `rope` from `decode_rope` of their
        positions), writes their keys/values at generated slot `slot` and attends over the prompt
        plus slots 0..slot. Returns (logits [N, V] fp32, updated cache); equal to `decode` over the
        whole sequence."""
        t = self.config.text
        K, Hg, E = t.num_key_value_heads, t.num_attention_heads // t.num_key_value_heads, t.head_dim
        x = self.embed(tokens_N[:, None], None)[:, 0]  # [N, D]
        N = x.shape[0]
        cos, sin = (a.astype(x.dtype) for a in rope)
        gen_valid = jnp.arange(cache.v[0].shape[2]) <= slot
        new_k, new_v = [], []
        for i, (layer, w) in enumerate(zip(self.language_model.layers, weights)):
            h = layer.input_layernorm(x)
            qkv = jnp.einsum("nd,dkce->nkce", h, w.w_qkv_DKCE.astype(x.dtype)) + w.b_qkv_KCE.astype(x.dtype)
            qk = qkv[:, :, : Hg + 1]
            qk = qk * cos + rotate_half(qk) * sin  # rope on the queries and the key together
            q, k, v = qk[:, :, :Hg], qk[:, :, Hg:], qkv[:, :, Hg + 1 :]  # k, v: [N, K, 1, E]
            k = jnp.swapaxes(k, 2, 3).astype(cache.k[i].dtype)  # [N, K, E, 1]
            new_k.append(jax.lax.dynamic_update_slice_in_dim(cache.k[i], k, slot, axis=3))
            new_v.append(jax.lax.dynamic_update_slice_in_dim(cache.v[i], v.astype(cache.v[i].dtype), slot, 2))
            attn = decode_attention(
                q,
                cache.prompt_k[i],
                cache.prompt_v[i],
                cache.prompt_mask_BL,
                new_k[i],
                new_v[i],
                gen_valid,
                num_samples,
            )
            x = x + layer.self_attn.o_proj(attn.reshape(N, K * Hg * E))
            gu = jnp.einsum("nd,dci->nci", layer.post_attention_layernorm(x), w.w_gate_up_D2I.astype(x.dtype))
            x = x + layer.mlp.down_proj(jax.nn.silu(gu[:, 0]) * gu[:, 1])
        h = self.language_model.norm(x)
        logits = self.logits(h).astype(jnp.float32)
        return logits, cache._replace(k=tuple(new_k), v=tuple(new_v))

    def logits(self, h_BLD):
        if self.lm_head is None:
            return h_BLD @ self.language_model.embed_tokens[...].astype(h_BLD.dtype).T
        return self.lm_head(h_BLD)

    def hidden(self, input_ids_BL, attention_mask_BL, positions_3BL, vision=None, constrain=None):
        """Final hidden states [B, L, D] (after the norm) of a teacher-forced forward."""
        x = self.embed(input_ids_BL, vision)
        h, _ = self.decode(x, positions_3BL, None, key_valid_BS=attention_mask_BL > 0, constrain=constrain)
        return h

    def __call__(self, input_ids_BL, attention_mask_BL, positions_3BL, vision=None):
        """Full forward (training / teacher forcing): logits [B, L, V]."""
        return self.logits(self.hidden(input_ids_BL, attention_mask_BL, positions_3BL, vision))

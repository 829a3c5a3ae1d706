"""Qwen3-VL (dense) in Flax NNX: a vision tower with LayerNorm, learned position embeddings resampled
per image, per-frame full attention and DeepStack mergers, and a Qwen3 decoder (q/k RMSNorm, explicit
head_dim, interleaved multimodal RoPE) that adds the DeepStack features to the image positions after
its first layers. Matches transformers 5.x to fp32 round-off.

The model has Qwen2.5-VL's interface (`embed`, `decode`, `decode_shared`, `logits`, `__call__`, `init_cache`,
`init_decode_cache`, `decode_weights`, `decode_rope`, `decode_step`), so the sampler, GRPO, SFT,
export and evaluation run the same code for both families. It subclasses `Qwen25VL` for the methods
that do not depend on the layer internals (caches, logits, the full forward) and reuses its blocks.

DeepStack through the shared interface: `embed` returns the residual stream's input widened with
the DeepStack features, `x [B, L, (1 + n_deepstack) * D]` (channels D.. hold feature j at image
positions, zeros elsewhere); `decode` takes this wide input, runs the stack on the first D channels
and adds feature j after layer j. Callers only slice, gather and concatenate `embed`'s output over
batch and length, which keeps the features aligned with their tokens.

Shapes in names: B batch, L query length, S key length, D hidden, H heads, K kv heads, E head dim,
P vision patches, M merged vision tokens, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.models.qwen2_5_vl.model import (
    NEG_INF,
    DecodeCache,
    DecodeLayer,
    Dense,
    GatedMLP,
    ModelOptions,
    Qwen25VL,
    RMSNorm,
    VisionAttention,
    _init,
    causal_attention,
    decode_attention,
    image_slots,
    remat,
    rotate_half,
    run_blocks,
    same_structure,
)
from vlm_jax.models.qwen3_vl.config import Qwen3VLConfig

ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


class LayerNorm(nnx.Module):
    """torch LayerNorm: statistics and affine in fp32, result cast to the input dtype."""

    def __init__(self, dim: int, eps: float, *, dtype, axis_name: str = "norm"):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), sharding_names=(axis_name,))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), sharding_names=(axis_name,))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Vision tower
# ----------------------------------------------------------------------------------------------


class VisionMLP(nnx.Module):
    def __init__(self, cfg: Qwen3VLConfig, *, dtype, rngs):
        v = cfg.vision
        self.linear_fc1 = Dense(
            v.hidden_size, v.intermediate_size, ("vision_embed", "vision_mlp"), bias=True, dtype=dtype, rngs=rngs
        )
        self.linear_fc2 = Dense(
            v.intermediate_size, v.hidden_size, ("vision_mlp", "vision_embed"), bias=True, dtype=dtype, rngs=rngs
        )
        self.act = v.hidden_act

    def __call__(self, x):
        return self.linear_fc2(ACTIVATIONS[self.act](self.linear_fc1(x)))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: Qwen3VLConfig, *, dtype, rngs):
        v = cfg.vision
        self.norm1 = LayerNorm(v.hidden_size, 1e-6, dtype=dtype)
        self.norm2 = LayerNorm(v.hidden_size, 1e-6, dtype=dtype)
        self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)  # Qwen2.5-VL's: qkv/proj with bias, fp32 rope
        self.mlp = VisionMLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, seg, halo=None):
        x = x + self.attn(self.norm1(x), cos, sin, seg, halo)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """LayerNorm per patch (main merger) or over the 2x2-merged vector (DeepStack mergers,
    `postshuffle`), then fc1, exact GELU, fc2 to the text width."""

    def __init__(self, cfg: Qwen3VLConfig, *, postshuffle: bool, dtype, rngs):
        v = cfg.vision
        self.hidden = v.hidden_size * v.merge_unit
        self.postshuffle = postshuffle
        self.norm = LayerNorm(self.hidden if postshuffle else v.hidden_size, 1e-6, dtype=dtype)
        self.linear_fc1 = Dense(
            self.hidden, self.hidden, ("merger_in", "vision_mlp"), bias=True, dtype=dtype, rngs=rngs
        )
        self.linear_fc2 = Dense(
            self.hidden, v.out_hidden_size, ("vision_mlp", "embed"), bias=True, dtype=dtype, rngs=rngs
        )

    def __call__(self, x_BPD):
        merged = (*x_BPD.shape[:-2], -1, self.hidden)
        if self.postshuffle:
            x = self.norm(x_BPD.reshape(merged))
        else:
            x = self.norm(x_BPD).reshape(merged)
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))


class VisionTower(nnx.Module):
    def __init__(self, cfg: Qwen3VLConfig, *, dtype, rngs, compute_dtype=None, remat_policy="none", scan=False):
        v = cfg.vision
        self.cfg = cfg
        self.compute_dtype = compute_dtype or dtype
        self.remat_policy = remat_policy
        self.scan = scan  # the blocks between DeepStack taps run as one scan each (`run_blocks`)
        self.patch_embed = Dense(
            v.patch_dim, v.hidden_size, ("vision_patch", "vision_embed"), bias=True, dtype=dtype, rngs=rngs
        )
        self.pos_embed = nnx.Param(
            _init(rngs, (v.num_position_embeddings, v.hidden_size), 0.02, dtype), sharding_names=(None, "vision_embed")
        )
        self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(v.depth)])
        self.merger = PatchMerger(cfg, postshuffle=False, dtype=dtype, rngs=rngs)
        self.deepstack_merger_list = nnx.List(
            [PatchMerger(cfg, postshuffle=True, dtype=dtype, rngs=rngs) for _ in v.deepstack_visual_indexes]
        )

    def rope(self, pos_BP2):
        """2-D vision rope (as Qwen2.5-VL's): cos/sin [..., P, E] in fp32."""
        v = self.cfg.vision
        spatial = v.head_dim // 2
        inv_freq = 1.0 / (v.rope_theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
        f = pos_BP2.astype(jnp.float32)[..., None] * inv_freq  # [..., P, 2, E/4]
        f = jnp.concatenate([f[..., 0, :], f[..., 1, :]], axis=-1)
        f = jnp.concatenate([f, f], axis=-1)
        return jnp.cos(f), jnp.sin(f)

    def __call__(self, vision, constrain=None):
        """(merged features [B, M, D_text], DeepStack features, each [B, M, D_text]) per row in
        image order; the slots after a row's images are garbage. Attention within each frame of a
        row (`segment_attention`), memory linear in the patches. `constrain` pins the rows to the
        batch axes at every block boundary."""
        constrain = constrain or (lambda a: a)
        x = self.patch_embed(vision.patches_BPC.astype(self.compute_dtype))
        table = self.pos_embed[...]
        pos = (table[vision.pos_index_BP4].astype(jnp.float32) * vision.pos_weight_BP4[..., None]).sum(-2)
        x = constrain(x + pos.astype(x.dtype))
        cos, sin = self.rope(vision.rope_pos_BP2)
        index = {k: j for j, k in enumerate(self.cfg.vision.deepstack_visual_indexes)}
        deep = [None] * len(index)

        def tap(i, x):
            deep[index[i]] = constrain(self.deepstack_merger_list[index[i]](x))

        x = run_blocks(self.blocks, x, lambda block, x_, i: constrain(block(x_, cos, sin, vision.seg_BP)),
                       cuts=set(index), after=tap, scan=self.scan, policy=self.remat_policy, dtype=self.compute_dtype)
        return constrain(self.merger(x)), deep


# ----------------------------------------------------------------------------------------------
# Text decoder
# ----------------------------------------------------------------------------------------------


def mrope_cos_sin(positions_3BL, cfg: Qwen3VLConfig, dtype):
    """Interleaved multimodal RoPE: frequency f of E/2 reads row H if f % 3 == 1 and f < 3*sec[1],
    row W if f % 3 == 2 and f < 3*sec[2], else row T; then cat(freq, freq) (NeoX rotate_half)."""
    t = cfg.text
    E = t.head_dim
    inv_freq = 1.0 / (t.rope_theta ** (jnp.arange(0, E, 2, dtype=jnp.float32) / E))
    freqs = positions_3BL.astype(jnp.float32)[..., None] * inv_freq  # [3, B, L, E/2]
    f = jnp.arange(E // 2)
    sec = t.mrope_section
    row = jnp.where((f % 3 == 1) & (f < 3 * sec[1]), 1, jnp.where((f % 3 == 2) & (f < 3 * sec[2]), 2, 0))
    picked = jnp.where(row == 1, freqs[1], jnp.where(row == 2, freqs[2], freqs[0]))
    emb = jnp.concatenate([picked, picked], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def attend(q_BLHE, k_BSKE, v_BSKE, mask_BLS, key_valid_BS=None, chunk: int = 0):
    """GQA attention core, as Qwen2.5-VL's `Attention`: query head h reads kv head h // (H/K).
    With `mask_BLS`, dense over all S keys; with `mask_BLS=None`, causal over S = L keys with
    `key_valid_BS`, per query chunk (Qwen2.5-VL's `causal_attention`, no [L, S] mask)."""
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


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen3VLConfig, *, dtype, rngs):
        t = cfg.text
        self.H, self.K, self.E = t.num_attention_heads, t.num_key_value_heads, t.head_dim
        bias = t.attention_bias
        D = t.hidden_size
        self.q_proj = Dense(D, self.H * self.E, ("embed", "heads"), bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = Dense(D, self.K * self.E, ("embed", "kv_heads"), bias=bias, dtype=dtype, rngs=rngs)
        self.v_proj = Dense(D, self.K * self.E, ("embed", "kv_heads"), bias=bias, dtype=dtype, rngs=rngs)
        self.o_proj = Dense(self.H * self.E, D, ("heads", "embed"), bias=bias, dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(self.E, t.rms_norm_eps, dtype=dtype)
        self.k_norm = RMSNorm(self.E, t.rms_norm_eps, dtype=dtype)

    def project(self, x_BLD, cos_BLE, sin_BLE):
        """Queries [B, L, H, E], keys and values [B, L, K, E]: q/k RMSNorm, then the rope."""
        B, L, _ = x_BLD.shape
        q = self.q_norm(self.q_proj(x_BLD).reshape(B, L, self.H, self.E))
        k = self.k_norm(self.k_proj(x_BLD).reshape(B, L, self.K, self.E))
        v = self.v_proj(x_BLD).reshape(B, L, self.K, self.E)
        cos, sin = cos_BLE[:, :, None, :], sin_BLE[:, :, None, :]
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def __call__(self, x_BLD, cos_BLE, sin_BLE, mask_BLS, kv=None, write_index=None, key_valid_BS=None,
                 chunk: int = 0):
        """As Qwen2.5-VL's `Attention`, with q/k RMSNorm over head_dim before the rope."""
        q, k, v = self.project(x_BLD, cos_BLE, sin_BLE)
        new_kv = None
        if kv is not None:
            k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), write_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), write_index, axis=1)
            new_kv = (k, v)
        return self.o_proj(attend(q, k, v, mask_BLS, key_valid_BS, chunk)), new_kv


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen3VLConfig, *, dtype, rngs):
        t = cfg.text
        self.input_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.mlp = GatedMLP(t.hidden_size, t.intermediate_size, ("embed", "mlp"), bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv=None, write_index=None, key_valid=None, chunk: int = 0):
        h, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, write_index, key_valid, chunk)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), new_kv


class TextModel(nnx.Module):
    def __init__(self, cfg: Qwen3VLConfig, *, dtype, rngs):
        t = cfg.text
        self.embed_tokens = nnx.Param(
            _init(rngs, (t.vocab_size, t.hidden_size), 1.0, dtype), sharding_names=("vocab", "embed")
        )
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(t.num_hidden_layers)])
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps, dtype=dtype)


class Qwen3VL(Qwen25VL):
    """The full model. Use `vlm_jax.models.forward` / the sampler rather than calling it directly."""

    def __init__(self, cfg: Qwen3VLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, options=ModelOptions()):
        self.config = cfg
        self.options = options
        self.param_dtype = dtype  # how the parameters are stored
        self.dtype = jnp.dtype(options.compute_dtype) if options.compute_dtype else dtype  # activations
        self.visual = VisionTower(
            cfg, dtype=dtype, rngs=rngs, compute_dtype=self.dtype, remat_policy=options.remat,
            scan=options.scan_layers,
        )
        self.language_model = TextModel(cfg, dtype=dtype, rngs=rngs)
        t = cfg.text
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Dense(t.hidden_size, t.vocab_size, ("embed", "vocab"), bias=False, dtype=dtype, rngs=rngs)
        )

    def embed(self, input_ids_BL, vision, constrain=None):
        """Token embeddings with the image features at image-token positions (row-major order),
        widened with the DeepStack features: [B, L, (1 + n_deepstack) * D] (see the module doc)."""
        emb = self.language_model.embed_tokens[...]
        x = jnp.take(emb, input_ids_BL, axis=0).astype(self.dtype)
        n = self.config.num_deepstack
        if vision is None:
            return jnp.concatenate([x] + [jnp.zeros_like(x)] * n, axis=-1) if n else x
        feats_BMD, deep = self.visual(vision, constrain)
        is_img, slot = image_slots(input_ids_BL, self.config.image_token_id, feats_BMD.shape[1])
        is_img, slot = is_img[..., None], slot[..., None]
        row = lambda f: jnp.take_along_axis(f.astype(self.dtype), slot, axis=1)  # noqa: E731  (within the row)
        parts = [jnp.where(is_img, row(feats_BMD), x)]
        parts += [jnp.where(is_img, row(d), 0) for d in deep]
        return jnp.concatenate(parts, axis=-1)

    def text_rope(self, positions_3BL, dtype):
        """The decoder's interleaved-mrope (cos, sin) [B, L, E] (used by `decode_shared`)."""
        return mrope_cos_sin(positions_3BL, self.config, dtype)

    def decode(
        self, x_BLD, positions_3BL, mask_BLS, cache=None, write_index=None, *, key_valid_BS=None, constrain=None
    ):
        """Decoder stack over `embed`'s wide output; DeepStack feature j is added after layer j.
        Returns (final hidden [B, L, D] after the norm, new per-layer kv or empty tuples).
        `mask_BLS=None` (causal with `key_valid_BS`, chunked), `constrain` and the per-layer remat
        as in `Qwen25VL.decode`."""
        constrain = constrain or (lambda a: a)
        D = self.config.text.hidden_size
        x_BLD = constrain(x_BLD)
        x, deep = x_BLD[..., :D], x_BLD[..., D:]
        cos, sin = mrope_cos_sin(positions_3BL, self.config, x.dtype)
        chunk = self.options.attention_chunk
        layers = self.language_model.layers
        # with `scan_layers`, the layers that add a DeepStack feature run in the loop, the rest as a scan
        n_loop = min(deep.shape[-1] // D, len(layers))
        if not (self.options.scan_layers and n_loop < len(layers) and same_structure(list(layers)[n_loop:])):
            n_loop = len(layers)
        new_k, new_v = [], []
        for i, layer in enumerate(list(layers)[:n_loop]):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            run = remat(
                lambda x_, c, s_, kv_, lyr=layer: lyr(x_, c, s_, mask_BLS, kv_, write_index, key_valid_BS, chunk),
                self.options.remat if cache is None else "none",
            )
            x, kv = run(x, cos, sin, kv)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
            if (i + 1) * D <= deep.shape[-1]:
                x = x + deep[..., i * D : (i + 1) * D]
            x = constrain(x)
        if n_loop < len(layers):
            rest = None if cache is None else cache._replace(k=cache.k[n_loop:], v=cache.v[n_loop:])
            x, (ks, vs) = self._scan_layers(
                list(layers)[n_loop:], x, cos, sin, mask_BLS, rest, write_index, key_valid_BS, constrain
            )
            new_k, new_v = new_k + list(ks), new_v + list(vs)
        return self.language_model.norm(x), (tuple(new_k), tuple(new_v))

    def decode_weights(self) -> tuple[DecodeLayer, ...]:
        """Per-layer fused projections (`DecodeLayer`; no q/k/v bias unless `attention_bias`)."""
        t = self.config.text
        K, Hg, E = t.num_key_value_heads, t.num_attention_heads // t.num_key_value_heads, t.head_dim
        out = []
        for layer in self.language_model.layers:
            a, mlp = layer.self_attn, layer.mlp
            parts = ((a.q_proj, Hg), (a.k_proj, 1), (a.v_proj, 1))
            w = jnp.concatenate([p.weight().reshape(-1, K, n, E) for p, n in parts], axis=2)
            b = None
            if t.attention_bias:
                b = jnp.concatenate([p.bias[...].reshape(K, n, E) for p, n in parts], axis=1)
            gate_up = jnp.stack([mlp.gate_proj.weight(), mlp.up_proj.weight()], axis=1)
            out.append(DecodeLayer(w, b, gate_up))
        return tuple(out)

    def decode_rope(self, positions_N):
        """(cos, sin) [N, 1, 1, E] of one new text token per row (all three mrope rows equal)."""
        N = positions_N.shape[0]
        pos = jnp.broadcast_to(positions_N[None, :, None], (3, N, 1))
        cos, sin = mrope_cos_sin(pos, self.config, self.dtype)
        return cos[:, 0, None, None, :], sin[:, 0, None, None, :]

    def decode_step(self, weights, tokens_N, rope, cache: DecodeCache, slot, num_samples: int):
        """One new token per row (as `Qwen25VL.decode_step`, with the q/k norms); generated tokens
        are text, so no DeepStack feature applies. Returns (logits [N, V] fp32, updated cache)."""
        t = self.config.text
        K, Hg, E = t.num_key_value_heads, t.num_attention_heads // t.num_key_value_heads, t.head_dim
        x = jnp.take(self.language_model.embed_tokens[...], tokens_N, axis=0).astype(self.dtype)  # [N, D]
        N = x.shape[0]
        cos, sin = (a.astype(x.dtype) for a in rope)
        gen_valid = jnp.arange(cache.v[0].shape[2]) <= slot
        new_k, new_v = [], []
        for i, (layer, w) in enumerate(zip(self.language_model.layers, weights)):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            qkv = jnp.einsum("nd,dkce->nkce", h, w.w_qkv_DKCE.astype(x.dtype))
            if w.b_qkv_KCE is not None:
                qkv = qkv + w.b_qkv_KCE.astype(x.dtype)
            q = a.q_norm(qkv[:, :, :Hg])
            k = a.k_norm(qkv[:, :, Hg : Hg + 1])
            v = qkv[:, :, Hg + 1 :]
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin  # [N, K, 1, E]
            k = jnp.swapaxes(k, 2, 3).astype(cache.k[i].dtype)  # [N, K, E, 1]
            new_k.append(jax.lax.dynamic_update_slice_in_dim(cache.k[i], k, slot, axis=3))
            new_v.append(jax.lax.dynamic_update_slice_in_dim(cache.v[i], v.astype(cache.v[i].dtype), slot, 2))
            attn = decode_attention(
                q, cache.prompt_k[i], cache.prompt_v[i], cache.prompt_mask_BL, new_k[i], new_v[i], gen_valid, num_samples
            )
            x = x + a.o_proj(attn.reshape(N, K * Hg * E))
            gu = jnp.einsum("nd,dci->nci", layer.post_attention_layernorm(x), w.w_gate_up_D2I.astype(x.dtype))
            x = x + layer.mlp.down_proj(jax.nn.silu(gu[:, 0]) * gu[:, 1])
        logits = self.logits(self.language_model.norm(x)).astype(jnp.float32)
        return logits, cache._replace(k=tuple(new_k), v=tuple(new_v))

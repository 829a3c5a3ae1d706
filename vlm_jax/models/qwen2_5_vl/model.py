"""Qwen2.5-VL in Flax NNX: what the family adds to the shared model (`vlm_jax.models.common`): a
vision tower with window + full attention, a 2-D rotary and an RMSNorm patch merger; the Qwen2
decoder's attention (q/k/v with bias, o without) and blocked multimodal RoPE. Matches transformers
5.x to fp32 round-off.

Shapes in names: B batch, L length, D hidden, E head dim, P vision patches, M merged vision tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.models.common.attention import decode_attention  # noqa: F401  (re-exported)
from vlm_jax.models.common.decoder import KVCache, mrope_angles, rope_cos_sin
from vlm_jax.models.common.layers import NEG_INF, Dense, GatedMLP, ModelOptions, RMSNorm, run_blocks, same_structure
from vlm_jax.models.common.model import VisionLanguageModel
from vlm_jax.models.common.vision import VisionAttention, segment_attention, vision_rope
from vlm_jax.models.qwen2_5_vl.config import Qwen25VLConfig

__all__ = ["NEG_INF", "Dense", "KVCache", "ModelOptions", "Qwen25VL", "decode_attention", "mrope_cos_sin",
           "same_structure", "segment_attention"]


class VisionBlock(nnx.Module):
    def __init__(self, cfg: Qwen25VLConfig, *, dtype, rngs):
        self.norm1 = RMSNorm(cfg.vision.hidden_size, 1e-6, dtype=dtype)
        self.norm2 = RMSNorm(cfg.vision.hidden_size, 1e-6, dtype=dtype)
        self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)
        v = cfg.vision
        self.mlp = GatedMLP(
            v.hidden_size, v.intermediate_size, ("vision_embed", "vision_mlp"), bias=True, dtype=dtype, rngs=rngs
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

    def window_patches(self) -> int:
        """The most patches one attention window holds (the window-attention halo)."""
        v = self.cfg.vision
        vws = v.window_size // v.spatial_merge_size // v.patch_size
        return vws * vws * v.merge_unit

    def __call__(self, vision, constrain=None):
        """(merged features [B, M, D_text] per row, in image order; no DeepStack features, []).
        `VisionInputs`: each row holds its own images; the slots after a row's images are garbage.
        `constrain` pins the rows to the batch axes at every block boundary (as the decoder's layers)."""
        constrain = constrain or (lambda a: a)
        x = constrain(self.patch_embed(vision.patches_BPC.astype(self.compute_dtype)))
        cos, sin = vision_rope(vision.rope_pos_BP2, self.cfg.vision)
        full = set(self.cfg.vision.fullatt_block_indexes)
        W = self.window_patches()

        def call(block, x, i):
            seg, halo = (vision.full_seg_BP, None) if i in full else (vision.window_seg_BP, W)
            return constrain(block(x, cos, sin, seg, halo))

        x = run_blocks(self.blocks, x, call, kinds=[i in full for i in range(len(self.blocks))], scan=self.scan,
                       policy=self.remat_policy, dtype=self.compute_dtype)
        merged = constrain(self.merger(x))  # [B, M, D] window order
        return jnp.take_along_axis(merged, vision.window_inverse_BM[..., None], axis=1), []


def mrope_cos_sin(positions_3BL, cfg: Qwen25VLConfig, dtype):
    """Blocked multimodal RoPE: frequency chunk k (sizes `mrope_section`) reads position row k."""
    freqs = mrope_angles(positions_3BL, cfg.text)  # [3, B, L, E/2]
    bounds, start = [], 0
    for size in cfg.text.mrope_section:
        bounds.append((start, start + size))
        start += size
    return rope_cos_sin(jnp.concatenate([freqs[k % 3, ..., a:b] for k, (a, b) in enumerate(bounds)], axis=-1), dtype)


class Qwen25VL(VisionLanguageModel):
    """The full model. Use `vlm_jax.models.forward` / the sampler rather than calling it directly."""

    VisionTower = VisionTower

    @staticmethod
    def attention_options(cfg: Qwen25VLConfig) -> dict:
        return dict(qkv_bias=True, o_bias=False, qk_norm=False)

    def text_rope(self, positions_3BL, dtype):
        """The decoder's blocked-mrope (cos, sin) [B, L, E] for positions [3, B, L]."""
        return mrope_cos_sin(positions_3BL, self.config, dtype)

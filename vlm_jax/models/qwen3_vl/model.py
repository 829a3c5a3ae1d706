"""Qwen3-VL (dense) in Flax NNX: what the family adds to the shared model (`vlm_jax.models.common`):
a vision tower with LayerNorm, learned position embeddings resampled per image, per-frame full
attention and DeepStack mergers; the Qwen3 decoder's attention (q/k RMSNorm over the explicit
head_dim, no biases unless `attention_bias`) and interleaved multimodal RoPE. The decoder adds the
DeepStack features to the image positions after its first layers (`VisionLanguageModel`'s module
doc: `embed` widens the residual stream with them). Matches transformers 5.x to fp32 round-off.

Shapes in names: B batch, L length, D hidden, E head dim, P vision patches, M merged vision tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.models.common.decoder import mrope_angles, rope_cos_sin
from vlm_jax.models.common.layers import Dense, LayerNorm, ModelOptions, init_param, run_blocks
from vlm_jax.models.common.model import VisionLanguageModel
from vlm_jax.models.common.vision import VisionAttention, vision_rope
from vlm_jax.models.qwen3_vl.config import Qwen3VLConfig

__all__ = ["ModelOptions", "Qwen3VL", "mrope_cos_sin"]

ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


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
        self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)  # shared: qkv/proj with bias, fp32 rope
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
            init_param(rngs, (v.num_position_embeddings, v.hidden_size), 0.02, dtype),
            sharding_names=(None, "vision_embed"),
        )
        self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(v.depth)])
        self.merger = PatchMerger(cfg, postshuffle=False, dtype=dtype, rngs=rngs)
        self.deepstack_merger_list = nnx.List(
            [PatchMerger(cfg, postshuffle=True, dtype=dtype, rngs=rngs) for _ in v.deepstack_visual_indexes]
        )

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
        cos, sin = vision_rope(vision.rope_pos_BP2, self.cfg.vision)
        index = {k: j for j, k in enumerate(self.cfg.vision.deepstack_visual_indexes)}
        deep = [None] * len(index)

        def tap(i, x):
            deep[index[i]] = constrain(self.deepstack_merger_list[index[i]](x))

        x = run_blocks(self.blocks, x, lambda block, x_, i: constrain(block(x_, cos, sin, vision.seg_BP)),
                       cuts=set(index), after=tap, scan=self.scan, policy=self.remat_policy, dtype=self.compute_dtype)
        return constrain(self.merger(x)), deep


def mrope_cos_sin(positions_3BL, cfg: Qwen3VLConfig, dtype):
    """Interleaved multimodal RoPE: frequency f of E/2 reads row H if f % 3 == 1 and f < 3*sec[1],
    row W if f % 3 == 2 and f < 3*sec[2], else row T; then cat(freq, freq) (NeoX rotate_half)."""
    freqs = mrope_angles(positions_3BL, cfg.text)  # [3, B, L, E/2]
    f = jnp.arange(cfg.text.head_dim // 2)
    sec = cfg.text.mrope_section
    row = jnp.where((f % 3 == 1) & (f < 3 * sec[1]), 1, jnp.where((f % 3 == 2) & (f < 3 * sec[2]), 2, 0))
    return rope_cos_sin(jnp.where(row == 1, freqs[1], jnp.where(row == 2, freqs[2], freqs[0])), dtype)


class Qwen3VL(VisionLanguageModel):
    """The full model. Use `vlm_jax.models.forward` / the sampler rather than calling it directly."""

    VisionTower = VisionTower

    @staticmethod
    def attention_options(cfg: Qwen3VLConfig) -> dict:
        bias = cfg.text.attention_bias
        return dict(qkv_bias=bias, o_bias=bias, qk_norm=True)

    def text_rope(self, positions_3BL, dtype):
        """The decoder's interleaved-mrope (cos, sin) [B, L, E] for positions [3, B, L]."""
        return mrope_cos_sin(positions_3BL, self.config, dtype)

"""The model both families share: a vision tower feeding the decoder (`decoder.py`), with the
interface the trainer, the sampler, GRPO scoring, export and evaluation use (`embed`, `decode`,
`decode_shared`, `logits`, `hidden`, `__call__`, `init_cache`, `init_decode_cache`,
`decode_weights`, `decode_rope`, `decode_step`).

A family subclasses `VisionLanguageModel` and gives only what differs: its `VisionTower` (called as
`tower(vision, constrain) -> (merged features [B, M, D], DeepStack features)`), its attention's
options (`attention_options`) and its multimodal rotary layout (`text_rope`).

DeepStack (Qwen3-VL) through the shared interface: `embed` returns the residual stream's input
widened with the DeepStack features, `x [B, L, (1 + n_deepstack) * D]` (channels D.. hold feature
j at image positions, zeros elsewhere); `decode` / `decode_shared` run the stack on the first D
channels and add feature j after layer j. Callers only slice, gather and concatenate `embed`'s
output over batch and length, which keeps the features aligned with their tokens. A family
without DeepStack (`config.num_deepstack == 0`) gets plain [B, L, D].

Shapes in names: B batch, L query length, S key length, D hidden, K kv heads, E head dim, M merged
vision tokens, V vocab, N sampled rows, U prompt rows of a shared-prompt forward.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import nnx

from vlm_jax.models.common.decoder import (
    DecodeCache,
    DecodeLayer,
    KVCache,
    TextModel,
    decode_core,
    sequence_core,
    shared_prompt_core,
)
from vlm_jax.models.common.layers import Dense, ModelOptions, remat, same_structure, scan_layers
from vlm_jax.models.common.vision import image_slots


class VisionLanguageModel(nnx.Module):
    """The full model. Use `vlm_jax.models.forward` / the sampler rather than calling it directly."""

    VisionTower: type  # the family's vision tower class

    def __init__(self, cfg, *, dtype=jnp.float32, rngs: nnx.Rngs, options=ModelOptions()):
        self.config = cfg
        self.options = options
        self.param_dtype = dtype  # how the parameters are stored
        self.dtype = jnp.dtype(options.compute_dtype) if options.compute_dtype else dtype  # activations
        self.visual = self.VisionTower(
            cfg, dtype=dtype, rngs=rngs, compute_dtype=self.dtype, remat_policy=options.remat,
            scan=options.scan_layers,
        )
        self.language_model = TextModel(cfg.text, attention=self.attention_options(cfg), dtype=dtype, rngs=rngs)
        t = cfg.text
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Dense(t.hidden_size, t.vocab_size, ("embed", "vocab"), bias=False, dtype=dtype, rngs=rngs)
        )

    @staticmethod
    def attention_options(cfg) -> dict:
        """The decoder attention's `qkv_bias`, `o_bias` and `qk_norm` (`decoder.Attention`)."""
        raise NotImplementedError

    def text_rope(self, positions_3BL, dtype):
        """The decoder's (cos, sin) [B, L, E] for multimodal positions [3, B, L]."""
        raise NotImplementedError

    # -- the residual stream's input -----------------------------------------------------------------

    def embed(self, input_ids_BL, vision, constrain=None):
        """Token embeddings with image features written at image-token positions: each row's image
        tokens, in order, take its own row's merged features (a gather within the row); widened
        with the DeepStack features when the family has them (module doc). `constrain`: the
        batch-axes pin of the vision tower."""
        x = jnp.take(self.language_model.embed_tokens[...], input_ids_BL, axis=0).astype(self.dtype)
        n = self.config.num_deepstack
        if vision is None:
            return jnp.concatenate([x] + [jnp.zeros_like(x)] * n, axis=-1) if n else x
        feats_BMD, deep = self.visual(vision, constrain)
        is_img, slot = image_slots(input_ids_BL, self.config.image_token_id, feats_BMD.shape[1])
        is_img, slot = is_img[..., None], slot[..., None]
        row = lambda f: jnp.take_along_axis(f.astype(self.dtype), slot, axis=1)  # noqa: E731  (within the row)
        parts = [jnp.where(is_img, row(feats_BMD), x)] + [jnp.where(is_img, row(d), 0) for d in deep]
        return jnp.concatenate(parts, axis=-1) if deep else parts[0]

    # -- the decoder stack: training, scoring, prefill ------------------------------------------------

    KV_AXES = ("batch", "kv_length", "kv_heads", "head_dim")  # logical axes of one cache array

    def init_cache(self, batch: int, length: int, key_valid_BS, constrain=lambda a: a) -> KVCache:
        """Zeroed per-layer key/value caches [batch, length, K, E] (`constrain` places them)."""
        t = self.config.text
        zeros = constrain(jnp.zeros((batch, length, t.num_key_value_heads, t.head_dim), self.dtype))
        n = t.num_hidden_layers
        return KVCache((zeros,) * n, (zeros,) * n, key_valid_BS)

    def _loop_count(self, n_deep: int) -> int:
        """How many leading layers run in the Python loop: all of them, or with `scan_layers` the
        ones that add a DeepStack feature (the rest, of one structure, run as one scan)."""
        layers = list(self.language_model.layers)
        n_loop = min(n_deep, len(layers))
        if self.options.scan_layers and n_loop < len(layers) and same_structure(layers[n_loop:]):
            return n_loop
        return len(layers)

    def decode(self, x_BLD, positions_3BL, mask_BLS, cache: KVCache | None = None, write_index=None, *,
               key_valid_BS=None, constrain=None):
        """Decoder stack over `embed`'s output; returns (final hidden [B, L, D] after the norm, the
        new per-layer (k, v) caches, empty tuples without `cache`).

        `mask_BLS=None` means causal over this call's tokens with `key_valid_BS` [B, L] marking the
        real ones, computed per query chunk (no [L, S] mask); with `cache`, each layer's keys and
        values are written at `write_index` first (`sequence_core`). `constrain` (e.g.
        `sharding.batch_constraint(mesh)`) places the activations at the embedding and every layer
        boundary (batch split over the data axes). Each layer runs under the remat policy, or with
        `scan_layers` as one scan (past the DeepStack layers)."""
        constrain = constrain or (lambda a: a)
        D = self.config.text.hidden_size
        x_BLD = constrain(x_BLD)
        x, deep = x_BLD[..., :D], x_BLD[..., D:]
        cos, sin = self.text_rope(positions_3BL, x.dtype)
        core = functools.partial(sequence_core, mask_BLS=mask_BLS, key_valid_BS=key_valid_BS,
                                 chunk=self.options.attention_chunk, write_index=write_index)

        def layer_call(layer, x_, c, s_, kv_):
            return layer(x_, functools.partial(core, cos_BLE=c, sin_BLE=s_, kv=kv_))

        layers = list(self.language_model.layers)
        n_loop = self._loop_count(deep.shape[-1] // D)
        new_k, new_v = [], []
        for i, layer in enumerate(layers[:n_loop]):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            run = remat(functools.partial(layer_call, layer), self.options.remat if cache is None else "none")
            x, kv = run(x, cos, sin, kv)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
            if (i + 1) * D <= deep.shape[-1]:
                x = x + deep[..., i * D : (i + 1) * D]
            x = constrain(x)
        if n_loop < len(layers):
            rest = None if cache is None else (cache.k[n_loop:], cache.v[n_loop:])
            x, (ks, vs) = self._scan_layers(layers[n_loop:], x, functools.partial(core, cos_BLE=cos, sin_BLE=sin),
                                            rest, constrain)
            new_k, new_v = new_k + list(ks), new_v + list(vs)
        return self.language_model.norm(x), (tuple(new_k), tuple(new_v))

    def _scan_layers(self, layers, x_BLD, core, cache_kv, constrain):
        """`layers` as one scan (`scan_layers`): returns (x, (per-layer k, per-layer v)) like the
        loop in `decode` (empty tuples without a cache). With a cache, each layer's cache slice
        goes in and its written keys/values come out as the scan's stacked outputs."""

        def body(layer, x, kv):
            x, kv = layer(x, functools.partial(core, kv=kv))
            return constrain(x), kv

        if cache_kv is None:
            x_BLD, _ = scan_layers(layers, lambda lyr, x, _: body(lyr, x, None), x_BLD,
                                   policy=self.options.remat, dtype=self.dtype)
            return x_BLD, ((), ())
        n = len(layers)
        kv_in = (jnp.stack(cache_kv[0][:n]), jnp.stack(cache_kv[1][:n]))
        x_BLD, (ks, vs) = scan_layers(layers, body, x_BLD, kv_in, dtype=self.dtype)
        return x_BLD, (tuple(ks), tuple(vs))

    def decode_shared(self, xp_ULD, positions_p_3UL, prompt_valid_UL, xr_NLD, positions_r_3NL, take, *,
                      constrain=None):
        """The decoder stack over U prompt rows and N response rows, each prompt computed once for
        all the responses that follow it (`shared_prompt_core`; `take(a)` maps prompt rows [U, ...]
        to response rows [N, ...], e.g. a gather of each response's prompt). Equal to `decode` over
        the [prompt + response] rows (same positions, keys, masks). Inputs as `embed` returns them
        (DeepStack features are added to the prompt rows after layer j; a response row has none).
        Layers run in a loop under the remat policy or, with `scan_layers`, as one scan (past the
        DeepStack layers); `constrain` pins both streams at every layer boundary. Returns (prompt
        hidden [U, Lp, D], response hidden [N, Lr, D]) after the final norm."""
        constrain = constrain or (lambda a: a)
        D = self.config.text.hidden_size
        deep = xp_ULD[..., D:]
        n_deep = deep.shape[-1] // D
        x = (constrain(xp_ULD[..., :D]), constrain(xr_NLD[..., :D]))
        dt = x[0].dtype
        rope = (self.text_rope(positions_p_3UL, dt), self.text_rope(positions_r_3NL, dt))
        core = functools.partial(shared_prompt_core, prompt_valid_UL=prompt_valid_UL, take=take,
                                 chunk=self.options.attention_chunk)
        layers = list(self.language_model.layers)
        n_loop = self._loop_count(n_deep)

        def body(layer, x, rope):
            (xp, xr), _ = layer(x, functools.partial(core, rope=rope))
            return constrain(xp), constrain(xr)

        for i, layer in enumerate(layers[:n_loop]):
            x = remat(lambda x_, r_, lyr=layer: body(lyr, x_, r_), self.options.remat)(x, rope)
            if i < n_deep:
                x = (constrain(x[0] + deep[..., i * D : (i + 1) * D]), x[1])
        if n_loop < len(layers):
            x, _ = scan_layers(layers[n_loop:], lambda lyr, x_, _: (body(lyr, x_, rope), None), x,
                               policy=self.options.remat, dtype=self.dtype)
        norm = self.language_model.norm
        return norm(x[0]), norm(x[1])

    # -- one-token decoding for the sampler -------------------------------------------------------------

    # logical axes of the DecodeCache arrays: keys [., K, E, length], values [., K, length, E]
    DECODE_K_AXES = ("batch", "kv_heads", "head_dim", "kv_length")
    DECODE_V_AXES = ("batch", "kv_heads", "kv_length", "head_dim")

    def init_decode_cache(
        self, prefill_kv, prompt_mask_BL, num_samples: int, gen_len: int, constrain=lambda a, names: a,
        prompt_rows=None,
    ) -> DecodeCache:
        """The sampler's cache from the prefill's per-layer (k, v) [B, L, K, E]: the prompt part
        moved once into the `DecodeCache` layout, and a zeroed generated part for
        B * num_samples rows and `gen_len` slots (`constrain(array, logical axes)` places each).
        `prompt_rows` [N]: the generated part has N rows instead, row n reading prompt
        `prompt_rows[n]` of the prompt part (a refilling sampler's slots)."""
        ks, vs = prefill_kv
        t = self.config.text
        N = prompt_mask_BL.shape[0] * num_samples if prompt_rows is None else prompt_rows.shape[0]
        K, E = t.num_key_value_heads, t.head_dim
        k_axes, v_axes = self.DECODE_K_AXES, self.DECODE_V_AXES
        pk = tuple(constrain(jnp.transpose(k, (0, 2, 3, 1)), k_axes) for k in ks)
        pv = tuple(constrain(jnp.swapaxes(v, 1, 2), v_axes) for v in vs)
        gk = constrain(jnp.zeros((N, K, E, gen_len), self.dtype), k_axes)
        gv = constrain(jnp.zeros((N, K, gen_len, E), self.dtype), v_axes)
        n = t.num_hidden_layers
        return DecodeCache(pk, pv, prompt_mask_BL, (gk,) * n, (gv,) * n, prompt_rows)

    def decode_weights(self) -> tuple[DecodeLayer, ...]:
        """Per-layer fused projections (`DecoderLayer.fused`); call once, outside the decode loop."""
        return tuple(layer.fused() for layer in self.language_model.layers)

    def decode_rope(self, positions_N):
        """(cos, sin) [N, 1, 1, E] of one new token per row at text positions `positions_N` (all
        three mrope rows equal, as for every generated token). The sampler computes them one step
        ahead and carries them in its loop state: computed inside the step, XLA fuses cos/sin into
        each layer's rope and evaluates them again for every query and key element."""
        N = positions_N.shape[0]
        pos = jnp.broadcast_to(positions_N[None, :, None], (3, N, 1))
        cos, sin = self.text_rope(pos, self.dtype)
        return cos[:, 0, None, None, :], sin[:, 0, None, None, :]

    def decode_step(self, weights: tuple[DecodeLayer, ...], tokens_N, rope, cache: DecodeCache, slot,
                    num_samples: int, views: tuple[int, ...] = ()):
        """One new token per row: embeds `tokens_N` (rotary `rope` from `decode_rope` of their
        positions), writes their keys/values at generated slot `slot` (one for all rows, or [N]:
        each row's own, as a refilling sampler's slots are at different lengths) and attends over
        the prompt plus slots 0..slot (`decode_core`), through the same layer body as `decode`.
        Generated tokens are text, so no DeepStack feature applies. `views`: increasing lengths
        ending at the buffer's; attention then reads the generated slots up to the smallest of
        them that holds slot + 1 (of the row furthest on), not the whole buffer. Returns (logits
        [N, V] fp32, updated cache); equal to `decode` over the whole sequence."""
        x = jnp.take(self.language_model.embed_tokens[...], tokens_N, axis=0).astype(self.dtype)  # [N, D]
        cos, sin = (a.astype(x.dtype) for a in rope)
        gen_valid = jnp.arange(cache.v[0].shape[2]) <= jnp.asarray(slot)[..., None]  # [T] or [N, T]
        if gen_valid.ndim == 2:
            gen_valid = gen_valid[:, None, None, :]
        view = None
        if len(views) > 1:
            if views[-1] != cache.v[0].shape[2] or list(views) != sorted(set(views)):
                raise ValueError(f"views must increase to the buffer's {cache.v[0].shape[2]} slots, got {views}")
            filled = jnp.max(jnp.asarray(slot)) + 1
            view = (tuple(views), jnp.minimum(jnp.searchsorted(jnp.asarray(views), filled), len(views) - 1))
        new_k, new_v = [], []
        for i, (layer, w) in enumerate(zip(self.language_model.layers, weights)):
            core = functools.partial(decode_core, cos=cos, sin=sin, fused=w, cache=cache, layer=i, slot=slot,
                                     gen_valid=gen_valid, num_samples=num_samples, view=view)
            x, (k, v) = layer(x, core, w)
            new_k.append(k)
            new_v.append(v)
        logits = self.logits(self.language_model.norm(x)).astype(jnp.float32)
        return logits, cache._replace(k=tuple(new_k), v=tuple(new_v))

    # -- outputs ------------------------------------------------------------------------------------------

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

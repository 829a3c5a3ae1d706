"""Batched autoregressive sampling with a preallocated KV cache, inside one jit.

Each prompt is prefilled once (its images encoded once); the cache is then repeated for the prompt's
`num_samples` samples, which sit in consecutive rows. Decoding runs in a `lax.while_loop` that stops
as soon as every row has emitted an end token. Prompt length and cache length are padded to buckets,
and `max_new_tokens`, `temperature`, `top_p` and `top_k` are traced values, so a second call in the
same bucket does not compile again.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlm_jax import sharding as shd
from vlm_jax.shapes import bucket

PROMPT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
GEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Rollout(NamedTuple):
    """Generated continuations; row i*num_samples + j is sample j of prompt i."""

    tokens: np.ndarray  # int32 [N, T] generated ids, pad after the end token
    lengths: np.ndarray  # int32 [N] tokens generated, the end token included
    logprobs: np.ndarray  # float32 [N, T] log p(token) under the policy at temperature 1; 0 on pad
    truncated: np.ndarray  # bool [N] no end token within max_new_tokens


class SamplingParams(NamedTuple):
    max_new_tokens: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array


def left_align(input_ids: np.ndarray, attention_mask: np.ndarray, length: int, pad_id: int):
    """Re-pads every row on the left to `length` (generation appends at one index for all rows)."""
    B = input_ids.shape[0]
    ids = np.full((B, length), pad_id, np.int32)
    mask = np.zeros((B, length), np.int32)
    for b in range(B):
        row = input_ids[b][attention_mask[b].astype(bool)]
        if len(row) > length:
            raise ValueError(f"prompt row {b} has {len(row)} tokens, more than the bucket {length}")
        ids[b, length - len(row) :] = row
        mask[b, length - len(row) :] = 1
    return ids, mask


def prepare_prompts(
    model,
    batch: Mapping[str, Any],
    *,
    pad_id: int = 0,
    prompt_buckets: Sequence[int] = PROMPT_BUCKETS,
    num_patches: int | None = None,
):
    """Left-aligns a processor batch to a prompt bucket and builds the model inputs for it
    (vision patches padded to `num_patches`, default: the smallest bucket that fits)."""
    ids = np.asarray(batch["input_ids"])
    mask = np.asarray(batch.get("attention_mask", np.ones_like(ids)))
    L = bucket(int(mask.sum(-1).max()), prompt_buckets)
    ids, mask = left_align(ids, mask, L, pad_id)
    return model.prepare({**batch, "input_ids": ids, "attention_mask": mask}, num_patches=num_patches)


def filter_logits(logits_NV, top_p, top_k):
    """Masks logits outside the top-k (k > 0) and outside the top-p nucleus (p < 1) to -inf.
    The most likely token always survives."""
    V = logits_NV.shape[-1]
    sorted_desc = -jnp.sort(-logits_NV, axis=-1)
    rank_ok = jnp.where(top_k > 0, jnp.arange(V) < top_k, True)
    probs = jax.nn.softmax(jnp.where(rank_ok, sorted_desc, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
    keep_sorted = rank_ok & (before < top_p)
    # threshold = smallest kept logit per row
    n_keep = jnp.maximum(keep_sorted.sum(-1), 1)
    threshold = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
    return jnp.where(logits_NV >= threshold, logits_NV, -jnp.inf)


def sample_token(rng, logits_NV, sp: SamplingParams, *, greedy: bool, filtered: bool):
    """Greedy argmax, or a draw from softmax(logits / temperature) truncated to top-k then top-p.

    Temperature is applied before truncation (transformers' and vLLM's order), so the nucleus is
    the top-p mass of the distribution actually sampled from."""
    if greedy:
        return jnp.argmax(logits_NV, axis=-1).astype(jnp.int32)
    logits = logits_NV.astype(jnp.float32) / sp.temperature
    if filtered:
        logits = filter_logits(logits, sp.top_p, sp.top_k)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _constrain(x, mesh, names):
    if mesh is None:
        return x
    spec = shd.logical_to_spec(names, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "gen_len", "num_samples", "greedy", "filtered", "eos_ids", "pad_id", "mesh"),
)
def _generate(
    graphdef,
    params,
    inputs,
    rng,
    sp: SamplingParams,
    *,
    gen_len: int,
    num_samples: int,
    greedy: bool,
    filtered: bool,
    eos_ids: tuple[int, ...],
    pad_id: int,
    mesh=None,
):
    model = nnx.merge(graphdef, params)
    B, L = inputs.input_ids_BL.shape
    S = L + gen_len
    N = B * num_samples

    # ---- prefill once per prompt ------------------------------------------------------------------
    x = model.embed(inputs.input_ids_BL, inputs.vision)
    key_valid = jnp.concatenate([inputs.attention_mask_BL > 0, jnp.zeros((B, gen_len), bool)], 1)
    causal = jnp.arange(S)[None, :] <= jnp.arange(L)[:, None]  # [L, S]
    mask = causal[None] & key_valid[:, None, :]
    kv_names = model.KV_AXES
    cache = model.init_cache(B, S, key_valid, constrain=lambda a: _constrain(a, mesh, kv_names))
    h, (ks, vs) = model.decode(x, inputs.positions_3BL, mask, cache, write_index=0)
    last_logits = model.logits(h[:, -1]).astype(jnp.float32)  # [B, V]
    next_pos = inputs.positions_3BL.max(axis=(0, 2)) + 1  # [B] text positions continue here

    # ---- share each prompt's cache with its samples -----------------------------------------------
    rep = lambda a: jnp.repeat(a, num_samples, axis=0)
    ks = tuple(_constrain(rep(k), mesh, kv_names) for k in ks)
    vs = tuple(_constrain(rep(v), mesh, kv_names) for v in vs)
    state = dict(
        t=jnp.int32(0),
        ks=ks,
        vs=vs,
        key_valid=rep(key_valid),
        logits=rep(last_logits),
        next_pos=rep(next_pos),
        done=jnp.zeros((N,), bool),
        tokens=jnp.full((N, gen_len), pad_id, jnp.int32),
        logprobs=jnp.zeros((N, gen_len), jnp.float32),
        lengths=jnp.zeros((N,), jnp.int32),
    )
    eos = jnp.asarray(eos_ids, jnp.int32)
    limit = jnp.minimum(sp.max_new_tokens, gen_len)

    def cond(s):
        return (s["t"] < limit) & ~jnp.all(s["done"])

    def body(s):
        t = s["t"]
        tok = sample_token(jax.random.fold_in(rng, t), s["logits"], sp, greedy=greedy, filtered=filtered)
        logp = jnp.take_along_axis(jax.nn.log_softmax(s["logits"], -1), tok[:, None], -1)[:, 0]
        live = ~s["done"]
        tok = jnp.where(live, tok, pad_id)
        tokens = s["tokens"].at[:, t].set(tok)
        logprobs = s["logprobs"].at[:, t].set(jnp.where(live, logp, 0.0))
        lengths = s["lengths"] + live.astype(jnp.int32)
        done = s["done"] | (live & jnp.isin(tok, eos))
        # one decode step for the new token
        slot = L + t
        key_valid = s["key_valid"].at[:, slot].set(True)
        pos = jnp.broadcast_to((s["next_pos"] + t)[None, :, None], (3, N, 1))
        x = model.embed(tok[:, None], None)
        step_mask = key_valid[:, None, :]
        h, (ks, vs) = model.decode(
            x, pos, step_mask, cache._replace(k=s["ks"], v=s["vs"], mask_BS=key_valid), write_index=slot
        )
        logits = model.logits(h[:, 0]).astype(jnp.float32)
        return dict(
            t=t + 1,
            ks=ks,
            vs=vs,
            key_valid=key_valid,
            logits=logits,
            next_pos=s["next_pos"],
            done=done,
            tokens=tokens,
            logprobs=logprobs,
            lengths=lengths,
        )

    out = jax.lax.while_loop(cond, body, state)
    return out["tokens"], out["lengths"], out["logprobs"], out["done"]


def generate(
    model,
    params,
    batch: Mapping[str, Any],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_samples: int = 1,
    rng: jax.Array,
    eos_token_ids: Sequence[int] | None = None,
    pad_token_id: int = 0,
    prompt_buckets: Sequence[int] = PROMPT_BUCKETS,
    gen_buckets: Sequence[int] = GEN_BUCKETS,
    num_patches: int | None = None,
) -> Rollout:
    """Samples `num_samples` continuations per prompt of a processor-style batch.

    `temperature == 0` is greedy; `top_k=0` and `top_p=1.0` mean off. Stops a row at any of
    `eos_token_ids` (default: the model's `<|im_end|>`/`<|endoftext|>` from its generation config).
    Returns numpy arrays; `logprobs` are under the unmodified policy (temperature 1), what the GRPO
    importance ratio needs.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or num_samples < 1:
        raise ValueError(
            f"bad sampling parameters: temperature={temperature} top_p={top_p} "
            f"top_k={top_k} num_samples={num_samples}"
        )
    eos = tuple(int(e) for e in (eos_token_ids if eos_token_ids is not None else default_eos_ids(model)))
    inputs = prepare_prompts(
        model, batch, pad_id=pad_token_id, prompt_buckets=prompt_buckets, num_patches=num_patches
    )
    from vlm_jax.models import place_inputs

    inputs = place_inputs(model, inputs)
    greedy = temperature == 0
    sp = SamplingParams(
        jnp.int32(max_new_tokens), jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), jnp.int32(top_k)
    )
    tokens, lengths, logprobs, done = _generate(
        model.graphdef,
        params,
        inputs,
        rng,
        sp,
        gen_len=bucket(max_new_tokens, gen_buckets),
        num_samples=num_samples,
        greedy=greedy,
        filtered=(top_p < 1.0 or top_k > 0) and not greedy,
        eos_ids=eos,
        pad_id=pad_token_id,
        mesh=model.mesh,
    )
    tokens, lengths, logprobs, done = jax.device_get((tokens, lengths, logprobs, done))
    return Rollout(
        np.asarray(tokens)[:, :max_new_tokens],
        np.asarray(lengths),
        np.asarray(logprobs)[:, :max_new_tokens],
        ~np.asarray(done),
    )


def default_eos_ids(model) -> tuple[int, ...]:
    """End tokens from the model directory's generation_config.json (or config.json)."""
    import json

    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = model.source_dir / name if model.source_dir is not None else None
        if path is not None and path.exists():
            raw = json.loads(path.read_text())
            eos = raw.get("eos_token_id", raw.get("text_config", {}).get("eos_token_id"))
            if eos is not None:
                ids = list(eos) if isinstance(eos, list) else [eos]
                break
    if not ids:
        raise ValueError(
            "no eos_token_ids given and none found in the model directory's "
            "generation_config.json / config.json"
        )
    return tuple(ids)

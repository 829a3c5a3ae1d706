"""Batched autoregressive sampling with a preallocated KV cache, inside one jit.

Each prompt is prefilled once (its images encoded once). Its keys/values are stored once and
shared by the prompt's `num_samples` samples (consecutive rows), which only add their own
generated keys/values (the model's `DecodeCache`). Decoding runs in a `lax.while_loop` that stops
as soon as every row has emitted an end token. Prompt length and cache length are padded to
buckets, and `max_new_tokens`, `temperature`, `top_p` and `top_k` are traced values, so a second
call in the same bucket does not compile again. On a mesh that only splits the batch (`data`),
every device runs its own decode loop over its prompts (`data_parallel`); on other meshes one loop
runs over the sharded batch and heads.

Speed: per step one fused q/k/v and one gate/up matmul per layer (weights concatenated once per
call), attention over the prompt bucket (not repeated for a prompt's samples) plus the generated
part up to the view that holds the row furthest on (`decode_views`), a token draw from one uniform
per row (all drawn up front). On a CPU, JAX 0.10's XLA runs each matmul on all the process's
cores (YNNPACK), so one JAX device uses them all; one device per core on a `data` mesh
(`jax_num_cpu_devices`) gives each core its own decode loop, which pays off for small models
(hidden <= 256 here; `scripts/bench_rollout.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from vlm_jax import sharding as shd
from vlm_jax.models import lora
from vlm_jax.rl.draw import sample_token
from vlm_jax.shapes import bucket

# Three prompt buckets per doubling (x1, x1.25, x1.5): the prefill costs the padded length, so a
# power-of-two ladder wastes up to half of it (a 65-token prompt pays for 128), at the price of a
# few more compiles.
PROMPT_BUCKETS = (32, 48) + tuple(2**k * m // 4 for k in range(6, 13) for m in (4, 5, 6)) + (8192,)
GEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# Decode attention reads the generated keys/values up to a power-of-two view of the buffer (from
# this length up) that holds the row furthest on, not the whole buffer (`decode_views`).
MIN_KV_VIEW = 64


class Rollout(NamedTuple):
    """Generated continuations; row i*num_samples + j is sample j of prompt i."""

    tokens: np.ndarray  # int32 [N, T] generated ids, pad after the end token
    lengths: np.ndarray  # int32 [N] tokens generated, the end token included
    logprobs: np.ndarray  # float32 [N, T] log p(token) under the policy at temperature 1; 0 on pad
    truncated: np.ndarray  # bool [N] no end token within max_new_tokens
    # decode slots x decode-loop iterations of the sampler call(s) that produced these rows (each
    # row's first token comes from its prompt's prefill, the rest from the loop; 0 where unknown)
    slot_steps: int = 0


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
    local: bool = False,
):
    """Left-aligns a processor batch to a prompt bucket and builds the model inputs for it
    (vision patches padded to `num_patches`, default: the smallest bucket that fits). `local`: the
    batch is this process's rows of a batch split over processes; the bucket is the one the longest
    prompt of any process needs (`models.prepare_local`)."""
    from vlm_jax import models

    ids = np.asarray(batch["input_ids"])
    mask = np.asarray(batch.get("attention_mask", np.ones_like(ids)))
    longest = int(mask.sum(-1).max())
    if local:
        (longest,) = shd.agree_max(longest)
    ids, mask = left_align(ids, mask, bucket(longest, prompt_buckets), pad_id)
    batch = {**batch, "input_ids": ids, "attention_mask": mask}
    if local:
        return models.prepare_local(model, batch, num_patches=num_patches)
    return model.prepare(batch, num_patches=num_patches)


def _constrain(x, mesh, names):
    if mesh is None:
        return x
    spec = shd.logical_to_spec(names, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


class _Loop(NamedTuple):
    """Decode loop state; `t` is the number of tokens sampled so far."""

    t: jax.Array
    tok: jax.Array  # [N] the token sampled last
    rope: Any  # its rotary (cos, sin), computed one step ahead (see `decode_rope`)
    cache: Any
    done: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "gen_len",
        "num_samples",
        "greedy",
        "filtered",
        "eos_ids",
        "pad_id",
        "mesh",
        "slots",
        "views",
    ),
)
def _generate(graphdef, params, inputs, rng, sp: SamplingParams, *, gen_len: int, num_samples: int, greedy: bool,
              filtered: bool, eos_ids: tuple[int, ...], pad_id: int, mesh=None, slots: int = 0,
              views: tuple[int, ...] = ()):
    """(tokens [N, T], lengths [N], logprobs [N, T], done [N], decode-loop iterations [loops]).
    `slots` > 0: a refilling loop of that many decode slots (`_refill_rows`; split over the data
    axis where each device runs its own loop), else every row in one loop (`_sample_rows`)."""
    model = lora.bind(graphdef, params)
    B = inputs.input_ids_BL.shape[0]
    # Each image is encoded once, by the shard holding its row (the vision inputs are laid out per
    # row); everything after the embedding is per row.
    x = model.embed(inputs.input_ids_BL, inputs.vision, shd.batch_constraint(mesh))
    # all the randomness up front: one number per row and step, the same whatever the mesh
    uniforms = jax.random.uniform(rng, (gen_len, B * num_samples), jnp.float32)
    parallel = data_parallel(mesh, B)
    loop = _sample_rows
    if slots:
        loop = functools.partial(_refill_rows, slots=slots // mesh.shape["data"] if parallel else slots)
    sample_rows = functools.partial(
        loop,
        graphdef,
        gen_len=gen_len,
        num_samples=num_samples,
        greedy=greedy,
        filtered=filtered,
        eos_ids=eos_ids,
        pad_id=pad_id,
        views=views,
    )
    args = (params, x, inputs.positions_3BL, inputs.attention_mask_BL, uniforms, sp)
    if parallel:
        # Rows are independent: each device samples its own prompts in its own decode loop, with
        # no cross-device step (a global loop would all-reduce `done` at every token).
        specs = (P(), P("data"), P(None, "data"), P("data"), P(None, "data"), P())
        local = functools.partial(sample_rows, mesh=None)
        # check_vma=False: the loop's zero-initialised state is device-invariant, its updates are not;
        # nothing inside communicates, so there is nothing for the check to protect
        sharded = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P("data"), check_vma=False)
        return sharded(*args)
    return sample_rows(*args, mesh=mesh)


def data_parallel(mesh, num_prompts: int) -> bool:
    """Whether `_generate` runs one independent decode loop per device: a mesh that only splits the
    batch (fsdp = tensor = 1, so every device holds all parameters) over a `data` axis that divides
    the prompts."""
    if mesh is None:
        return False
    shape = dict(mesh.shape)
    data = shape.pop("data", 1)
    return data > 1 and all(n == 1 for n in shape.values()) and num_prompts % data == 0


def _prefill(model, x_BLD, positions_3BL, attention_mask_BL, *, num_samples: int, mesh):
    """Each prompt prefilled once: (the first-token logits of every sample row [N, V] fp32, the
    prompts' per-layer (k, v) caches [B, L, K, E], the valid-key mask [B, L], each row's next text
    position [N] (its generated tokens continue after its prompt's last position))."""
    B, L = attention_mask_BL.shape
    key_valid = attention_mask_BL > 0
    prefill = model.init_cache(B, L, key_valid, constrain=lambda a: _constrain(a, mesh, model.KV_AXES))
    # causal over the prompt with padding keys masked, per query chunk (no [L, L] mask)
    h, prompt_kv = model.decode(x_BLD, positions_3BL, None, prefill, 0, key_valid_BS=key_valid)
    logits = jnp.repeat(model.logits(h[:, -1]).astype(jnp.float32), num_samples, axis=0)  # [N, V]
    next_pos = jnp.repeat(positions_3BL.max(axis=(0, 2)) + 1, num_samples, axis=0)
    return logits, prompt_kv, key_valid, next_pos


def _sample_rows(graphdef, params, x_BLD, positions_3BL, attention_mask_BL, uniforms_TN, sp: SamplingParams, *,
                 gen_len: int, num_samples: int, greedy: bool, filtered: bool, eos_ids: tuple[int, ...], pad_id: int,
                 mesh, views: tuple[int, ...] = ()):
    """Prefill and decode of embedded prompts `x_BLD` and their samples (rows b*G .. b*G+G-1), every
    row in one loop until the last one stops; returns (tokens [N, T], lengths [N], logprobs [N, T],
    done [N], decode-loop iterations [1])."""
    model = lora.bind(graphdef, params)
    B = attention_mask_BL.shape[0]
    N = B * num_samples

    # ---- prefill once per prompt --------------------------------------------------------------------
    logits, prompt_kv, key_valid, next_pos = _prefill(model, x_BLD, positions_3BL, attention_mask_BL,
                                                      num_samples=num_samples, mesh=mesh)
    # the prompt part of the cache is shared by each prompt's samples (consecutive rows)
    cache = model.init_decode_cache(
        prompt_kv, key_valid, num_samples, gen_len, constrain=lambda a, names: _constrain(a, mesh, names)
    )

    # ---- decode -----------------------------------------------------------------------------------
    weights = model.decode_weights()  # fused once here, not per step
    eos = jnp.asarray(eos_ids, jnp.int32)
    limit = jnp.minimum(sp.max_new_tokens, gen_len)
    vocab_shards = 1 if mesh is None else mesh.shape["tensor"]  # the logits' vocab split (`vocab` rule)

    def record(s: _Loop, logits_NV) -> _Loop:
        """Samples token `s.t` of every row from `logits_NV` and books it (pad once a row stopped)."""
        u = jax.lax.dynamic_index_in_dim(uniforms_TN, s.t, keepdims=False)
        tok, logp = sample_token(u, logits_NV, sp, greedy=greedy, filtered=filtered, shards=vocab_shards)
        live = ~s.done
        tok, logp = jnp.where(live, tok, pad_id), jnp.where(live, logp, 0.0)
        return s._replace(
            t=s.t + 1,
            tok=tok,
            done=s.done | (live & jnp.isin(tok, eos)),
            tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, tok[:, None], s.t, 1),
            logprobs=jax.lax.dynamic_update_slice_in_dim(s.logprobs, logp[:, None], s.t, 1),
            lengths=s.lengths + live.astype(jnp.int32),
        )

    def cond(s: _Loop):
        return (s.t < limit) & ~jnp.all(s.done)

    def body(s: _Loop) -> _Loop:
        slot = s.t - 1  # the last sampled token goes into generated slot t - 1, position next_pos + t - 1
        logits_NV, cache = model.decode_step(weights, s.tok, s.rope, s.cache, slot, num_samples, views)
        s = s._replace(cache=cache, rope=model.decode_rope(next_pos + s.t))
        return record(s, logits_NV)

    state = _Loop(
        t=jnp.int32(0),
        tok=jnp.zeros((N,), jnp.int32),
        rope=model.decode_rope(next_pos),
        cache=cache,
        done=jnp.zeros((N,), bool),
        tokens=jnp.full((N, gen_len), pad_id, jnp.int32),
        logprobs=jnp.zeros((N, gen_len), jnp.float32),
        lengths=jnp.zeros((N,), jnp.int32),
    )
    with jax.named_scope("decode_loop"):  # names the loop in compiled HLO (`plan.loop_collectives`)
        out = jax.lax.while_loop(cond, body, record(state, logits))
    return out.tokens, out.lengths, out.logprobs, out.done, (out.t - 1)[None]


class _Refill(NamedTuple):
    """Refilling decode loop state: slot s holds row `row[s]` (N: empty), which has `k[s]` tokens;
    the outputs are indexed by row."""

    steps: jax.Array  # decode-loop iterations so far
    taken: jax.Array  # how many rows of the queue have taken a slot
    row: jax.Array  # [S]
    k: jax.Array  # [S]
    tok: jax.Array  # [S] the token the slot's row sampled last
    rope: Any  # its rotary (cos, sin), computed one step ahead
    cache: Any  # DecodeCache: every prompt of the call, a generated part per slot
    done: jax.Array  # [N] stopped at an end token
    tokens: jax.Array  # [N, T]
    logprobs: jax.Array  # [N, T]
    lengths: jax.Array  # [N]


def _refill_rows(graphdef, params, x_BLD, positions_3BL, attention_mask_BL, uniforms_TN, sp: SamplingParams, *,
                 slots: int, gen_len: int, num_samples: int, greedy: bool, filtered: bool,
                 eos_ids: tuple[int, ...], pad_id: int, mesh, views: tuple[int, ...] = ()):
    """`_sample_rows` with `slots` decode slots that are refilled: every prompt is prefilled once
    (its keys/values kept in a store the slots read, so its G samples share it) and every row's
    first token drawn from it; the rows that go on wait in row order, `slots` of them decode at a
    time, and when a row stops its slot takes the next waiting row in the same step. The loop ends
    when the last row stops, so its iterations follow the rows' total length / slots rather than
    the longest row. Row n's token t is drawn from `uniforms_TN[t, n]` whichever slot holds it: the
    same tokens, log-probs and lengths as `_sample_rows` (up to float round-off), returned the
    same way.

    Each step gathers every slot's prompt keys/values from the store (per layer), where
    `_sample_rows` reads a prompt's once for its G rows. On a `data_parallel` mesh each device
    refills its own slots from its own prompts; in one loop over a sharded batch (fsdp or tensor
    > 1, e.g. a decoding layout) a slot may take a prompt of another batch shard, and the compiler
    adds small per-step collectives for those reads. (A loop per data shard with `tensor` left to
    the compiler, a partially manual `shard_map`, gathered the weights over `tensor` first.)"""
    model = lora.bind(graphdef, params)
    B = attention_mask_BL.shape[0]
    N = B * num_samples
    S = min(slots, N)
    logits, prompt_kv, key_valid, next_pos = _prefill(model, x_BLD, positions_3BL, attention_mask_BL,
                                                      num_samples=num_samples, mesh=mesh)
    eos = jnp.asarray(eos_ids, jnp.int32)
    limit = jnp.minimum(sp.max_new_tokens, gen_len)
    vocab_shards = 1 if mesh is None else mesh.shape["tensor"]
    draw = functools.partial(sample_token, sp=sp, greedy=greedy, filtered=filtered, shards=vocab_shards)

    # every row's first token, from its prompt's prefill
    tok0, logp0 = draw(uniforms_TN[0], logits)
    ended0 = jnp.isin(tok0, eos)
    waiting = ~ended0 & (limit > 1)
    queue = jnp.argsort(~waiting, stable=True)  # the rows that go on, in row order, then the others
    n_waiting = waiting.sum()

    def assign(taken, finished, row):
        """Slots that are `finished` take the next waiting rows (queue positions from `taken`, in slot
        order), or become empty (N) once the queue is used up."""
        pos = taken + jnp.cumsum(finished) - 1
        new = jnp.where(pos < n_waiting, queue[jnp.minimum(pos, N - 1)], N)
        return jnp.where(finished, new, row), taken + finished.sum()

    row, taken = assign(jnp.int32(0), jnp.ones((S,), bool), jnp.full((S,), N, jnp.int32))
    safe = jnp.minimum(row, N - 1)  # a row's index into [N] arrays (an empty slot reads row N - 1)
    cache = model.init_decode_cache(prompt_kv, key_valid, num_samples, gen_len,
                                    constrain=lambda a, names: _constrain(a, mesh, names),
                                    prompt_rows=safe // num_samples)
    weights = model.decode_weights()

    def cond(s: _Refill):
        return jnp.any(s.row < N)

    def body(s: _Refill) -> _Refill:
        live = s.row < N
        logits_SV, cache = model.decode_step(weights, s.tok, s.rope, s.cache, s.k - 1, 1, views)
        tok, logp = draw(uniforms_TN[s.k, jnp.minimum(s.row, N - 1)], logits_SV)
        ended = live & jnp.isin(tok, eos)
        finished = live & (ended | (s.k + 1 >= limit))
        row, taken = assign(s.taken, finished, s.row)
        k = jnp.where(finished, 1, s.k + live.astype(jnp.int32))
        safe = jnp.minimum(row, N - 1)
        return _Refill(
            steps=s.steps + 1,
            taken=taken,
            row=row,
            k=k,
            tok=jnp.where(finished, tok0[safe], tok),
            rope=model.decode_rope(next_pos[safe] + k - 1),
            cache=cache._replace(prompt_rows=safe // num_samples),
            done=s.done.at[s.row].set(ended, mode="drop"),  # an empty slot's row N is dropped
            tokens=s.tokens.at[s.row, s.k].set(tok, mode="drop"),
            logprobs=s.logprobs.at[s.row, s.k].set(logp, mode="drop"),
            lengths=s.lengths.at[s.row].add(1, mode="drop"),
        )

    state = _Refill(
        steps=jnp.int32(0),
        taken=taken,
        row=row,
        k=jnp.ones((S,), jnp.int32),
        tok=tok0[safe],
        rope=model.decode_rope(next_pos[safe]),
        cache=cache,
        done=ended0,
        tokens=jnp.full((N, gen_len), pad_id, jnp.int32).at[:, 0].set(tok0),
        logprobs=jnp.zeros((N, gen_len), jnp.float32).at[:, 0].set(logp0),
        lengths=jnp.ones((N,), jnp.int32),
    )
    with jax.named_scope("decode_loop"):
        out = jax.lax.while_loop(cond, body, state)
    return out.tokens, out.lengths, out.logprobs, out.done, out.steps[None]


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
    local: bool = False,
    slots: int = 0,
    min_kv_view: int = MIN_KV_VIEW,
) -> Rollout:
    """Samples `num_samples` continuations per prompt of a processor-style batch.

    `temperature == 0` is greedy; `top_k=0` and `top_p=1.0` mean off. Stops a row at any of
    `eos_token_ids` (default: the model's `<|im_end|>`/`<|endoftext|>` from its generation config).
    Returns numpy arrays; `logprobs` are under the unmodified policy (temperature 1), what the GRPO
    importance ratio needs. `local`: `batch` is this process's rows of a batch split over processes
    (every process calls with the same number of rows); the samples of those rows come back.
    `slots` > 0: decode in that many refilled slots (`_refill_rows`: a row that stops hands its
    slot to the next waiting row; the same rows as without, decode work near their total length);
    on a mesh where each device runs its own loop (`data_parallel`) they split over the `data` axis.
    Each decode step's attention reads the generated part of the cache up to the view
    (`decode_views(gen_len, min_kv_view)`) that holds the row furthest on.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or num_samples < 1:
        raise ValueError(
            f"bad sampling parameters: temperature={temperature} top_p={top_p} "
            f"top_k={top_k} num_samples={num_samples}"
        )
    check_slots(slots, model.mesh)
    eos = tuple(int(e) for e in (eos_token_ids if eos_token_ids is not None else default_eos_ids(model)))
    inputs = prepare_prompts(
        model, batch, pad_id=pad_token_id, prompt_buckets=prompt_buckets, num_patches=num_patches, local=local
    )
    from vlm_jax.models import place_inputs

    inputs = place_inputs(model, inputs, local=local)
    greedy = temperature == 0
    sp = SamplingParams(
        jnp.int32(max_new_tokens), jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), jnp.int32(top_k)
    )
    gen_len = bucket(max_new_tokens, gen_buckets)
    tokens, lengths, logprobs, done, steps = _generate(
        model.graphdef,
        params,
        inputs,
        rng,
        sp,
        gen_len=gen_len,
        num_samples=num_samples,
        greedy=greedy,
        filtered=(top_p < 1.0 or top_k > 0) and not greedy,
        eos_ids=eos,
        pad_id=pad_token_id,
        mesh=model.mesh,
        slots=slots,
        views=decode_views(gen_len, min_kv_view),
    )
    tokens, lengths, logprobs, done, steps = shd.to_host((tokens, lengths, logprobs, done, steps))
    loops = len(steps)  # one loop, or one per device of the `data` axis
    rows = len(lengths) // loops
    slot_steps = loops * min(slots // loops if slots else rows, rows) * int(np.max(steps))
    if local:  # this process's prompts' samples (row = prompt * num_samples + j), in its rows' order
        prompts = shd.process_rows(model.mesh, inputs.input_ids_BL.shape[0])
        mine = (prompts[:, None] * num_samples + np.arange(num_samples)).ravel()
        tokens, lengths, logprobs, done = (np.asarray(a)[mine] for a in (tokens, lengths, logprobs, done))
    return Rollout(
        np.asarray(tokens)[:, :max_new_tokens],
        np.asarray(lengths),
        np.asarray(logprobs)[:, :max_new_tokens],
        ~np.asarray(done),
        slot_steps,
    )


def decode_views(gen_len: int, smallest: int = MIN_KV_VIEW) -> tuple[int, ...]:
    """The generated-cache lengths decode attention may read (`Model.decode_step`): powers of two
    from `smallest` below `gen_len`, then `gen_len` (one length: the whole buffer, no switch)."""
    if smallest < 1:
        raise ValueError(f"the smallest KV view must be >= 1, got {smallest}")
    views, v = [], 1 << max(0, smallest - 1).bit_length()
    while v < gen_len:
        views.append(v)
        v *= 2
    return (*views, gen_len)


def check_slots(slots: int, mesh, key: str = "slots") -> None:
    """Raises `ConfigError` (naming `key`) unless `slots` (a refilling sampler's decode slots, 0 =
    off) is >= 0 and splits over the `data` axis of `mesh`, where each device may run its own loop."""
    from vlm_jax.config import ConfigError

    data = 1 if mesh is None else mesh.shape["data"]
    if slots < 0:
        raise ConfigError(f"must be >= 0 (0 = off), got {slots}", key)
    if slots % data:
        raise ConfigError(f"{slots} decode slots do not split over the mesh's data axis of {data}", key)


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

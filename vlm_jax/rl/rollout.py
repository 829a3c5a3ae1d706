"""Rollout orchestration: prompts -> samples -> decoded texts -> rewards -> advantages -> batch.

`generate_and_grade` is the one "generate and grade" function that GRPO rollouts, evaluation and
data filtering share; it takes the sampling settings as one `SamplingSpec` and the special token
ids as one `SpecialTokens`. `collect_rollout` is `sample_groups` (sampling and grading, optional
dynamic sampling: DAPO drops groups whose rewards are all equal and draws more prompts until the
batch is full, with a cap on extra draws) then `build_update_batch` (advantages, reference
log-probs, placement on the devices, metrics).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import place_inputs
from vlm_jax.sharding import agree_max, allgather, gather_rows, process_rows, shard_batch, to_memory
from vlm_jax.rl import decode_layout, grouped, grpo, sampler
from vlm_jax.rl.policy import RolloutBatch, score_responses
from vlm_jax.rl.rows import HOST_KEYS, concat_batches, real_rows, select_rows  # noqa: F401  (re-exported)

# ------------------------------------------------------------------------------------------------
# generate and grade
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """The token ids sampling and row surgery need, passed once: the end tokens a completion stops
    at, the padding id, the image placeholder."""

    eos_ids: tuple[int, ...]
    pad_id: int
    image_id: int

    @classmethod
    def of(cls, processor) -> "SpecialTokens":
        """A `data.processor.Processor`'s (the model's `<|im_end|>` / `<|endoftext|>`)."""
        return cls(tuple(int(e) for e in processor.eos_token_ids), int(processor.pad_token_id),
                   int(processor.image_token_id))


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """How completions are drawn and graded (rollouts, evaluation and the filter share it).

    `temperature` 0 is greedy; `top_k` 0 and `top_p` 1 are off. `prompt_chunk` > 0: the sampler
    runs on that many prompts at a time (its KV cache sized for a chunk). `slots` > 0: each sampler
    call decodes in that many refilled slots (`sampler.generate`). `max_response_length` and
    `overlong_buffer` go to the reward (the soft overlong penalty; default length: max_new_tokens)."""

    max_new_tokens: int
    num_samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    prompt_buckets: tuple[int, ...] = sampler.PROMPT_BUCKETS
    num_patches: int | None = None
    prompt_chunk: int = 0
    slots: int = 0
    max_response_length: int | None = None
    overlong_buffer: int = 0

    @classmethod
    def for_grpo(cls, cfg, prompt_buckets: Sequence[int] = sampler.PROMPT_BUCKETS,
                 num_patches: int | None = None) -> "SamplingSpec":
        """A GRPO stage's rollout sampling (`cfg`: GRPOConfig)."""
        return cls(max_new_tokens=cfg.max_new_tokens, num_samples=cfg.num_samples, temperature=cfg.temperature,
                   top_p=cfg.top_p, top_k=cfg.top_k, prompt_buckets=tuple(prompt_buckets), num_patches=num_patches,
                   prompt_chunk=cfg.rollout_chunk, slots=cfg.refill_slots,
                   overlong_buffer=cfg.overlong_buffer)


@dataclasses.dataclass
class Graded:
    """Samples for a batch of prompts with their decoded texts and rewards (row = prompt*G + j)."""

    prompts: dict  # processor-style batch of the prompts (left aligned) + host keys
    rollout: sampler.Rollout
    texts: list[str]
    rewards: np.ndarray  # float32 [N] total reward
    components: dict[str, np.ndarray]
    num_samples: int


def generate_and_grade(
    model,
    params,
    batch: Mapping[str, Any],
    *,
    spec: SamplingSpec,
    tokens: SpecialTokens,
    tokenizer,
    reward_fn: Callable,
    rng,
    local: bool = False,
) -> Graded:
    """Samples `spec.num_samples` responses per real prompt row, decodes and scores them. With
    `spec.prompt_chunk` > 0 the sampler runs on that many prompts at a time (chunk c draws with
    `fold_in(rng, c)`). `local`: `batch` is this process's rows of a batch split over processes
    (`sampler.generate`); a chunk then takes `prompt_chunk / process count` prompts of each process."""
    prompts = select_rows(batch, real_rows(batch), tokens.image_id)
    num_samples, prompt_chunk = spec.num_samples, spec.prompt_chunk
    sample = functools.partial(
        sampler.generate,
        model,
        params,
        max_new_tokens=spec.max_new_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=spec.top_k,
        num_samples=num_samples,
        eos_token_ids=tokens.eos_ids,
        pad_token_id=tokens.pad_id,
        prompt_buckets=spec.prompt_buckets,
        num_patches=spec.num_patches,
        local=local,
        slots=spec.slots,
    )
    n = len(prompts["input_ids"])
    if local and prompt_chunk > 0:
        prompt_chunk = max(1, prompt_chunk // jax.process_count())
    if prompt_chunk <= 0 or n <= prompt_chunk:
        roll = sample(prompts, rng=rng)
    else:
        parts = [
            sample(select_rows(prompts, list(range(a, min(a + prompt_chunk, n))), tokens.image_id),
                   rng=jax.random.fold_in(rng, c))
            for c, a in enumerate(range(0, n, prompt_chunk))
        ]
        cat = lambda f: np.concatenate([f(r) for r in parts])  # noqa: E731
        roll = sampler.Rollout(cat(lambda r: r.tokens), cat(lambda r: r.lengths), cat(lambda r: r.logprobs),
                               cat(lambda r: r.truncated), sum(r.slot_steps for r in parts))
    texts = tokenizer.batch_decode(
        [t[:n] for t, n in zip(roll.tokens, roll.lengths)], skip_special_tokens=True
    )
    rep = lambda xs: [x for x in xs for _ in range(num_samples)]
    fields = {k: rep(prompts[k]) for k in ("answer_type", "task") if k in prompts}
    fields.update(
        response_lengths=np.asarray(roll.lengths),
        max_response_length=spec.max_response_length or spec.max_new_tokens,
        overlong_buffer=spec.overlong_buffer,
    )
    total, components = reward_fn(texts, rep(prompts["answer"]), **fields)
    return Graded(
        prompts,
        roll,
        texts,
        np.asarray(total, np.float32),
        {k: np.asarray(v, np.float32) for k, v in components.items()},
        num_samples,
    )


# ------------------------------------------------------------------------------------------------
# GRPO rollout batch
# ------------------------------------------------------------------------------------------------


def _take_groups(g: Graded, groups: Sequence[int], image_token_id: int) -> Graded:
    G = g.num_samples
    rows = np.asarray([i * G + j for i in groups for j in range(G)], dtype=np.int64)
    r = g.rollout
    return Graded(
        select_rows(g.prompts, list(groups), image_token_id),
        sampler.Rollout(r.tokens[rows], r.lengths[rows], r.logprobs[rows], r.truncated[rows]),
        [g.texts[i] for i in rows],
        g.rewards[rows],
        {k: v[rows] for k, v in g.components.items()},
        G,
    )


def _concat_graded(parts: Sequence[Graded], image_token_id: int) -> Graded:
    T = max(p.rollout.tokens.shape[1] for p in parts)
    padT = lambda a: np.pad(a, ((0, 0), (0, T - a.shape[1])))
    cat = lambda f: np.concatenate([f(p) for p in parts])
    return Graded(
        concat_batches([p.prompts for p in parts], image_token_id),
        sampler.Rollout(
            cat(lambda p: padT(p.rollout.tokens)),
            cat(lambda p: p.rollout.lengths),
            cat(lambda p: padT(p.rollout.logprobs)),
            cat(lambda p: p.rollout.truncated),
        ),
        [t for p in parts for t in p.texts],
        cat(lambda p: p.rewards),
        {k: np.concatenate([p.components[k] for p in parts]) for k in parts[0].components},
        parts[0].num_samples,
    )


def collect_rollout(
    model,
    params,
    ref_params,
    batches: Iterator[Mapping[str, Any]],
    *,
    cfg,
    tokenizer,
    reward_fn,
    rng,
    tokens: SpecialTokens,
    batch_size: int,
    prompt_buckets: Sequence[int] = sampler.PROMPT_BUCKETS,
    num_patches: int | None = None,
    rules=None,
    shards: int = 1,
) -> tuple[RolloutBatch, Graded, dict]:
    """One GRPO rollout batch of `cfg.num_samples` samples for each of `batch_size` prompts of this
    process (`cfg`: GRPOConfig): `sample_groups` (sampling, grading, dynamic sampling) then
    `build_update_batch` (advantages, reference log-probs, placement, metrics).

    With `cfg.rollout_tensor` > 0 the sampler runs on a decoding mesh with a copy of `params`
    resharded there once for the whole rollout (`decode_layout.decode_layout`, by the logical-axis `rules`);
    the copy is dropped before the reference scoring, which stays in the training layout."""
    spec = SamplingSpec.for_grpo(cfg, prompt_buckets, num_patches)
    sample_model, sample_params = model, params
    if cfg.rollout_tensor:
        sample_model, sample_params = decode_layout.decode_layout(model, params, cfg.rollout_tensor, rules)
    gen = functools.partial(generate_and_grade, sample_model, sample_params, spec=spec, tokens=tokens,
                            tokenizer=tokenizer, reward_fn=reward_fn, local=True)
    graded, counts = sample_groups(gen, batches, rng=rng, cfg=cfg, batch_size=batch_size, shards=shards,
                                   image_id=tokens.image_id)
    del gen, sample_model, sample_params  # the decoding copy is freed here, before the scoring and update
    batch, metrics = build_update_batch(model, ref_params, graded, cfg=cfg, spec=spec, tokens=tokens)
    metrics.update(counts)
    names = getattr(reward_fn, "metric_names", {})
    for k, v in graded.components.items():
        metrics[f"reward/{names.get(k, k)}"] = float(gather_rows(v, model.mesh).mean())
    return batch, graded, metrics


def sample_groups(gen: Callable, batches: Iterator[Mapping[str, Any]], *, rng, cfg, batch_size: int,
                  shards: int = 1, image_id: int) -> tuple[Graded, dict]:
    """The rollout's groups: `gen(batch, rng=...)` (a `generate_and_grade`) over prompt batches
    from `batches` until each of this process's `shards` data shards holds `batch_size / shards`
    prompts' groups. Returns the groups (shard by shard) and the sampling metrics (draws, prompts
    seen, `rollout/decode_slot_util`: tokens decoded / (decode slots x decode-loop iterations)).

    `batches` yields this process's prompts: rows of `shards` data shards (host key `shard`, 0 ..
    shards-1; absent: one shard). Dynamic sampling (`cfg.dynamic_sampling`) keeps each shard's quota
    separately and draws again (every process, a collective sampler call) until every shard of every
    process is full, so the rows a shard contributes depend on its own data only: the same whether
    its process reads one shard or several; past `cfg.max_extra_draws` (or the data's end) it fills
    with equal-reward groups."""
    G = cfg.num_samples
    if batch_size % shards:
        raise ValueError(f"batch_size {batch_size} does not split over {shards} data shards")
    quota = batch_size // shards
    kept: list[list[Graded]] = [[] for _ in range(shards)]
    dropped: list[list[Graded]] = [[] for _ in range(shards)]
    n_kept = [0] * shards
    draws = seen_groups = decoded = slot_steps = 0
    while agree_max(min(n_kept) < quota)[0]:  # some shard of some process is not full
        if draws > 0 and (not cfg.dynamic_sampling or draws > cfg.max_extra_draws):
            break
        try:
            raw, exhausted = next(batches), False
        except StopIteration:  # data exhausted: fill from the equal-reward groups below
            raw, exhausted = None, True
        if agree_max(exhausted)[0]:
            break
        g = gen(raw, rng=jax.random.fold_in(rng, draws))
        draws += 1
        n = len(g.texts) // G
        seen_groups += n
        decoded += int(g.rollout.lengths.sum()) - len(g.rollout.lengths)  # first tokens come from the prefill
        slot_steps += g.rollout.slot_steps
        shard_of = [int(s) for s in g.prompts.get("shard", [0] * n)]
        r = g.rewards.reshape(n, G)
        for s in range(shards):
            mine = [i for i in range(n) if shard_of[i] == s]
            if cfg.dynamic_sampling:
                varied = [i for i in mine if np.ptp(r[i]) > 0]
                flat = [i for i in mine if np.ptp(r[i]) == 0]
            else:
                varied, flat = mine, []
            take = varied[: quota - n_kept[s]]
            if take:
                kept[s].append(_take_groups(g, take, image_id))
                n_kept[s] += len(take)
            if flat:
                dropped[s].append(_take_groups(g, flat, image_id))
    filled = 0
    for s in range(shards):
        if n_kept[s] < quota:  # cap reached (or data exhausted): fill with equal-reward groups
            where = f" (data shard {s} of this process)" if shards > 1 else ""
            if not dropped[s]:
                raise RuntimeError(f"rollout: only {n_kept[s]} of {quota} prompts available{where}")
            pool = _concat_graded(dropped[s], image_id)
            fill = min(quota - n_kept[s], len(pool.texts) // G)
            if n_kept[s] + fill < quota:  # a short batch would change shapes (and recompile) silently
                raise RuntimeError(
                    f"rollout: only {n_kept[s] + fill} of {quota} prompts available{where} after "
                    f"{draws} draws ({n_kept[s]} with varied rewards)"
                )
            kept[s].append(_take_groups(pool, list(range(fill)), image_id))
            n_kept[s] += fill
            filled += fill
    counts = allgather(np.asarray([seen_groups, filled, decoded], np.int64)).sum(axis=0)
    metrics = {"rollout/draws": draws, "rollout/prompts_seen": int(counts[0])}
    if slot_steps:  # the sampler calls' slots x decode-loop iterations (the same on every process)
        metrics["rollout/decode_slot_util"] = float(counts[2] / slot_steps)
    if cfg.dynamic_sampling:
        metrics["dynamic/extra_draws"] = draws - 1
        metrics["dynamic/filled_equal_reward_groups"] = int(counts[1])
    return _concat_graded([part for parts in kept for part in parts], image_id), metrics


def build_update_batch(model, ref_params, graded: Graded, *, cfg, spec: SamplingSpec,
                       tokens: SpecialTokens) -> tuple[RolloutBatch, dict]:
    """The update's batch from this process's groups: advantages over the whole batch (rewards and
    lengths gathered from every process; this process keeps its own rows'), the loss mask, the
    prompts' model inputs and the completions placed where this process's devices are
    (`sharding.row_owners`), and the reference log-probs (`cfg.kl_coef` > 0; length-grouped with
    `cfg.length_groups`). Returns it with the reward / length / advantage metrics."""
    G, roll = cfg.num_samples, graded.rollout
    rewards_all = gather_rows(graded.rewards, model.mesh)
    lengths, truncated = gather_rows(roll.lengths, model.mesh), gather_rows(roll.truncated, model.mesh)
    adv_all = np.asarray(
        grpo.compute_advantages(
            jnp.asarray(rewards_all), G, estimator=cfg.advantage, scaling=cfg.reward_scaling,
            lengths_B=jnp.asarray(lengths),
        ),
        np.float32,
    )
    adv = adv_all[process_rows(model.mesh, len(rewards_all))]
    T = roll.tokens.shape[1]
    mask = np.asarray(
        grpo.response_mask(
            jnp.asarray(roll.lengths), T, truncated_B=jnp.asarray(roll.truncated), mask_truncated=cfg.mask_truncated,
        ),
        np.float32,
    )
    prompt_inputs = place_inputs(
        model,
        sampler.prepare_prompts(model, graded.prompts, pad_id=tokens.pad_id, prompt_buckets=spec.prompt_buckets,
                                num_patches=spec.num_patches, local=True),
        local=True,
    )
    # placed already split over the batch axes (each device holds its own rows)
    place = ((lambda x: jnp.asarray(x)) if model.mesh is None
             else (lambda x: shard_batch(np.asarray(x), model.mesh, local=True)))
    responses, placed_mask = place(np.asarray(roll.tokens, np.int32)), place(mask)
    ref = to_memory(ref_params, "device") if cfg.kl_coef > 0 else None  # a transient copy if kept on the host
    if cfg.kl_coef > 0 and cfg.length_groups:  # length-grouped: each group cut to its own buckets
        rows = (cfg.mini_batch_size or len(rewards_all)) // cfg.length_groups
        ref_logp = grouped.score_grouped(
            model.graphdef, ref, prompt_inputs, responses, grouped.mask_lengths(placed_mask),
            groups=max(1, len(rewards_all) // max(1, rows)), group_size=G, prompt_buckets=spec.prompt_buckets,
            mesh=model.mesh, share_prompt=cfg.share_prompt,
        )
    elif cfg.kl_coef > 0:
        ref_logp = score_responses(model.graphdef, ref, prompt_inputs, responses, group_size=G,
                                   chunk=cfg.score_chunk, share_prompt=cfg.share_prompt, mesh=model.mesh)
    else:
        ref_logp = place(np.zeros(roll.tokens.shape, np.float32))
    batch = RolloutBatch(prompt_inputs, responses, placed_mask, place(np.asarray(roll.logprobs, np.float32)),
                         ref_logp, place(adv))
    groups = rewards_all.reshape(-1, G)
    metrics = {
        "reward/mean": float(rewards_all.mean()),
        "reward/std": float(rewards_all.std()),
        "response_length/mean": float(lengths.mean()),
        "response_length/max": float(lengths.max()),
        "response/truncated_frac": float(truncated.mean()),
        "adv/mean": float(adv_all.mean()),
        "adv/std": float(adv_all.std()),
        "reward/zero_std_group_frac": float(np.mean(np.ptp(groups, axis=1) == 0)),
    }
    return batch, metrics

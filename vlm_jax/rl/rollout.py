"""Rollout orchestration: prompts -> samples -> decoded texts -> rewards -> advantages -> batch.

`generate_and_grade` is the one "generate and grade" function that GRPO rollouts, evaluation and
data filtering share. `collect_rollout` adds group advantages, optional dynamic sampling (DAPO: drop
groups whose rewards are all equal and draw more prompts until the batch is full, with a cap on
extra draws) and reference log-probs.
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
from vlm_jax.rl import grouped, grpo, sampler
from vlm_jax.rl.policy import RolloutBatch, score_responses

HOST_KEYS = (
    "answer",
    "task",
    "answer_type",
    "capability",
    "problem",
    "index",
    "caption",
    "solution",
    "source",
    "shard",  # the row's data shard among this process's (`data.shards`; absent: one shard)
)


# ------------------------------------------------------------------------------------------------
# processor-style batch surgery (rows with their images)
# ------------------------------------------------------------------------------------------------


def _row_images(batch: Mapping[str, Any], image_token_id: int) -> list[list[int]]:
    """Image indices (into image_grid_thw) owned by each row, from the image-token runs."""
    ids = np.asarray(batch["input_ids"])
    mask = np.asarray(batch.get("attention_mask", np.ones_like(ids))).astype(bool)
    n_images = int(np.asarray(batch.get("num_images", len(batch.get("image_grid_thw", ())))))
    out, k = [], 0
    for b in range(ids.shape[0]):
        is_img = (ids[b] == image_token_id) & mask[b]
        runs = int(np.sum(is_img[1:] & ~is_img[:-1]) + is_img[0]) if len(is_img) else 0
        out.append(list(range(k, k + runs)))
        k += runs
    if k != n_images:
        raise ValueError(f"batch has {k} image-token runs but {n_images} images")
    return out


def select_rows(batch: Mapping[str, Any], rows: Sequence[int], image_token_id: int) -> dict:
    """The sub-batch of `rows` (in that order), with their images, left aligned."""
    owned = _row_images(batch, image_token_id)
    grids = np.asarray(batch.get("image_grid_thw", np.zeros((0, 3)))).reshape(-1, 3)
    sizes = np.prod(grids, axis=-1).astype(int)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    pixels = np.asarray(batch.get("pixel_values", np.zeros((0, 1))))
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    seqs = [ids[r][mask[r].astype(bool)] for r in rows]
    L = max(len(s) for s in seqs)
    new_ids = np.zeros((len(rows), L), np.int32)
    new_mask = np.zeros((len(rows), L), np.int32)
    for i, s in enumerate(seqs):
        new_ids[i, L - len(s) :], new_mask[i, L - len(s) :] = s, 1
    imgs = [j for r in rows for j in owned[r]]
    out = dict(input_ids=new_ids, attention_mask=new_mask)
    if imgs:
        out["image_grid_thw"] = grids[imgs].astype(np.int32)
        out["pixel_values"] = np.concatenate([pixels[offsets[j] : offsets[j + 1]] for j in imgs])
    for key in HOST_KEYS:
        if key in batch:
            out[key] = [batch[key][r] for r in rows]
    return out


def concat_batches(batches: Sequence[Mapping[str, Any]], image_token_id: int) -> dict:
    """Row-wise concatenation of processor-style batches (left aligned to the longest row)."""
    parts = [select_rows(b, range(len(b["input_ids"])), image_token_id) for b in batches]
    L = max(p["input_ids"].shape[1] for p in parts)
    pad = lambda a: np.pad(a, ((0, 0), (L - a.shape[1], 0)))
    out = dict(
        input_ids=np.concatenate([pad(p["input_ids"]) for p in parts]),
        attention_mask=np.concatenate([pad(p["attention_mask"]) for p in parts]),
    )
    with_images = [p for p in parts if "image_grid_thw" in p]
    if with_images:
        out["image_grid_thw"] = np.concatenate([p["image_grid_thw"] for p in with_images])
        out["pixel_values"] = np.concatenate([p["pixel_values"] for p in with_images])
    for key in HOST_KEYS:
        if all(key in p for p in parts):
            out[key] = [v for p in parts for v in p[key]]
    return out


def real_rows(batch: Mapping[str, Any]) -> list[int]:
    """Rows that are real examples (pipeline batches pad a final partial batch with row_mask 0)."""
    n = len(batch["input_ids"])
    if "row_mask" not in batch:
        return list(range(n))
    return [i for i in range(n) if batch["row_mask"][i]]


# ------------------------------------------------------------------------------------------------
# generate and grade
# ------------------------------------------------------------------------------------------------


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
    tokenizer,
    reward_fn: Callable,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    rng,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    image_token_id: int,
    max_response_length: int | None = None,
    overlong_buffer: int = 0,
    prompt_buckets: Sequence[int] = sampler.PROMPT_BUCKETS,
    num_patches: int | None = None,
    prompt_chunk: int = 0,
    local: bool = False,
) -> Graded:
    """Samples `num_samples` responses per real prompt row, decodes and scores them. With
    `prompt_chunk` > 0 the sampler runs on that many prompts at a time (its KV cache sized for a
    chunk, not for the batch; chunk c draws with `fold_in(rng, c)`). `local`: `batch` is this
    process's rows of a batch split over processes (`sampler.generate`); a chunk then takes
    `prompt_chunk / process count` prompts of each process."""
    prompts = select_rows(batch, real_rows(batch), image_token_id)
    sample = functools.partial(
        sampler.generate,
        model,
        params,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        num_samples=num_samples,
        eos_token_ids=eos_token_ids,
        pad_token_id=pad_token_id,
        prompt_buckets=prompt_buckets,
        num_patches=num_patches,
        local=local,
    )
    n = len(prompts["input_ids"])
    if local and prompt_chunk > 0:
        prompt_chunk = max(1, prompt_chunk // jax.process_count())
    if prompt_chunk <= 0 or n <= prompt_chunk:
        roll = sample(prompts, rng=rng)
    else:
        parts = [
            sample(select_rows(prompts, list(range(a, min(a + prompt_chunk, n))), image_token_id),
                   rng=jax.random.fold_in(rng, c))
            for c, a in enumerate(range(0, n, prompt_chunk))
        ]
        cat = lambda f: np.concatenate([f(r) for r in parts])  # noqa: E731
        roll = sampler.Rollout(cat(lambda r: r.tokens), cat(lambda r: r.lengths), cat(lambda r: r.logprobs),
                               cat(lambda r: r.truncated))
    texts = tokenizer.batch_decode(
        [t[:n] for t, n in zip(roll.tokens, roll.lengths)], skip_special_tokens=True
    )
    rep = lambda xs: [x for x in xs for _ in range(num_samples)]
    fields = {k: rep(prompts[k]) for k in ("answer_type", "task") if k in prompts}
    fields.update(
        response_lengths=np.asarray(roll.lengths),
        max_response_length=max_response_length or max_new_tokens,
        overlong_buffer=overlong_buffer,
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
    eos_token_ids,
    pad_token_id,
    image_token_id,
    batch_size: int,
    prompt_buckets: Sequence[int] = sampler.PROMPT_BUCKETS,
    num_patches: int | None = None,
    rules=None,
    shards: int = 1,
) -> tuple[RolloutBatch, Graded, dict]:
    """One GRPO rollout batch of `cfg.num_samples` samples for each of `batch_size` prompts of this
    process (`cfg`: GRPOConfig); the batch over all processes holds each process's rows where its
    devices are (`sharding.row_owners`).

    `batches` yields this process's prompts: rows of `shards` data shards (host key `shard`, 0 ..
    shards-1; absent: one shard), each shard filling `batch_size / shards` of the batch's prompts.
    Dynamic sampling keeps each shard's quota separately and draws again (every process, a collective
    sampler call) until every shard of every process is full, so the rows a shard contributes depend
    on its own data only: the same whether its process reads one shard or several. Advantages and
    metrics are over the whole batch (rewards gathered from every process).

    With `cfg.rollout_tensor` > 0 the sampler runs on a decoding mesh with a copy of `params`
    resharded there once for the whole rollout (`sampler.decode_layout`, by the logical-axis `rules`);
    the copy is dropped before the reference scoring, which stays in the training layout."""
    G = cfg.num_samples
    if batch_size % shards:
        raise ValueError(f"batch_size {batch_size} does not split over {shards} data shards")
    quota = batch_size // shards
    sample_model, sample_params = model, params
    if cfg.rollout_tensor:
        sample_model, sample_params = sampler.decode_layout(model, params, cfg.rollout_tensor, rules)
    gen = functools.partial(
        generate_and_grade,
        sample_model,
        sample_params,
        tokenizer=tokenizer,
        reward_fn=reward_fn,
        num_samples=G,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        eos_token_ids=eos_token_ids,
        pad_token_id=pad_token_id,
        image_token_id=image_token_id,
        overlong_buffer=cfg.overlong_buffer,
        prompt_buckets=prompt_buckets,
        num_patches=num_patches,
        prompt_chunk=cfg.rollout_chunk,
        local=True,
    )
    kept: list[list[Graded]] = [[] for _ in range(shards)]
    dropped: list[list[Graded]] = [[] for _ in range(shards)]
    n_kept = [0] * shards
    draws = seen_groups = 0
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
                kept[s].append(_take_groups(g, take, image_token_id))
                n_kept[s] += len(take)
            if flat:
                dropped[s].append(_take_groups(g, flat, image_token_id))
    del gen, sample_model, sample_params  # the decoding copy is freed here, before the scoring and update
    filled = 0
    for s in range(shards):
        if n_kept[s] < quota:  # cap reached (or data exhausted): fill with equal-reward groups
            where = f" (data shard {s} of this process)" if shards > 1 else ""
            if not dropped[s]:
                raise RuntimeError(f"rollout: only {n_kept[s]} of {quota} prompts available{where}")
            pool = _concat_graded(dropped[s], image_token_id)
            fill = min(quota - n_kept[s], len(pool.texts) // G)
            if n_kept[s] + fill < quota:  # a short batch would change shapes (and recompile) silently
                raise RuntimeError(
                    f"rollout: only {n_kept[s] + fill} of {quota} prompts available{where} after "
                    f"{draws} draws ({n_kept[s]} with varied rewards)"
                )
            kept[s].append(_take_groups(pool, list(range(fill)), image_token_id))
            n_kept[s] += fill
            filled += fill
    graded = _concat_graded([part for parts in kept for part in parts], image_token_id)
    roll = graded.rollout
    # the whole batch's rewards (every process's rows, in process order): batch-level baselines and
    # scalings, and the metrics, see all of them; this process keeps its own rows' advantages
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
            jnp.asarray(roll.lengths),
            T,
            truncated_B=jnp.asarray(roll.truncated),
            mask_truncated=cfg.mask_truncated,
        ),
        np.float32,
    )
    prompt_inputs = place_inputs(
        model,
        sampler.prepare_prompts(
            model, graded.prompts, pad_id=pad_token_id, prompt_buckets=prompt_buckets, num_patches=num_patches,
            local=True,
        ),
        local=True,
    )
    # placed already split over the batch axes (each device holds its own rows)
    place = ((lambda x: jnp.asarray(x)) if model.mesh is None
             else (lambda x: shard_batch(np.asarray(x), model.mesh, local=True)))
    responses = place(np.asarray(roll.tokens, np.int32))
    if cfg.kl_coef > 0 and cfg.length_groups:  # length-grouped: each group cut to its own buckets
        placed_mask = place(mask)
        rows = (cfg.mini_batch_size or len(rewards_all)) // cfg.length_groups
        ref_logp = grouped.score_grouped(
            model.graphdef, to_memory(ref_params, "device"), prompt_inputs, responses,
            grouped.mask_lengths(placed_mask), groups=max(1, len(rewards_all) // max(1, rows)), group_size=G,
            prompt_buckets=prompt_buckets, mesh=model.mesh, share_prompt=cfg.share_prompt,
        )
    elif cfg.kl_coef > 0:
        ref_logp = score_responses(
            model.graphdef,
            to_memory(ref_params, "device"),  # a transient copy when it is kept on the host
            prompt_inputs,
            responses,
            group_size=G,
            chunk=cfg.score_chunk,
            share_prompt=cfg.share_prompt,
            mesh=model.mesh,
        )
    else:
        ref_logp = place(np.zeros(roll.tokens.shape, np.float32))
    batch = RolloutBatch(
        prompt_inputs,
        responses,
        place(mask),
        place(np.asarray(roll.logprobs, np.float32)),
        ref_logp,
        place(adv),
    )
    counts = allgather(np.asarray([seen_groups, filled], np.int64)).sum(axis=0)
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
        "rollout/draws": draws,
        "rollout/prompts_seen": int(counts[0]),
    }
    if cfg.dynamic_sampling:
        metrics["dynamic/extra_draws"] = draws - 1
        metrics["dynamic/filled_equal_reward_groups"] = int(counts[1])
    names = getattr(reward_fn, "metric_names", {})
    for k, v in graded.components.items():
        metrics[f"reward/{names.get(k, k)}"] = float(gather_rows(v, model.mesh).mean())
    return batch, graded, metrics

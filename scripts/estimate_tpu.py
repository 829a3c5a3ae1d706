"""The TPU compiler's estimate of a recipe's whole GRPO iteration (sampler, reference scoring and
update), without a TPU (deviceless compile), under a stated response-length distribution.

    python scripts/estimate_tpu.py --config configs/qwen2_5_vl_7b_tpu.py --topology v5p:4x4x4 \
        --model_config configs/hf/Qwen2.5-VL-7B-Instruct [--stage textual_reasoning] [--layers 1] \
        [--means 900,450] [--prompt_len 1400] [--length_groups N] [--json OUT]

THIS IS THE COMPILER'S ESTIMATE, NOT A MEASUREMENT.

Lengths. Response lengths are min(ceil X, cap) with X ~ gamma(shape 2, scale theta), theta solved
so the mean after the cap is each of `--means` (the paper's validation responses: ~900 tokens early
in training, ~450 late; cap `max_new_tokens` = 2048; rows past the cap are truncated completions).
Every prompt is `--prompt_len` tokens (default 1,400: one ~1 Mpx image, 1,003,520 px / 28^2 = 1,280
vision tokens, plus ~120 text tokens), so its bucket is the recipe's largest (2048) on both paths.
The lengths of the step's prompts x samples are drawn once (seed 0); every path and program uses
the same draw.

Update and scoring. The update (`rl.policy.grpo_step`) and the reference scoring
(`rl.policy.score_responses`) are compiled with libtpu for ONE micro-batch / chunk at the recipe's
real sizes (remat, bf16 compute, chunking, FSDP over the topology), `--layers` decoder layers
(every layer is the same program). XLA's cost model counts a loop body once and the programs loop
over attention and log-prob chunks, so the estimate takes the compiler's RATE (counted flops /
`optimal_seconds`, an optimistic roofline assuming perfect overlap) and applies it to the work the
programs execute, counted analytically at the real depth (`forward_flops`: every matmul and the
logits, attention over the full [S, S] block as the chunked attention computes it; x 3 forward +
backward, x 4 with `remat=full`, x 1 for scoring).
  before: today's default path: every completion at `max_new_tokens` response positions plus the
          prompt bucket, in micro-batches of `micro_batch_size` (scoring: `score_chunk`).
  after:  `grpo.length_groups` (`vlm_jax.rl.grouped`, default mini-batch / micro-batch, so a group
          has today's micro-batch rows): the micro-batches `grouped.plan_groups` makes of the drawn
          lengths, each at its own length bucket and prompt bucket; scoring in groups of the same size.
          Each group runs at the padded program's rate (shorter groups may run slower: not modelled).
Where libtpu returns a non-positive `optimal_seconds` (the 3B programs on v5e-8 and v6e-8, libtpu
0.0.52) there is no compiler rate; those figures are then at 100% of the bf16 peak, and say so.

Sampler. Decoding is memory-bound and its `while` has a data-dependent trip count the cost model
does not know, so the compiler's cost analysis is not used for it. Each call's decode loop is
replayed on the drawn lengths (`decode_schedule`): "before", every row of a call decodes until the
call's longest row stops and each step reads the whole generation buffer; "after", each step
reads the generated keys/values only up to the view (`sampler.decode_views`) that holds the row
furthest on, and with `grpo.refill_slots` S the call's rows decode in S refilled slots (a row that
stops hands its slot to the next). A stated roofline per loop iteration and chip: the decoder's
matmul weights + lm_head in their STORAGE dtype (the sampler reads them as stored: fp32 in the
recipes) split over `grpo.rollout_tensor` (or over all chips in the FSDP layout), plus the KV cache
it reads (the prompts' part once per prompt, or once per slot when refilling: each slot gathers its
row's prompt; the generated part over the step's view, for every row or slot) over the chip's HBM
bandwidth; or the step's matmul flops at the bf16 peak if larger; plus the decode step's
collectives counted in the compiled sampler of each path (`plan.plan`'s generate row at 1 and 2
layers, extrapolated linearly to the real depth) over the chip's inter-chip bandwidth, not
overlapped. Prefill: its forward flops at the scoring program's compiler rate. Not modelled: the
vision tower (encoding, and its backward in the stages that train it), the reshard to the decoding
layout, host work (rewards, data), the optimizer update, dispatch between programs.

Outputs per length distribution and path: seconds per iteration, the shares of rollout / scoring /
update, real tokens (prompt + response, unpadded) per second per chip, MFU = model training flops
on the real tokens (3 x forward: no remat, no scoring, no sampler) per second over the chip's bf16
peak, both over the whole iteration and over the update alone (the latter is what EasyR1 reports
as actor MFU), the real tokens' share of the positions the update computes, and the sampler's
decode-slot utilisation (real response tokens / rows x steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")  # quiets libtpu's start-up warnings
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU is only a compile target
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# the sampler's compiled text, for its per-token collectives (libtpu's `compiled.as_text()` can fail on
# it): `main` has XLA dump the generate programs here
DUMP = Path(os.environ.get("TMPDIR", "/tmp")) / f"estimate_tpu_hlo_{os.getpid()}"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# per chip, public spec sheets: bf16 dense peak (FLOP/s), HBM bandwidth and inter-chip interconnect
# bandwidth (bytes/s; ICI 2,400 / 1,600 / 4,800 / 3,584 Gbit/s)
PEAK_BF16 = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}
HBM_BW = {"v4": 1.2e12, "v5e": 819e9, "v5p": 2.765e12, "v6e": 1.64e12}
ICI_BW = {"v4": 300e9, "v5e": 200e9, "v5p": 600e9, "v6e": 448e9}
BF16 = 2  # bytes per KV cache element (the compute dtype)


# ------------------------------------------------------------------------- the length distribution
def survival(n, theta: float):
    """P(X > n) for X ~ gamma(shape 2, scale theta)."""
    x = np.asarray(n, np.float64) / theta
    return np.exp(-x) * (1 + x)


def mean_length(theta: float, cap: int) -> float:
    """E[min(ceil X, cap)] = sum_{n < cap} P(X > n)."""
    return float(survival(np.arange(cap), theta).sum())


def theta_for(mean: float, cap: int) -> float:
    """The scale whose capped mean is `mean` (bisection; the capped mean grows with theta)."""
    lo, hi = 1e-3, 1e3 * cap
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_length(mid, cap) < mean else (lo, mid)
    return (lo + hi) / 2


def draw_lengths(theta: float, cap: int, n: int, seed: int = 0) -> np.ndarray:
    return np.clip(np.ceil(np.random.default_rng(seed).gamma(2.0, theta, n)), 1, cap).astype(np.int64)


# ---------------------------------------------------------------------------------- the model's work
def matmul_params(text) -> int:
    """Parameters of the decoder's matmuls (q/k/v/o, MLP) over all layers plus the lm_head."""
    D, F, H, KV, n, V = (text.hidden_size, text.intermediate_size, text.num_attention_heads,
                         text.num_key_value_heads, text.num_hidden_layers, text.vocab_size)
    hd = getattr(text, "head_dim", None) or D // H
    return n * (D * H * hd + 2 * D * KV * hd + H * hd * D + 3 * D * F) + D * V


def forward_flops(text, rows: int, seq, logit_tokens: int) -> float:
    """Matmul FLOPs of one decoder forward of `rows` rows of `seq` positions (or one row per entry of
    an array `seq`): the projections and MLP per token, scores and values over the full [S, S]
    block per layer, plus the logits of `logit_tokens`."""
    D, H, n, V = text.hidden_size, text.num_attention_heads, text.num_hidden_layers, text.vocab_size
    hd = getattr(text, "head_dim", None) or D // H
    seq = np.asarray(seq, np.float64)
    per_token = 2 * (matmul_params(text) - D * V)  # all layers
    return float(rows * (seq * per_token + 2 * 2 * seq * seq * H * hd * n).sum()) + 2 * logit_tokens * D * V


def compile_cost(fn, args, kwargs) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    compiled = fn.lower(*args, **kwargs).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]), float(cost["optimal_seconds"]), time.perf_counter() - t0


def decode_collectives(cfg, stage: str, topology: str, model_config: str, text_layers: int) -> float | None:
    """Bytes per chip the compiled sampler's decode step moves in collectives, at the real depth:
    the planner's generate row (`plan.plan`) at 1 and 2 layers, extrapolated linearly."""
    import shutil

    from vlm_jax import hlo_traffic, plan

    got = []
    for layers in (1, 2):
        shutil.rmtree(DUMP, ignore_errors=True)
        (row,) = plan.plan(cfg, topology, model_config=model_config, programs=("generate",), stages={stage},
                           num_layers=layers, log=lambda *a: None)
        found = row.detail.get("decode_step_collective_bytes")
        if found is None:  # from XLA's dump of the compiled module instead
            texts = sorted(DUMP.glob("*generate*after_optimizations.txt"))
            found = hlo_traffic.collective_bytes(hlo_traffic.loop_collectives(texts[-1].read_text())) if texts else None
        got.append(found)
    shutil.rmtree(DUMP, ignore_errors=True)
    if None in got:
        return None
    return got[0] + (text_layers - 1) * (got[1] - got[0])


# ------------------------------------------------------------------------------------- the estimate
def compile_programs(cfg, st, topology: str, model_config: str, layers: int) -> dict:
    """The update and reference-scoring programs of stage `st`, compiled at the recipe's sizes:
    {program: (completions per program, counted flops, optimal_seconds, compile s)}."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from vlm_jax import models, plan, startup
    from vlm_jax import sharding as shd
    from vlm_jax.rl import policy
    from vlm_jax.stages import loss_config
    from vlm_jax.train_state import init_fn, make_optimizer

    g = st.grpo
    family, mcfg, raw, folder = plan.load_model_config(model_config)
    mesh = shd.make_mesh(cfg.mesh, devices=plan.topology_devices(topology))
    G, N, T, L = g.num_samples, st.batch_size * g.num_samples, g.max_new_tokens, max(cfg.data.length_buckets)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    sizes = {"update": st.micro_batch_size or g.mini_batch_size or N, "score": g.score_chunk or N}
    for prog, n in sizes.items():
        if n % shards or N % n:
            raise SystemExit(f"{prog}: {n} completions per program must split over {shards} shards and divide {N}")
    optimizer = make_optimizer(st.optimizer, st.steps, st.trainable)
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))
    dtype = startup.dtype_of(cfg.model.dtype)
    mc = dataclasses.replace(mcfg, text=dataclasses.replace(mcfg.text, num_hidden_layers=layers))
    options = family.ModelOptions(**startup.model_options(cfg), remat=st.remat)
    graphdef, abstract = models.abstract_model(family, mc, dtype, options)
    model = models.Model(family, mc, graphdef, raw, dtype, mesh, folder, options)
    params = plan._abstract(abstract, shd.param_shardings(abstract, mesh, cfg.logical_axis_rules))
    state = jax.eval_shape(init_fn(params, optimizer), params)

    def rollout_batch(n: int):  # n completions, each with its own prompt row (a micro-batch's worst case)
        f32 = lambda: plan._batched(mesh, (n, T), jnp.float32)  # noqa: E731
        return policy.RolloutBatch(plan.abstract_inputs(model, mesh, n, L, None), plan._batched(mesh, (n, T), jnp.int32),
                                   f32(), f32(), f32(), plan._batched(mesh, (n,), jnp.float32))

    upd, sc = rollout_batch(sizes["update"]), rollout_batch(sizes["score"])
    out = {"update": (sizes["update"], *compile_cost(
        policy.grpo_step, (state, upd, key), dict(graphdef=graphdef, optimizer=optimizer, group_size=G,
                                                  loss_cfg=loss_config(st), mu=1, minibatch=sizes["update"],
                                                  micro_batch=sizes["update"], mesh=mesh)))}
    out["score"] = (sizes["score"], *compile_cost(policy.score_responses, (graphdef, params, sc.prompt, sc.responses_NT),
                                                  dict(group_size=G, chunk=sizes["score"], mesh=mesh)))
    return dict(programs=out, shards=shards, text=mcfg.text)


def decode_schedule(lengths: np.ndarray, slots: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The decode loop of one sampler call over rows of `lengths` (tokens, the first from the
    prefill): (live rows, generated slots filled by the row furthest on) per loop iteration.
    `slots` 0: every row until the longest stops (`sampler._sample_rows`); else a row that stops
    hands its slot to the next waiting row (`sampler._refill_rows`)."""
    lengths = np.asarray(lengths, np.int64)
    if not slots:
        steps = int(lengths.max()) - 1
        return np.full(steps, lengths.size), np.arange(1, steps + 1)
    queue = [int(n) for n in lengths if n > 1]
    k = np.zeros(slots, np.int64)  # tokens of the slot's row so far (0: empty)
    left = np.zeros(slots, np.int64)  # decode steps the slot's row still needs
    nxt = 0
    live_per_step, filled = [], []
    while True:
        for s in np.flatnonzero(left == 0):
            if nxt < len(queue):
                k[s], left[s], nxt = 1, queue[nxt] - 1, nxt + 1
            else:
                k[s] = 0
        live = left > 0
        if not live.any():
            break
        live_per_step.append(int(live.sum()))
        filled.append(int(k[live].max()))  # the step writes slot k - 1 and reads slots 0 .. k - 1
        k[live] += 1
        left[live] -= 1
    return np.asarray(live_per_step), np.asarray(filled)


def sampler_work(text, cfg, st, lengths, chips: int, gen: str, Bg: int, L: int, gen_len: int,
                 collective_bytes: float | None, *, refill: int, views: tuple[int, ...]) -> dict:
    """Roofline seconds of the rollout's decode loops (prefills aside): per iteration of each call's
    loop, the weights as stored split over `grpo.rollout_tensor` (or all chips) plus the KV cache
    read (the prompts' part: once per prompt, or once per slot when refilling, as each slot
    gathers its row's prompt; the generated part: every row or slot over the view that holds the
    row furthest on) over the HBM bandwidth, or the matmul flops at the bf16 peak if larger, plus
    the step's collectives over the inter-chip bandwidth."""
    g = st.grpo
    G = g.num_samples
    storage = np.dtype(cfg.model.dtype).itemsize
    hd = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_per_position = text.num_hidden_layers * 2 * text.num_key_value_heads * hd * BF16
    split = g.rollout_tensor or chips  # the decoding layout splits weights over tensor, FSDP over all chips
    weight_bytes = matmul_params(text) * storage / split
    attn = 4 * text.num_attention_heads * hd * text.num_hidden_layers  # flops per query per key
    view_of = np.asarray(views)
    steps = seconds = slot_steps = kv_bytes = 0.0
    for c in range(0, len(lengths), Bg * G):
        call = lengths[c:c + Bg * G]
        live, filled = decode_schedule(call, refill)
        width = refill or call.size  # rows the loop computes per iteration (empty slots included)
        view = view_of[np.searchsorted(view_of, filled)]
        prompts_read = width if refill else call.size // G
        kv = kv_per_position * (prompts_read * L + width * view) / chips
        flops = (2 * width * matmul_params(text) + attn * width * (L + view)) / chips
        step_s = np.maximum((weight_bytes + kv) / HBM_BW[gen], flops / PEAK_BF16[gen])
        seconds += float(step_s.sum()) + len(live) * (collective_bytes or 0) / ICI_BW[gen]
        steps += len(live)
        slot_steps += len(live) * width
        kv_bytes += float(kv.sum())
    calls = -(-len(lengths) // (Bg * G))
    decoded = float((lengths - 1).sum())
    return dict(seconds=seconds, calls=calls, rows_per_call=min(Bg * G, len(lengths)), slots=refill,
                views=list(views), decode_steps=steps, decode_steps_per_call=steps / calls,
                decode_slot_utilisation=decoded / slot_steps if slot_steps else 1.0,
                decode_step_weight_bytes_per_chip=weight_bytes, kv_bytes_read_per_chip=kv_bytes,
                decode_step_collective_bytes=collective_bytes)


def iteration(cfg, st, text, chips: int, gen: str, shards: int, rates: dict, lengths: np.ndarray,
              prompt_len: int, length_groups: int, collective_bytes: dict[str, float | None]) -> dict:
    """Seconds of one GRPO iteration (before / after) for response lengths `lengths` [N];
    `collective_bytes`: each path's decode-step collectives per chip."""
    from vlm_jax.rl import grouped
    from vlm_jax.rl.sampler import GEN_BUCKETS, decode_views
    from vlm_jax.shapes import bucket

    g = st.grpo
    G, B, cap = g.num_samples, st.batch_size, g.max_new_tokens
    N = B * G
    buckets = tuple(cfg.data.length_buckets)
    L = bucket(prompt_len, buckets)  # the rollout's longest prompt bucket: every prompt is prompt_len
    mb = g.mini_batch_size or N
    passes = {"update": 4 if st.remat == "full" else 3, "score": 1}
    peak = PEAK_BF16[gen]
    secs = lambda prog, flops: flops / chips / rates[prog]  # noqa: E731  (at the compiler's rate)

    # before: every completion at (L + cap) positions
    before = {prog: secs(prog, passes[prog] * forward_flops(text, N, L + cap, N * cap)) for prog in passes}
    # after: the length groups `grouped` makes (rows stay in their shard; one mini-batch at a time)
    prompt_len_B = np.full(B, prompt_len)
    per = N // shards
    local = np.arange(per).reshape(1, -1).repeat(shards, 0)

    def grouped_work(span: int) -> tuple[float, int]:
        """(forward flops, positions) of one pass over the completions in groups of mb / length_groups
        rows, `span` rows per shard sorted together (a mini-batch, or all for the scoring)."""
        flops, positions = 0.0, 0
        for u in range(per // span):
            for idx, T, Lb in grouped.plan_groups(lengths, prompt_len_B, local[:, u * span:(u + 1) * span],
                                                  span * shards * length_groups // mb, group_size=G, cap=cap,
                                                  L=L, prompt_buckets=buckets):
                flops += forward_flops(text, idx.size, Lb + T, idx.size * T)
                positions += idx.size * (Lb + T)
        return flops, positions

    (score_flops, _), (update_flops, update_positions) = grouped_work(per), grouped_work(mb // shards)
    after = {"score": secs("score", score_flops), "update": secs("update", passes["update"] * update_flops)}
    positions = {"before": N * (L + cap), "after": update_positions}  # the update's, one pass

    # the sampler: calls of Bg prompts; "before" every row of a call decodes until the call's longest
    # stops, reading the whole generation buffer; "after" reads bounded views of it and, with
    # grpo.refill_slots, decodes each call's rows in that many refilled slots
    Bg = min(g.rollout_chunk or B, B)
    gen_len = bucket(cap, GEN_BUCKETS)
    roll = {name: sampler_work(text, cfg, st, lengths, chips, gen, Bg, L, gen_len, coll, refill=refill,
                               views=views)
            for name, refill, views, coll in (("before", 0, (gen_len,), collective_bytes["before"]),
                                              ("after", g.refill_slots, decode_views(gen_len), collective_bytes["after"]))}
    prefill_s = secs("score", forward_flops(text, Bg, L, Bg))
    for r in roll.values():
        r["seconds"] += r["calls"] * prefill_s
    # the decode loops of the same calls with bounded views and 0 (none), rows / 2 or rows / 4
    # refilled slots, the after path's collectives per step: what refilling would change
    rows = Bg * G
    refill_alternatives = {str(S): sampler_work(text, cfg, st, lengths, chips, gen, Bg, L, gen_len,
                                                collective_bytes["after"], refill=S,
                                                views=decode_views(gen_len))["seconds"]
                           for S in (0, rows // 2, rows // 4)}

    real_tokens = N * prompt_len + int(lengths.sum())
    model_flops = 3 * forward_flops(text, 1, prompt_len + lengths, int(lengths.sum()))
    out = dict(sampler=roll, refill_alternatives=refill_alternatives, prefill_s_per_call=prefill_s,
               real_tokens_per_step=real_tokens,
               model_train_flops_per_step=model_flops)
    for name, work in (("before", before), ("after", after)):
        rollout = roll[name]["seconds"]
        total = rollout + work["score"] + work["update"]
        out[name] = dict(seconds=total, rollout_s=rollout, score_s=work["score"], update_s=work["update"],
                         shares={"rollout": rollout / total, "score": work["score"] / total,
                                 "update": work["update"] / total},
                         tokens_per_s_per_chip=real_tokens / total / chips,
                         update_real_fraction=real_tokens / positions[name],
                         mfu=model_flops / total / chips / peak, update_mfu=model_flops / work["update"] / chips / peak)
    return out


def estimate(cfg, stage: str, topology: str, model_config: str, layers: int, means, prompt_len: int,
             length_groups: int | None, log=print) -> dict:
    from vlm_jax import plan

    st = next((s for s in cfg.stages if s.name == stage), None)
    if st is None or st.objective != "grpo" or st.grpo.kl_coef <= 0:
        raise SystemExit(f"stage {stage!r}: not a GRPO stage with a KL reference in this config")
    g = st.grpo
    chips = len(plan.topology_devices(topology))
    gen = topology.split(":")[0].lower()
    peak = PEAK_BF16[gen]
    c = compile_programs(cfg, st, topology, model_config, layers)
    text = c["text"]
    rates, programs = {}, {}
    for prog, (n, flops, opt_s, compile_s) in c["programs"].items():
        usable = opt_s > 0
        rates[prog] = flops / opt_s if usable else peak  # the compiler's FLOP/s per chip, else the peak
        programs[prog] = dict(completions=n, counted_flops_per_chip=flops, optimal_seconds=opt_s,
                              compile_s=compile_s, compiler_rate_usable=usable, rate_per_chip=rates[prog])
        log(f"  {prog}: {layers} layer(s), {n} completions: counted {flops:.3g} flops/chip, optimal_seconds "
            f"{opt_s:.4g} (compile {compile_s:.0f} s) -> " + (f"rate {rates[prog] / 1e12:.0f} TFLOP/s per chip"
                                                               if usable else "NOT USABLE: at 100% of peak"))
    coll = {}
    for path, slots in (("after", g.refill_slots), ("before", 0)):
        if path == "before" and not g.refill_slots:
            coll["before"] = coll["after"]
            continue
        t0 = time.perf_counter()
        c_cfg = dataclasses.replace(cfg, stages=tuple(
            dataclasses.replace(s, grpo=dataclasses.replace(s.grpo, refill_slots=slots)) if s is st else s
            for s in cfg.stages))
        coll[path] = decode_collectives(c_cfg, stage, topology, model_config, text.num_hidden_layers)
        log(f"  sampler ({path}, refill_slots={slots}): decode-step collectives "
            f"{'not counted' if coll[path] is None else f'{coll[path] / 2**20:.1f} MiB/chip'} "
            f"(generate compiled at 1 and 2 layers, {time.perf_counter() - t0:.0f} s)")
    groups = length_groups or (g.mini_batch_size or st.batch_size * g.num_samples) // st.micro_batch_size
    N, cap = st.batch_size * g.num_samples, g.max_new_tokens
    out = dict(topology=topology, chips=chips, stage=stage, completions=N, prompt_len=prompt_len, cap=cap,
               rollout_tensor=g.rollout_tensor, rollout_chunk=g.rollout_chunk, refill_slots=g.refill_slots,
               length_groups=groups,
               layers_compiled=layers, layers=text.num_hidden_layers, remat=st.remat, peak_bf16_per_chip=peak,
               hbm_bw_per_chip=HBM_BW[gen], ici_bw_per_chip=ICI_BW[gen], programs=programs,
               compiler_rate_usable=all(p["compiler_rate_usable"] for p in programs.values()),
               distribution="min(ceil X, cap), X ~ gamma(shape 2, scale theta); seed 0", by_mean={})
    for mean in means:
        theta = theta_for(mean, cap)
        lengths = draw_lengths(theta, cap, N)
        r = iteration(cfg, st, text, chips, gen, c["shards"], rates, lengths, prompt_len, groups, coll)
        r.update(mean_target=mean, theta=theta, mean_drawn=float(lengths.mean()),
                 truncated=float(survival(cap - 1, theta)))
        out["by_mean"][str(mean)] = r
    return out


def summary(r: dict) -> list[str]:
    lines = []
    for mean, d in r["by_mean"].items():
        lines.append(f"  responses mean {d['mean_drawn']:.0f} (target {mean}, theta {d['theta']:.0f}, "
                     f"{d['truncated']:.1%} at the cap)")
        for path in ("before", "after"):
            p, r = d[path], d["sampler"][path]
            lines.append(f"    {path:<6} sampler: {r['calls']} call(s) of {r['rows_per_call']} rows"
                         + (f" in {r['slots']} refilled slots" if r["slots"] else "")
                         + f", {r['decode_steps_per_call']:.0f} decode steps per call, KV views {r['views']}, "
                         f"slot utilisation {r['decode_slot_utilisation']:.0%}, {r['seconds']:.1f} s")
            lines.append(f"    {path:<6} {p['seconds']:7.1f} s/iter (rollout {p['shares']['rollout']:.0%}, scoring "
                         f"{p['shares']['score']:.0%}, update {p['shares']['update']:.0%}), "
                         f"{p['tokens_per_s_per_chip']:,.0f} tokens/s/chip, MFU {p['mfu']:.1%} "
                         f"(update alone {p['update_mfu']:.1%}); real tokens {p['update_real_fraction']:.0%} "
                         "of the update's positions")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP} --xla_dump_hlo_as_text"
                               " --xla_dump_hlo_module_re=.*generate.*").strip()  # before JAX starts
    overrides = [a for a in argv if a.startswith("--config.")]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--topology", required=True)
    ap.add_argument("--model_config", required=True)
    ap.add_argument("--stage", default="textual_reasoning")
    ap.add_argument("--layers", type=int, default=1, help="decoder layers in the compiled update / scoring")
    ap.add_argument("--means", default="900,450", help="mean response lengths, one estimate each")
    ap.add_argument("--prompt_len", type=int, default=1400, help="tokens of every prompt (text + image)")
    ap.add_argument("--length_groups", type=int, default=None,
                    help="the 'after' path's grpo.length_groups (default: mini-batch / micro-batch)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args([a for a in argv if not a.startswith("--config.")])
    from vlm_jax import config as config_lib

    cfg = config_lib.load_config(args.config, [o[len("--config."):] for o in overrides])
    command = f"python scripts/estimate_tpu.py {' '.join(argv)}"
    print(f"command: {command}")
    t0 = time.perf_counter()
    r = estimate(cfg, args.stage, args.topology, args.model_config, args.layers,
                 [int(m) for m in args.means.split(",")], args.prompt_len, args.length_groups)
    print(f"THE TPU COMPILER'S ESTIMATE (not a measurement), {time.perf_counter() - t0:.0f} s of compiling on this CPU")
    print(f"{args.topology} ({r['chips']} chips), stage {r['stage']}: {r['completions']} completions, prompts "
          f"{r['prompt_len']} tokens, responses capped at {r['cap']}; after = grpo.length_groups={r['length_groups']}; "
          f"sampler: bounded KV reads, refill_slots={r['refill_slots']}" + ("" if r["compiler_rate_usable"] else
                                                  "; NO COMPILER RATE: update / scoring at 100% of the bf16 peak"))
    print("\n".join(summary(r)))
    if args.json:
        Path(args.json).write_text(json.dumps({**r, "command": command}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

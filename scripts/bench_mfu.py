"""Model FLOP utilisation of the SFT step and the GRPO update against this machine's matmul peak.

    python scripts/bench_mfu.py [--repeats 3] [--cpus N] [--json OUT]
                                [--sft_batch 4] [--sft_len 512] [--grpo_prompts 2] [--grpo_samples 4]
                                [--prompt_len 128] [--response_len 256]

JAX runs one CPU device (`--devices 1`, the default, as the trainer does on a CPU), whose matmuls
use all the pinned cores (JAX 0.10's XLA calls YNNPACK with a thread per core); `--devices N` runs N
devices with the batch split over a `data` mesh (slower: each device all-reduces the gradients and
runs the whole optimizer: 29% / 31% MFU against 42% / 36% with one device on 2026-12-03, before
the training programs' compile options, `train_state.train_compiler_options`). Peak: the
best FLOP/s of a large `jnp.dot` on every device at once (`--peak_n` square blocks, fp32, the dtype
the steps use) in this process, measured between the steps so it sees the same background load. Achieved: model
FLOPs per step / median seconds per step (`vlm_jax.sft.sft_step` and `vlm_jax.rl.policy.grpo_step`
with one mini-batch, mu = 1, AdamW), on a ~47M-parameter Qwen2.5-VL-shaped decoder (`MFU_SPEC`:
hidden 512, 10 layers, 8 heads / 2 KV heads, MLP 2048, vocab 8192, untied; text-only rows, so the
decoder is all the work). Model FLOPs are counted analytically (`train_flops`: 2 x multiply-adds of
every matmul, forward x 3 for forward + backward; attention counted over the full [S, S] block as
computed; embeddings lookups and elementwise work not counted) and cross-checked against XLA's
`cost_analysis()` of the compiled step (per device, times the devices), which counts what the program executes (elementwise ops,
the optimizer and recomputation included). The steps run with `attention_chunk=0` and
`logits_chunk=0` (one block) so that `cost_analysis` sees no loops (XLA counts a while loop's body
once); `--default_chunks` times the trainer's default chunking instead (same model FLOPs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(ROOT))

MFU_SPEC = dict(vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=10,
                num_attention_heads=8, num_key_value_heads=2, head_dim=64, mrope_section=(8, 12, 12),
                vision_depth=2, vision_hidden_size=128, vision_intermediate_size=256, vision_num_heads=4,
                fullatt_block_indexes=(1,), tie_word_embeddings=False)


from bench_rollout import pin_cpus  # noqa: E402  (scripts/ is on sys.path: stdlib-only import)


def forward_flops(spec: dict, rows: int, seq: int, logit_tokens: int) -> float:
    """Matmul FLOPs of one decoder forward over `rows` sequences of `seq` tokens, with the
    vocabulary projection over `logit_tokens` tokens in all: per token and layer 2 x (q, k, v, o
    and the gated MLP's three projections); per layer 2 x 2 x rows x seq^2 x heads x head_dim for
    scores and values; 2 x D x V per logit token."""
    D, F, H, KV, hd, n, V = (spec[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                "num_key_value_heads", "head_dim", "num_hidden_layers",
                                                "vocab_size"))
    per_token_layer = 2 * (D * H * hd + 2 * D * KV * hd + H * hd * D + 3 * D * F)
    attention_layer = 2 * 2 * rows * seq * seq * H * hd
    return n * (rows * seq * per_token_layer + attention_layer) + 2 * logit_tokens * D * V


def train_flops(spec: dict, rows: int, seq: int, logit_tokens: int) -> float:
    """Forward + backward (the backward does two matmuls per forward matmul): 3 x forward."""
    return 3 * forward_flops(spec, rows, seq, logit_tokens)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per step after the first")
    parser.add_argument("--cpus", type=int, default=None)
    parser.add_argument("--peak_n", type=int, default=2048, help="square matmul size for the peak")
    parser.add_argument("--sft_batch", type=int, default=4)
    parser.add_argument("--sft_len", type=int, default=512)
    parser.add_argument("--grpo_prompts", type=int, default=2)
    parser.add_argument("--grpo_samples", type=int, default=4)
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--response_len", type=int, default=256)
    parser.add_argument("--default_chunks", action="store_true",
                        help="the trainer's default attention / logits chunking (cost_analysis then undercounts)")
    parser.add_argument("--devices", type=int, default=1,
                        help="JAX CPU devices (default 1: its matmuls use all pinned cores; "
                             "> 1: the batch on a data mesh)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.devices < 1:
        parser.error(f"--devices must be >= 1 (got {args.devices})")
    cpus = pin_cpus(args.cpus)

    import jax

    try:
        jax.config.update("jax_num_cpu_devices", args.devices)
    except RuntimeError:  # the backend already started (main() called in a running process)
        pass
    import jax.numpy as jnp
    import numpy as np

    from vlm_jax import models
    from vlm_jax.config import OptimizerConfig
    from vlm_jax.models.tiny import TinySpec, build_tiny_model
    from vlm_jax.rl import grpo
    from vlm_jax.rl.policy import RolloutBatch, grpo_step
    from vlm_jax.sft import SFTBatch, sft_step
    from vlm_jax.train_state import init_state, make_optimizer

    # --- the matmul peak: each device multiplies its own [n, n] block by a shared [n, n] matrix -----
    from vlm_jax import sharding

    mesh = sharding.make_mesh() if len(jax.devices()) > 1 else None
    n, d = args.peak_n, len(jax.devices())
    a = jax.random.normal(jax.random.key(1), (d * n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    if mesh is not None:
        a = sharding.shard_batch(np.asarray(a), mesh)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    peaks: list[float] = []

    def measure_peak():
        t = min(seconds(lambda: dot(a, b).block_until_ready()) for _ in range(3))
        peaks.append(2 * d * n**3 / t)

    measure_peak()

    # --- the model and the steps ---------------------------------------------------------------
    options = {} if args.default_chunks else dict(attention_chunk=0, logits_chunk=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(Path(tmp) / "model", spec=TinySpec(**MFU_SPEC), seed=0)
        model, params = models.from_pretrained(path, mesh=mesh)
    if options:
        model = model.with_options(**options)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    optimizer = make_optimizer(OptimizerConfig(lr=1e-5, weight_decay=0.0, max_grad_norm=1.0), 1000,
                               ("vision", "merger", "language_model"))
    V = MFU_SPEC["vocab_size"]
    rng = np.random.default_rng(0)

    # SFT: B rows of L tokens, loss on every token
    B, L = args.sft_batch, args.sft_len
    ids = rng.integers(0, 256, size=(B, L)).astype(np.int32)
    sft_inputs = model.prepare({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    place = (lambda x: jnp.asarray(x)) if mesh is None else (lambda x: sharding.shard_batch(np.asarray(x), mesh))
    sft_batch = SFTBatch(models.place_inputs(model, jax.tree.map(jnp.asarray, sft_inputs)),
                         place(np.ones((B, L), np.float32)))
    sft_kw = dict(graphdef=model.graphdef, optimizer=optimizer, mesh=mesh)
    sft_model_flops = train_flops(MFU_SPEC, B, L, B * (L - 1))

    # GRPO update: P prompts x G completions of T tokens, each completion over prompt + response
    P, G, Lp, T = args.grpo_prompts, args.grpo_samples, args.prompt_len, args.response_len
    N = P * G
    pids = rng.integers(0, 256, size=(P, Lp)).astype(np.int32)
    prompt = models.place_inputs(model, model.prepare({"input_ids": pids, "attention_mask": np.ones_like(pids)}))
    rbatch = RolloutBatch(
        prompt, place(rng.integers(0, 256, size=(N, T)).astype(np.int32)), place(np.ones((N, T), np.float32)),
        place(rng.normal(-8.0, 1.0, size=(N, T)).astype(np.float32)),
        place(rng.normal(-8.0, 1.0, size=(N, T)).astype(np.float32)),
        place(rng.normal(size=(N,)).astype(np.float32)))
    loss_cfg = grpo.GRPOLossConfig(kl_coef=0.04, clip_c=None, norm_length=T)
    grpo_kw = dict(graphdef=model.graphdef, optimizer=optimizer, group_size=G, loss_cfg=loss_cfg, mesh=mesh)
    grpo_model_flops = train_flops(MFU_SPEC, N, Lp + T, N * T)

    def xla_flops(fn, state, batch, *extra, **kw) -> float:
        cost = fn.lower(state, batch, *extra, **kw).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", float("nan"))) * d  # per device (SPMD program) x devices

    runs = {}
    for name, fn, batch, extra, kw, model_flops in (
        ("sft_step", sft_step, sft_batch, (), sft_kw, sft_model_flops),
        ("grpo_update", grpo_step, rbatch, (jax.random.key(0),), grpo_kw, grpo_model_flops),
    ):
        state = init_state(jax.tree.map(jnp.copy, params), optimizer)
        compiled_flops = xla_flops(fn, state, batch, *extra, **kw)
        holder = [state]

        def call():
            holder[0], m = fn(holder[0], batch, *extra, **kw)
            float(m["loss"])

        first = seconds(call)
        times, beside = [], []
        for _ in range(args.repeats):
            times.append(seconds(call))
            measure_peak()
            beside.append(peaks[-1])
        # MFU against the peak measured right after each call (the same background load), median
        same_load = statistics.median(model_flops / t / p for t, p in zip(times, beside))
        runs[name] = dict(model_flops=model_flops, xla_flops=compiled_flops, first_s=first, times=times,
                          s=statistics.median(times), peaks_beside=beside, mfu_same_load=same_load)
        del holder, state

    peak = max(peaks)
    cmd = f"python {' '.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}"
    print(f"command: {cmd}")
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"os.cpu_count()={os.cpu_count()}, pinned to cores {cpus}; jax {jax.__version__} on "
          f"{jax.default_backend()}, {len(jax.devices())} device(s)")
    print(f"model: {n_params / 1e6:.1f}M parameters, {MFU_SPEC}, options {options or 'default'}")
    print(f"sft_step: {B} rows x {L} tokens; grpo_update: {P} prompts x {G} samples, prompt {Lp} + response {T} "
          "tokens, 1 AdamW update, fp32")
    print(f"matmul peak ({d} x [{n}x{n}] fp32 jnp.dot, one per device, best of {len(peaks)} measurements between the steps): "
          f"{peak / 1e9:.1f} GFLOP/s (all: {', '.join(f'{p / 1e9:.1f}' for p in peaks)})")
    print()
    print(f"{'':<13}{'model GFLOP':>12}{'XLA GFLOP':>11}{'XLA/model':>10}{'first s':>9}{'s/step':>8}"
          f"{'GFLOP/s':>9}{'MFU':>7}{'MFU*':>7}   later calls s")
    for name, r in runs.items():
        r["flops_per_s"] = r["model_flops"] / r["s"]
        r["mfu"] = r["flops_per_s"] / peak
        print(f"{name:<13}{r['model_flops'] / 1e9:>12.1f}{r['xla_flops'] / 1e9:>11.1f}"
              f"{r['xla_flops'] / r['model_flops']:>10.2f}{r['first_s']:>9.2f}{r['s']:>8.3f}"
              f"{r['flops_per_s'] / 1e9:>9.1f}{r['mfu']:>7.1%}{r['mfu_same_load']:>7.1%}   {', '.join(f'{t:.3f}' for t in r['times'])}")
    print("MFU = model FLOPs / s per step / the best matmul peak above (same process, same cores); MFU* = "
          "median over calls of the same against the peak measured right after that call (same load).")
    if args.json:
        args.json.write_text(json.dumps(dict(
            command=cmd, cores=cpus, peak_flops_per_s=peak, peaks=peaks, params=int(n_params), spec=MFU_SPEC,
            options=options or "default", runs=runs), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    _early = argparse.ArgumentParser(add_help=False)
    _early.add_argument("--cpus", type=int, default=None)
    pin_cpus(_early.parse_known_args()[0].cpus)
    sys.exit(main())

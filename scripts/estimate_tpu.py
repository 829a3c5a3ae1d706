"""The TPU compiler's estimate of a recipe's GRPO training step, without a TPU (deviceless compile).

    python scripts/estimate_tpu.py --config configs/qwen2_5_vl_7b_tpu.py --topology v5p:4x4x4 \
        --model_config configs/hf/Qwen2.5-VL-7B-Instruct [--stage textual_reasoning] \
        [--layers 2] [--json OUT]

THIS IS THE COMPILER'S ESTIMATE, NOT A MEASUREMENT. For the stage's real sizes (the config's
prompts x samples, prompt bucket + `max_new_tokens`, remat, bf16 compute, attention and log-prob
chunking, FSDP over the topology) it compiles with libtpu, through `vlm_jax.plan`'s abstract shapes
and shardings, the two training programs of a GRPO step - the update (`rl.policy.grpo_step`) and the
reference scoring (`rl.policy.score_responses`) - for ONE micro-batch (`--micro` completions, default
the smallest multiple of the group size that splits evenly over the chips) and reads
`compiled.cost_analysis()`: `flops` and `optimal_seconds` per chip (the compiler's roofline time:
an optimistic bound that assumes perfect overlap of compute, memory and communication).

XLA's cost model counts a loop body once (a `while` / `scan` / `lax.map` of 10 iterations costs
what one does), and the programs loop over attention query chunks and log-prob chunks, so the
counted flops are a part of the work. The estimate therefore takes the compiler's RATE (counted
flops / optimal_seconds: how fast it expects this program's mix of work to run on the chip) and
applies it to the work the program really executes, counted analytically (`executed_flops`: every
matmul of the decoder and the logits, attention over the full [S, S] block as chunked attention
computes it, x 3 for forward + backward, x 4 with `remat=full`), times the micro-batches per step
(prompts x samples / micro; mu = 1 in the recipes). Compile time grows with the decoder depth (the
layers are a Python loop), so the programs are compiled with `--layers` decoder layers (default 2;
every layer is the same program, so the rate carries over). Memory is `scripts/plan_memory.py`'s
question, not this script's.

Found on 2026-12-03 (libtpu 0.0.52, JAX 0.10.2): for the update and scoring programs the compiler
returns a NEGATIVE `optimal_seconds` for the 3B programs on v6e-8 (e.g. -26 s for the update; the
7B programs on v5p-64 get positive ones), while a plain matmul or a
`fori_loop` of matmuls gets a sensible one; the script then says that no compiler time estimate
exists and prints only the bound: the executed flops at 100% of the chip's bf16 peak.

The sampler is NOT estimated: its decode loop is a `while` whose trip count the cost model does not
know, and decoding is bound by memory traffic, not by the rate above. Tokens/s/chip therefore count
the step's tokens (prompt + response of every completion) over the update + scoring time only, and
MFU is the model's training FLOPs (6 x parameters x tokens + attention: forward + backward, remat
and the scoring pass excluded) per second of update + scoring over the chip's bf16 peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")  # quiets libtpu's start-up warnings
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU is only a compile target
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# bf16 dense peak per chip, public spec sheets (TFLOP/s)
PEAK_BF16 = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}


def forward_flops(text, rows: int, seq: int, logit_tokens: int) -> float:
    """Matmul FLOPs of one decoder forward: per token and layer the q/k/v/o and MLP projections,
    per layer scores and values over the full [S, S] block, plus the logits of `logit_tokens`."""
    D, F, H, KV, n, V = (text.hidden_size, text.intermediate_size, text.num_attention_heads,
                         text.num_key_value_heads, text.num_hidden_layers, text.vocab_size)
    hd = D // H
    per_token_layer = 2 * (D * H * hd + 2 * D * KV * hd + H * hd * D + 3 * D * F)
    attention_layer = 2 * 2 * rows * seq * seq * H * hd
    return n * (rows * seq * per_token_layer + attention_layer) + 2 * logit_tokens * D * V


def compile_cost(fn, args, kwargs) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    compiled = fn.lower(*args, **kwargs).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]), float(cost["optimal_seconds"]), time.perf_counter() - t0


def estimate(cfg, stage_name: str, topology: str, model_config: str, layers: int, micro: int | None,
             log=print) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from vlm_jax import models, plan, startup
    from vlm_jax.stages import loss_config
    from vlm_jax import sharding as shd
    from vlm_jax.rl import policy
    from vlm_jax.train_state import init_fn, make_optimizer

    st = next((s for s in cfg.stages if s.name == stage_name), None)
    if st is None or st.objective != "grpo":
        raise SystemExit(f"stage {stage_name!r}: not a GRPO stage of this config")
    g = st.grpo
    family, mcfg, raw, folder = plan.load_model_config(model_config)
    devices = plan.topology_devices(topology)
    chips = len(devices)
    mesh = shd.make_mesh(cfg.mesh, devices=devices)
    G, B, T = g.num_samples, st.batch_size, g.max_new_tokens
    N = B * G
    L = max(cfg.data.length_buckets)  # the prompt bucket (text stage: the longest)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    mb = N if g.mini_batch_size in (0, None) else g.mini_batch_size
    sizes = {"update": micro or st.micro_batch_size or mb, "score": g.score_chunk or N}
    for prog, n in sizes.items():
        if n % shards or N % n:
            raise SystemExit(f"{prog}: {n} completions per compiled program must split over the {shards} "
                             f"batch shards and divide the {N} completions of a step")
    n_programs = {prog: N // n * (g.mu if prog == "update" else 1) for prog, n in sizes.items()}
    num_patches = None if st.capability == "textual_reasoning" else startup.num_patches_for(cfg, mcfg.vision.patch_size)
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
    def rollout_batch(n: int):
        """n completions, each with its own prompt row (a micro-batch of the real step gathers up to
        n different prompts): the same work as one micro-batch of the full rollout batch."""
        prompt = plan.abstract_inputs(model, mesh, n, L, num_patches)
        f32 = lambda: plan._batched(mesh, (n, T), jnp.float32)  # noqa: E731
        return policy.RolloutBatch(prompt, plan._batched(mesh, (n, T), jnp.int32), f32(), f32(), f32(),
                                   plan._batched(mesh, (n,), jnp.float32))

    upd = rollout_batch(sizes["update"])
    programs = {"update": compile_cost(policy.grpo_step, (state, upd, key),
                                       dict(graphdef=graphdef, optimizer=optimizer, group_size=G,
                                            loss_cfg=loss_config(st), mu=1, minibatch=sizes["update"],
                                            micro_batch=sizes["update"], mesh=mesh))}
    if g.kl_coef > 0:
        sc = rollout_batch(sizes["score"])
        programs["score"] = compile_cost(policy.score_responses, (graphdef, params, sc.prompt, sc.responses_NT),
                                         dict(group_size=G, chunk=sizes["score"], mesh=mesh))
    passes = {"update": 4 if st.remat == "full" else 3, "score": 1}
    gen = topology.split(":")[0].lower()
    peak = PEAK_BF16[gen]
    out = dict(topology=topology, chips=chips, stage=stage_name, completions=N, prompt_len=L, response_len=T,
               completions_per_program=sizes, programs_per_step=n_programs, layers_compiled=layers,
               layers=mcfg.text.num_hidden_layers, remat=st.remat, peak_bf16_per_chip=peak)
    step_s, bound_s, usable = 0.0, 0.0, True
    for prog, (flops, opt_s, compile_s) in programs.items():
        n = sizes[prog]
        executed = passes[prog] * forward_flops(mcfg.text, n, L + T, n * T) / chips  # per chip, the real depth
        ok = opt_s > 0
        usable &= ok
        rate = flops / opt_s if ok else float("nan")  # the compiler's FLOP/s per chip for this program
        seconds = executed / rate * n_programs[prog] if ok else float("nan")
        at_peak = executed / peak * n_programs[prog]
        step_s += seconds
        bound_s += at_peak
        out[prog] = dict(counted_flops_per_chip=flops, optimal_seconds=opt_s, compile_s=compile_s,
                         compiler_rate_per_chip=rate, executed_flops_per_chip_per_program=executed,
                         seconds_per_step=seconds, seconds_per_step_at_peak=at_peak)
        log(f"  {prog}: {layers} layer(s), {n} completions: compiler counted {flops:.3g} flops/chip, "
            f"optimal_seconds {opt_s:.4g}{'' if ok else ' (NOT USABLE: not positive)'} (compile {compile_s:.0f} s); "
            f"executed at {mcfg.text.num_hidden_layers} layers {executed:.3g} flops/chip x {n_programs[prog]} per step"
            + (f" -> {seconds:.2f} s at the compiler's rate {rate / 1e12:.0f} TFLOP/s" if ok else "")
            + f"; {at_peak:.2f} s at 100% of peak")
    tokens = N * (L + T)
    model_flops = 3 * forward_flops(mcfg.text, N, L + T, N * T) * g.mu
    out.update(
        compiler_time_usable=usable,
        estimated_train_seconds_per_step=step_s if usable else None,
        train_seconds_per_step_at_peak=bound_s,
        tokens_per_step=tokens,
        estimated_tokens_per_s_per_chip=tokens / step_s / chips if usable else None,
        tokens_per_s_per_chip_at_peak=tokens / bound_s / chips,
        model_train_flops_per_step=model_flops,
        estimated_mfu=model_flops / step_s / chips / peak if usable else None,
    )
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a for a in argv if a.startswith("--config.")]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--topology", required=True)
    ap.add_argument("--model_config", required=True)
    ap.add_argument("--stage", default="textual_reasoning")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers in the compiled programs")
    ap.add_argument("--micro", type=int, default=None,
                    help="completions per compiled update (default: the stage's micro_batch_size)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args([a for a in argv if not a.startswith("--config.")])
    from vlm_jax import config as config_lib

    cfg = config_lib.load_config(args.config, [o[len("--config."):] for o in overrides])
    print(f"command: python scripts/estimate_tpu.py {' '.join(argv)}")
    t0 = time.perf_counter()
    r = estimate(cfg, args.stage, args.topology, args.model_config, args.layers, args.micro)
    print(f"THE TPU COMPILER'S ESTIMATE (libtpu cost_analysis, optimal_seconds; not a measurement), "
          f"{time.perf_counter() - t0:.0f} s of compiling on this CPU")
    print(f"{args.topology} ({r['chips']} chips), stage {r['stage']}: {r['completions']} completions x "
          f"({r['prompt_len']} prompt + {r['response_len']} response) tokens = {r['tokens_per_step']:,} tokens/step; "
          f"programs per step {r['programs_per_step']} of {r['completions_per_program']} completions; compiled with {r['layers_compiled']} "
          f"of {r['layers']} layers, remat {r['remat']}")
    print(f"  model training flops/step {r['model_train_flops_per_step']:.3g} (6N-style: forward + backward, "
          "no remat, no scoring); the sampler is not estimated")
    if r["compiler_time_usable"]:
        print(f"  estimated {r['estimated_train_seconds_per_step']:.1f} s/step for update + scoring = "
              f"{r['estimated_tokens_per_s_per_chip']:,.0f} tokens/s/chip, MFU {r['estimated_mfu']:.1%} of "
              f"{r['peak_bf16_per_chip'] / 1e12:.0f} TFLOP/s bf16")
    else:
        print("  the compiler's optimal_seconds is not positive for these programs: no compiler time estimate")
    print(f"  bound: the executed flops (remat and scoring included) at 100% of the {r['peak_bf16_per_chip'] / 1e12:.0f} "
          f"TFLOP/s bf16 peak take {r['train_seconds_per_step_at_peak']:.1f} s/step = at most "
          f"{r['tokens_per_s_per_chip_at_peak']:,.0f} tokens/s/chip for update + scoring")
    if args.json:
        Path(args.json).write_text(json.dumps({**r, "command": f"python scripts/estimate_tpu.py {' '.join(argv)}"},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

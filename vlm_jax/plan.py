"""Memory planner: compiles the trainer's programs for a TPU topology with abstract shapes only.

With `libtpu` installed, JAX compiles for a TPU topology on any machine (deviceless ahead-of-time
compilation, `jax.experimental.topologies`): no TPU and no weights are needed, and the bytes per
chip come from the real TPU compiler. For every stage of a config, `plan` builds the model's
abstract parameters from its `config.json` alone, shards them with the project's rules on the
topology's mesh and compiles what the trainer runs, through the same functions:

  init      `train_state.init_state`'s jitted optimizer init
  sft       `sft.sft_step` on one batch
  grpo      `rl.policy.grpo_step` on a rollout batch (its scan runs one mini-batch at a time)
  score     `rl.policy.score_responses` on the stage's completions (reference / old log-probs)
  generate  `rl.sampler._generate` for the stage's prompts x samples and lengths

A program fits when its own bytes (arguments + outputs - aliased + temporaries) plus what stays
resident on the chips beside it (parameters, optimizer state and reference parameters that are not
among its arguments) is at most the chip's HBM.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vlm_jax import config as config_lib
from vlm_jax import sharding as shd
from vlm_jax.models import lora

GiB = 1 << 30

# HBM per chip by TPU generation (public spec sheets).
HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
PROGRAMS = ("init", "sft", "grpo", "score", "generate")


@dataclasses.dataclass
class Row:
    """One compiled program of one stage (the `--json` record)."""

    stage: str
    program: str
    bytes_per_chip: int | None  # program bytes + resident bytes outside its arguments
    hbm_bytes_per_chip: int
    fits: bool
    compile_s: float
    flops: float | None
    error: str | None
    detail: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def hbm_of(topology: str) -> int:
    gen = topology.split(":")[0].lower()
    if gen not in HBM_BYTES:
        raise ValueError(f"unknown TPU generation {gen!r} in {topology!r}; known: {sorted(HBM_BYTES)}")
    return HBM_BYTES[gen]


def topology_devices(topology: str):
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices


def nbytes(tree) -> int:
    """Bytes per chip of a tree of sharded abstract arrays (the largest shard of each leaf)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def _abstract(tree, shardings):
    """`tree` with every array leaf an abstract array placed by the matching leaf of `shardings`
    (same leaf order: `nnx.Variable`s are pytree nodes in `tree`, shardings sit in their place)."""
    leaves, treedef = jax.tree.flatten(tree)
    places = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if len(places) != len(leaves):
        raise ValueError(f"{len(leaves)} arrays but {len(places)} shardings")
    return jax.tree.unflatten(
        treedef, [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(leaves, places)]
    )


def _batched(mesh, shape, dtype, axis=0):
    """Abstract batch array split over (data, fsdp) on `axis` when the axes divide it."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    spec = shd.batch_spec(len(shape), axis) if shape[axis] % n == 0 else P()
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _replicated(mesh, shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))


def abstract_inputs(model, mesh, B: int, L: int, num_patches: int | None):
    """Abstract `ModelInputs` placed the way `models.place_inputs` places real ones."""
    fam = model.family
    vision = None
    if num_patches:
        specs = fam.vision_input_specs(model.config, num_patches)  # the family's vision layout
        vision = fam.VisionInputs(*(_replicated(mesh, shape, dtype) for shape, dtype in specs))
    return fam.ModelInputs(
        _batched(mesh, (B, L), jnp.int32),
        _batched(mesh, (B, L), jnp.int32),
        _batched(mesh, (3, B, L), jnp.int32, axis=1),
        vision,
    )


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
    out = {f.removesuffix("_size_in_bytes"): int(getattr(m, f, 0) or 0) for f in fields}
    out["program"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - cost analysis is optional information
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float(cost.get("flops", 0.0)) if cost else None


_OOM = re.compile(r"(RESOURCE_EXHAUSTED.*?)(?:\n|$)")


def compile_program(fn, args, kwargs, *, resident_extra: int, hbm: int, stage: str, program: str) -> Row:
    """Lowers and compiles `fn(*args, **kwargs)`; a compiler OOM becomes a not-fitting row."""
    t0 = time.perf_counter()
    try:
        compiled = fn.lower(*args, **kwargs).compile()
    except Exception as e:  # noqa: BLE001 - the compiler's message is the result
        msg = str(e)
        found = _OOM.search(msg)
        return Row(stage, program, None, hbm, False, time.perf_counter() - t0, None,
                   (found.group(1) if found else msg.splitlines()[0] if msg else type(e).__name__)[:500])
    dt = time.perf_counter() - t0
    mem = _memory(compiled)
    total = mem["program"] + resident_extra
    mem["resident_extra"] = resident_extra
    return Row(stage, program, total, hbm, total <= hbm, dt, _flops(compiled), None, mem)


def load_model_config(path: str | Path):
    """(Model without weights, abstract params) from an HF `config.json` (a file or its folder)."""
    from vlm_jax import models
    from vlm_jax.models import hf_io

    path = Path(path)
    folder = path.parent if path.name == "config.json" else path
    raw = hf_io.read_config(folder)
    family = models.family_for(raw, str(folder / "config.json"))
    cfg = family.parse_config(raw, str(folder / "config.json"))
    return family, cfg, raw, folder


def plan(cfg: config_lib.Config, topology: str, *, model_config: str | None = None,
         programs=PROGRAMS, stages=None, log=print) -> list[Row]:
    """Compiles every program of every stage of `cfg` for `topology`; returns one row each."""
    from vlm_jax import curriculum, models
    from vlm_jax.rl import policy, sampler
    from vlm_jax.sft import SFTBatch, sft_step
    from vlm_jax.shapes import bucket
    from vlm_jax.train_state import init_fn, make_optimizer

    family, mcfg, raw, folder = load_model_config(model_config or cfg.model.path)
    devices = topology_devices(topology)
    mesh = shd.make_mesh(cfg.mesh, devices=devices)
    hbm = hbm_of(topology)
    dtype = curriculum.dtype_of(cfg.model.dtype)
    options = family.ModelOptions(**curriculum.model_options(cfg))
    graphdef, abstract = models.abstract_model(family, mcfg, dtype, options)
    base_model = models.Model(family, mcfg, graphdef, raw, dtype, mesh, folder, options)
    params = _abstract(abstract, shd.param_shardings(abstract, mesh, cfg.logical_axis_rules))
    p_bytes = nbytes(params)
    log(f"{topology}: {len(devices)} chips, mesh {dict(mesh.shape)}, HBM {hbm / GiB:.0f} GiB/chip; "
        f"parameters {p_bytes / GiB:.2f} GiB/chip ({cfg.model.dtype})")
    rows: list[Row] = []
    L = max(cfg.data.length_buckets)
    for index, st in enumerate(cfg.stages):
        if stages is not None and st.name not in stages:
            continue
        optimizer = make_optimizer(st.optimizer, st.steps, st.trainable)
        model = base_model.with_options(remat=st.remat)  # as `curriculum.build_stage` does
        graphdef = model.graphdef
        kl = st.objective == "grpo" and st.grpo.kl_coef > 0
        frozen, policy_params = None, params
        if st.lora.enabled:  # the trained state is the adapters; the base is frozen (and the reference)
            base_dtype = curriculum.dtype_of(st.lora.base_dtype or cfg.model.dtype)
            base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, base_dtype, sharding=x.sharding), params)
            adapters = lora.abstract_adapters(params, st.lora.targets, st.lora.rank)
            adapters = jax.tree.map(lambda x: _replicated(mesh, x.shape, x.dtype), adapters)
            frozen = lora.Frozen(base, st.lora.scale)
            policy_params = lora.LoraParams(base, adapters, st.lora.scale)
            init = init_fn(adapters, optimizer)
            state = jax.eval_shape(init, adapters)
            ref_bytes = 0  # the reference is the base itself
            # the loaded parameters stay resident beside a base of another dtype (cast at the stage start)
            base_bytes = 0 if base_dtype == dtype else p_bytes
            base_arg_bytes = nbytes(base)
            log(f"{st.name}: LoRA rank {st.lora.rank} on {len(lora.target_modules(params, st.lora.targets))} "
                f"layers, adapters {nbytes(adapters) / GiB:.3f} GiB, base {base_arg_bytes / GiB:.2f} GiB/chip "
                f"({jnp.dtype(base_dtype).name})")
        else:
            init = init_fn(params, optimizer)
            state = jax.eval_shape(init, params)  # abstract, placed by init's output shardings
            ref_bytes = p_bytes if kl else 0
            base_bytes = p_bytes  # env.base_params stay resident beside the trained parameters
            base_arg_bytes = 0
        s_bytes = nbytes(state)
        opt_bytes = s_bytes - nbytes(state.params) - 8
        num_patches = None if st.capability == "textual_reasoning" else curriculum.num_patches_for(cfg, mcfg.vision.patch_size)
        run = lambda program, fn, args, kwargs, extra: rows.append(  # noqa: E731
            compile_program(fn, args, kwargs, resident_extra=extra, hbm=hbm, stage=st.name, program=program)
        )
        if "init" in programs:
            # arguments: the loaded parameters; outputs: the state (parameter copy + moments)
            run("init", init, (state.params if frozen is not None else params,), {},
                base_arg_bytes + base_bytes)
            if rows[-1].error is None:
                rows[-1].detail["scalars"] = sum(1 for x in jax.tree.leaves(state) if x.ndim == 0)
        if st.objective == "sft" and "sft" in programs:
            B = st.batch_size
            batch = SFTBatch(abstract_inputs(model, mesh, B, L, num_patches), _batched(mesh, (B, L), jnp.float32))
            run("sft", sft_step, (state, batch),
                dict(graphdef=graphdef, optimizer=optimizer, normalize=st.sft.normalize,
                     micro_batch=st.micro_batch_size, mesh=mesh, frozen=frozen), base_bytes)
        if st.objective == "grpo":
            g = st.grpo
            B, G, T = st.batch_size, g.num_samples, g.max_new_tokens
            N = B * G
            mb = N if g.mini_batch_size in (0, None) else g.mini_batch_size
            prompt = abstract_inputs(model, mesh, B, L, num_patches)
            resp = _batched(mesh, (N, T), jnp.int32)
            f32 = lambda: _batched(mesh, (N, T), jnp.float32)  # noqa: E731
            rbatch = policy.RolloutBatch(prompt, resp, f32(), f32(), f32(), _batched(mesh, (N,), jnp.float32))
            key = jax.eval_shape(lambda: jax.random.key(0))
            key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))
            if "grpo" in programs:
                run("grpo", policy.grpo_step, (state, rbatch, key),
                    dict(graphdef=graphdef, optimizer=optimizer, group_size=G,
                         loss_cfg=curriculum.loss_config(st), mu=g.mu, minibatch=mb,
                         micro_batch=st.micro_batch_size, mesh=mesh, frozen=frozen),
                    ref_bytes + base_bytes)
            if "score" in programs:
                run("score", policy.score_responses, (graphdef, policy_params, prompt, resp),
                    dict(group_size=G, chunk=g.score_chunk, mesh=mesh),
                    (opt_bytes if frozen is not None else s_bytes) + base_bytes)
            if "generate" in programs:
                sp = sampler.SamplingParams(*(_replicated(mesh, (), d) for d in
                                              (jnp.int32, jnp.float32, jnp.float32, jnp.int32)))
                gen_len = bucket(T, sampler.GEN_BUCKETS)
                Bg = min(g.rollout_chunk or B, B)  # prompts per sampler call
                gen_prompt = abstract_inputs(model, mesh, Bg, L, num_patches)
                run("generate", sampler._generate, (graphdef, policy_params, gen_prompt, key, sp),
                    dict(gen_len=gen_len, num_samples=G, greedy=False, filtered=g.top_p < 1 or g.top_k > 0,
                         eos_ids=(mcfg.image_token_id,), pad_id=0, mesh=mesh,
                         row_groups=1),
                    opt_bytes + ref_bytes + base_bytes)
        for r in rows:
            if r.stage == st.name:
                log(format_row(r))
    return rows


def format_row(r: Row) -> str:
    used = "-" if r.bytes_per_chip is None else f"{r.bytes_per_chip / GiB:8.2f}"
    d = r.detail
    parts = (f"arg {d['argument'] / GiB:.2f} out {d['output'] / GiB:.2f} alias {d['alias'] / GiB:.2f} "
             f"temp {d['temp'] / GiB:.2f} resident+ {d['resident_extra'] / GiB:.2f}") if "argument" in d else (
        r.error or "")
    flops = f"{r.flops:.3g}" if r.flops and r.flops > 0 else "-"
    return (f"{r.stage:<20} {r.program:<9} {used} / {r.hbm_bytes_per_chip / GiB:.0f} GiB  "
            f"{'fits' if r.fits else 'DOES NOT FIT':<12} {r.compile_s:6.1f}s  flops {flops}  {parts}")

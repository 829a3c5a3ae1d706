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
  generate  `rl.sampler._generate` for the stage's prompts x samples and lengths; with
            `grpo.rollout_tensor` on its decoding mesh with the resharded policy as its argument
            and the whole training state resident beside it; the row also counts the collectives
            of one decode step (per token)
  vision    the vision tower's share of an update (stages with images): the prompts of one micro-batch
            embedded (images encoded), with the gradient when the stage trains the vision tower

A program fits when its own bytes (arguments + outputs - aliased + temporaries) plus what stays
resident on the chips beside it (parameters, optimizer state and reference parameters that are not
among its arguments) is at most the chip's HBM. The loaded checkpoint's weights are not resident:
the trainer frees them once the first training state holds its copy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from vlm_jax import config as config_lib
from vlm_jax import sharding as shd
from vlm_jax.hlo_traffic import decode_loop_traffic, loop_collectives  # noqa: F401 (plan.loop_collectives)
from vlm_jax.models import lora

GiB = 1 << 30

# HBM per chip by TPU generation (public spec sheets).
HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
PROGRAMS = ("init", "sft", "grpo", "score", "generate", "vision")


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
    if num_patches:  # the family's vision layout: per row, split over the batch like the tokens
        specs = fam.vision_input_specs(model.config, B, num_patches)
        vision = fam.VisionInputs(*(_batched(mesh, shape, dtype) for shape, dtype in specs))
    return fam.ModelInputs(
        _batched(mesh, (B, L), jnp.int32),
        _batched(mesh, (B, L), jnp.int32),
        _batched(mesh, (3, B, L), jnp.int32, axis=1),
        vision,
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "train", "mesh"))
def vision_share(graphdef, params, inputs, *, train: bool, mesh=None):
    """The vision part of an update: `embed` (vision tower, merger, merged tokens into their rows) of
    the rows one micro-batch encodes, and, when `train`, the backward pass into the vision tower's
    and merger's parameters (returned as one number: in the update these gradients go into the
    sharded accumulators, so no gradient tree is an output here)."""
    from flax import nnx

    def f(p):
        if train:  # gradients only into the vision side (the decoder's are the update's own share)
            p = jax.tree_util.tree_map_with_path(
                lambda path, x: x if "visual" in jax.tree_util.keystr(path) else jax.lax.stop_gradient(x), p
            )
        x = nnx.merge(graphdef, p).embed(inputs.input_ids_BL, inputs.vision, shd.batch_constraint(mesh))
        return jnp.sum(x.astype(jnp.float32))

    if not train:
        return f(params)
    grads = jax.grad(f)(params)
    return sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads))


def update_vision_rows(st, n_shards: int) -> int:
    """Rows whose images one micro-batch of stage `st` encodes: SFT, the micro-batch's rows; GRPO,
    its distinct prompts (at most the micro-batch's completions and the shard's prompts, per shard)."""
    B = st.batch_size
    if st.objective == "sft":
        return st.micro_batch_size or B
    N = B * st.grpo.num_samples
    mb = st.grpo.mini_batch_size or N
    micro = st.micro_batch_size or mb
    if micro % n_shards or B % n_shards:
        return min(micro, B)
    return n_shards * min(micro // n_shards, B // n_shards)


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


def compile_program(fn, args, kwargs, *, resident_extra: int, hbm: int, stage: str, program: str,
                    inspect=None) -> Row:
    """Lowers and compiles `fn(*args, **kwargs)`; a compiler OOM becomes a not-fitting row.
    `inspect(compiled) -> dict` adds to the row's detail."""
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
    if inspect is not None:
        mem.update(inspect(compiled))
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


def micro_batch_options(total: int, shards: int) -> list[int]:
    """Micro-batch sizes a step accepts for `total` rows on `shards` batch shards: divisors of
    `total` that keep the same number of rows from every shard (multiples of `shards`), ascending."""
    return [m for m in range(1, total + 1) if total % m == 0 and (m % shards == 0 or shards == 1)]


def suggest_micro_batch(compile_at, current: int, total: int, shards: int, hbm: int) -> dict:
    """The largest micro-batch that fits, from compiles at two sizes: bytes per chip are taken as
    linear in the micro-batch (fixed part + activations per row, what accumulation leaves), fitted
    through `current` and the next smaller accepted size (or smaller ones until one compiles), then
    checked by compiling the suggestion. `compile_at(m) -> Row`. Returns the `detail` entry."""
    options = micro_batch_options(total, shards)
    points, tried = {}, {}
    for m in sorted((m for m in options if m <= current), reverse=True):
        row = compile_at(m)
        tried[m] = row
        if row.bytes_per_chip is not None:
            points[m] = row.bytes_per_chip
        if len(points) == 2:
            break
    if len(points) < 2:
        fitting = [m for m, r in tried.items() if r.fits]
        return dict(suggested_micro_batch=max(fitting) if fitting else None, basis="compiled sizes only",
                    tried={m: r.bytes_per_chip for m, r in tried.items()})
    (m1, b1), (m2, b2) = sorted(points.items(), reverse=True)
    per_row = max((b1 - b2) / (m1 - m2), 1.0)
    fixed = b1 - per_row * m1
    best = max((m for m in options if fixed + per_row * m <= hbm), default=None)
    check = None
    while best is not None:  # confirm by compiling; where the line was optimistic, step down
        row = tried[best] if best in tried else compile_at(best)
        tried[best] = row
        if row.fits:
            check = row.bytes_per_chip
            break
        best = max((m for m in options if m < best), default=None)
    return dict(suggested_micro_batch=best, bytes_at_suggestion=check, bytes_per_row=per_row, fixed_bytes=fixed,
                basis=f"linear through micro-batches {m2} and {m1}")


def plan(cfg: config_lib.Config, topology: str, *, model_config: str | None = None,
         programs=PROGRAMS, stages=None, num_layers: int | None = None, suggest: bool = False,
         log=print) -> list[Row]:
    """Compiles every program of every stage of `cfg` for `topology`; returns one row each.
    `num_layers` cuts the decoder to that many layers (for compile-time comparisons). `suggest`
    adds the largest micro-batch that fits to the sft / grpo rows (`suggest_micro_batch`: two or
    three more compiles each)."""
    from vlm_jax import models, startup
    from vlm_jax.stages import loss_config
    from vlm_jax.rl import decode_layout, policy, sampler
    from vlm_jax.sft import SFTBatch, sft_step
    from vlm_jax.shapes import bucket
    from vlm_jax.logprobs import batch_shards
    from vlm_jax.train_state import init_fn, make_optimizer

    family, mcfg, raw, folder = load_model_config(model_config or cfg.model.path)
    if num_layers is not None:
        mcfg = dataclasses.replace(mcfg, text=dataclasses.replace(mcfg.text, num_hidden_layers=num_layers))
    devices = topology_devices(topology)
    mesh = shd.make_mesh(cfg.mesh, devices=devices)
    hbm = hbm_of(topology)
    dtype = startup.dtype_of(cfg.model.dtype)
    options = family.ModelOptions(**startup.model_options(cfg))
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
        model = base_model.with_options(remat=st.remat)  # as `vlm_jax.stages.build_stage` does
        graphdef = model.graphdef
        kl = st.objective == "grpo" and st.grpo.kl_coef > 0
        frozen, policy_params = None, params
        if st.lora.enabled:  # the trained state is the adapters; the base is frozen (and the reference)
            base_dtype = startup.dtype_of(st.lora.base_dtype or cfg.model.dtype)
            base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, base_dtype, sharding=x.sharding), params)
            adapters = lora.abstract_adapters(params, st.lora.targets, st.lora.rank)
            adapters = jax.tree.map(lambda x: _replicated(mesh, x.shape, x.dtype), adapters)
            frozen = lora.Frozen(base, st.lora.scale)
            policy_params = lora.LoraParams(base, adapters, st.lora.scale)
            init = init_fn(adapters, optimizer)
            state = jax.eval_shape(init, adapters)
            ref_bytes = 0  # the reference is the base itself
            base_arg_bytes = nbytes(base)
            log(f"{st.name}: LoRA rank {st.lora.rank} on {len(lora.target_modules(params, st.lora.targets))} "
                f"layers, adapters {nbytes(adapters) / GiB:.3f} GiB, base {base_arg_bytes / GiB:.2f} GiB/chip "
                f"({jnp.dtype(base_dtype).name})")
        else:
            init = init_fn(params, optimizer)
            state = jax.eval_shape(init, params)  # abstract, placed by init's output shardings
            # the reference is resident beside the update and the sampler unless it waits in host memory
            ref_bytes = p_bytes if kl and not st.grpo.offload_reference else 0
            base_arg_bytes = 0
        # the loaded weights count nowhere: they are freed once the state (or the LoRA base) holds its
        # copy (`startup.drop_base_params`)
        s_bytes = nbytes(state)
        opt_bytes = s_bytes - nbytes(state.params) - 8
        num_patches = None if st.capability == "textual_reasoning" else startup.num_patches_for(cfg, mcfg.vision.patch_size)
        run = lambda program, fn, args, kwargs, extra, inspect=None: rows.append(  # noqa: E731
            compile_program(fn, args, kwargs, resident_extra=extra, hbm=hbm, stage=st.name, program=program,
                            inspect=inspect)
        )
        if "init" in programs:
            # arguments: the loaded parameters; outputs: the state (parameter copy + moments)
            run("init", init, (state.params if frozen is not None else params,), {},
                base_arg_bytes)
            if rows[-1].error is None:
                rows[-1].detail["scalars"] = sum(1 for x in jax.tree.leaves(state) if x.ndim == 0)
        if st.objective == "sft" and "sft" in programs:
            B = st.batch_size
            batch = SFTBatch(abstract_inputs(model, mesh, B, L, num_patches), _batched(mesh, (B, L), jnp.float32))
            sft_kw = lambda m: dict(graphdef=graphdef, optimizer=optimizer, normalize=st.sft.normalize,  # noqa: E731
                                    micro_batch=m, mesh=mesh, frozen=frozen)
            run("sft", sft_step, (state, batch), sft_kw(st.micro_batch_size), 0)
            if suggest:
                rows[-1].detail.update(suggest_micro_batch(
                    lambda m: compile_program(sft_step, (state, batch), sft_kw(m), resident_extra=0,
                                              hbm=hbm, stage=st.name, program="sft"),
                    st.micro_batch_size or B, B, batch_shards(mesh, B), hbm))
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
                grpo_kw = lambda m: dict(graphdef=graphdef, optimizer=optimizer, group_size=G,  # noqa: E731
                                         loss_cfg=loss_config(st), mu=g.mu, minibatch=mb,
                                         micro_batch=m, mesh=mesh, frozen=frozen, share_prompt=g.share_prompt)
                run("grpo", policy.grpo_step, (state, rbatch, key), grpo_kw(st.micro_batch_size),
                    ref_bytes)
                if suggest:
                    rows[-1].detail.update(suggest_micro_batch(
                        lambda m: compile_program(policy.grpo_step, (state, rbatch, key), grpo_kw(m),
                                                  resident_extra=ref_bytes, hbm=hbm, stage=st.name,
                                                  program="grpo"),
                        st.micro_batch_size or mb, mb, batch_shards(mesh, N, mb), hbm))
            if "score" in programs:
                run("score", policy.score_responses, (graphdef, policy_params, prompt, resp),
                    dict(group_size=G, chunk=g.score_chunk, mesh=mesh, share_prompt=g.share_prompt),
                    opt_bytes if frozen is not None else s_bytes)
            if "generate" in programs:
                tensor = g.rollout_tensor
                gmesh, gen_params, resident = mesh, policy_params, opt_bytes + ref_bytes
                if tensor:  # the sampler on its decoding mesh, with a resharded copy of the policy
                    decode_layout.check_decode_layout(mcfg, len(devices), tensor,
                                                f"stages.{index}.grpo.rollout_tensor")
                    gmesh = decode_layout.decode_mesh(mesh, tensor)
                    gen_params = _abstract(policy_params, decode_layout.decode_shardings(
                        model, policy_params, gmesh, cfg.logical_axis_rules))
                    # the training state (and a LoRA stage's base) stays resident in its own layout
                    resident = s_bytes + base_arg_bytes + ref_bytes
                sp = sampler.SamplingParams(*(_replicated(gmesh, (), d) for d in
                                              (jnp.int32, jnp.float32, jnp.float32, jnp.int32)))
                gkey = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(gmesh, P()))
                gen_len = bucket(T, sampler.GEN_BUCKETS)
                Bg = min(g.rollout_chunk or B, B)  # prompts per sampler call
                gen_prompt = abstract_inputs(model, gmesh, Bg, L, num_patches)
                run("generate", sampler._generate, (graphdef, gen_params, gen_prompt, gkey, sp),
                    dict(gen_len=gen_len, num_samples=G, greedy=False, filtered=g.top_p < 1 or g.top_k > 0,
                         eos_ids=(mcfg.image_token_id,), pad_id=0, mesh=gmesh, slots=g.refill_slots),
                    resident, inspect=decode_loop_traffic)
                rows[-1].detail.update(rollout_tensor=tensor, mesh=dict(gmesh.shape),
                                       sampler_param_bytes=nbytes(gen_params))
        if num_patches and "vision" in programs:
            R = update_vision_rows(st, mesh.shape["data"] * mesh.shape["fsdp"])
            train = "vision" in st.trainable
            v_inputs = abstract_inputs(model, mesh, R, L, num_patches)
            run("vision", vision_share, (graphdef, params, v_inputs), dict(train=train, mesh=mesh),
                s_bytes - p_bytes + ref_bytes)
            rows[-1].detail.update(rows=R, patches_per_row=num_patches, train=train, input_bytes=nbytes(v_inputs))
        for r in rows:
            if r.stage == st.name:
                if options.scan_layers and r.flops and r.flops > 0:
                    r.detail["flops_note"] = "XLA's cost analysis counts a scanned layer body once"
                log(format_row(r))
    return rows


def format_row(r: Row) -> str:
    used = "-" if r.bytes_per_chip is None else f"{r.bytes_per_chip / GiB:8.2f}"
    d = r.detail
    parts = (f"arg {d['argument'] / GiB:.2f} out {d['output'] / GiB:.2f} alias {d['alias'] / GiB:.2f} "
             f"temp {d['temp'] / GiB:.2f} resident+ {d['resident_extra'] / GiB:.2f}") if "argument" in d else (
        r.error or "")
    if "suggested_micro_batch" in d:
        m = d["suggested_micro_batch"]
        parts += f"  largest micro-batch that fits: {m if m is not None else 'none'} ({d['basis']})"
    if "rollout_tensor" in d:
        layout = "training layout" if not d["rollout_tensor"] else f"decoding mesh {d['mesh']}"
        parts += f"  sampler: {layout}, its parameters {d['sampler_param_bytes'] / GiB:.2f} GiB"
    if "decode_step_collectives_error" in d:
        parts += "; per-token collectives not counted (the compiled text is unavailable, see the --json)"
    if "decode_step_collectives" in d:
        parts += (f"; per token {d['decode_step_collectives']} moving "
                  f"{d['decode_step_collective_bytes'] / 2**20:.1f} MiB, largest all-gather "
                  f"{d['decode_step_largest_all_gather_bytes'] / 2**20:.2f} MiB")
    flops = f"{r.flops:.3g}" if r.flops and r.flops > 0 else "-"
    if "flops_note" in d:
        flops += " (one layer body)"
    return (f"{r.stage:<20} {r.program:<9} {used} / {r.hbm_bytes_per_chip / GiB:.0f} GiB  "
            f"{'fits' if r.fits else 'DOES NOT FIT':<12} {r.compile_s:6.1f}s  flops {flops}  {parts}")

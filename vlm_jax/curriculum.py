"""The staged curriculum: one loop for every stage, step functions swapped at stage boundaries.

For each stage of `config.stages` (perception -> textual reasoning -> visual reasoning by default,
any order allowed) the loop builds the stage's data iterator, optimizer (reset or carried over),
reward and step function (`grpo_step` or `sft_step`, jitted once per shape and reused whenever the
objective and shapes repeat), then runs its steps with logging, periodic evaluation and async
checkpoints. Rerunning with the same workdir resumes from the latest checkpoint: same stage, stage
step, data position and RNG, so the result is bitwise that of an uninterrupted run (CPU). SIGTERM
checkpoints at the next step boundary and returns "preempted" (the CLI exits 0).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import config as config_lib
from vlm_jax import models, paths, sharding
from vlm_jax.checkpoint import Checkpointer, PreemptionGuard
from vlm_jax.models import lora
from vlm_jax.metrics import MetricsWriter
from vlm_jax.rl import grpo
from vlm_jax.rl import rewards as rewards_lib
from vlm_jax.rl.policy import grpo_step
from vlm_jax.rl.rollout import collect_rollout
from vlm_jax.sft import SFTBatch, sft_step
from vlm_jax.shapes import row_patch_budget
from vlm_jax.train_state import TrainState, init_fn, init_state, make_optimizer

log = logging.getLogger(__name__)

CAPTION_INSTRUCTION = "Describe the image in detail."


# ------------------------------------------------------------------------------------------------
# set-up (everything that can fail on bad input happens here, before any compile)
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Env:
    cfg: config_lib.Config
    workdir: Path
    model: models.Model
    # the loaded checkpoint's parameters until the first training state is built from them; after
    # that (and on a resume) only their abstract form (shapes, dtypes, shardings) is kept, so the
    # chips never hold the base weights beside the trained copy
    base_params: Any
    processor: Any
    sources: dict  # (name, split) -> random-access source
    num_patches: int  # fixed per-row vision patch budget (pixel budget), so shapes stay the same
    open_iterators: list = dataclasses.field(default_factory=list)  # closed on the way out


def abstract_params(tree):
    """`tree` as `jax.ShapeDtypeStruct`s with each array's sharding (what restores and shape
    checks need; holds no device memory)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
                        tree)


def drop_base_params(env: "Env") -> None:
    """Releases the loaded base weights (keeps their abstract form): called once a training state
    holds its own copy, or before a resume reads the state from a checkpoint."""
    env.base_params = abstract_params(env.base_params)


def dtype_of(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def open_sources(cfg: config_lib.Config) -> dict:
    """Loads every training and evaluation dataset of every stage (a missing one fails here).

    Data files (.jsonl / .json / .parquet) are read whole; their unusable rows are reported here
    (per reason, with the first rows and the image path tried), and a file with none usable fails."""
    from vlm_jax import data

    data_dir = paths.data_dir(cfg.data.data_dir)
    print(paths.describe_data_dir(cfg.data.data_dir), flush=True)
    out = {}
    for i, stage in enumerate(cfg.stages):
        for kind, specs in (("datasets", stage.datasets), ("eval.datasets", stage.eval.datasets)):
            for j, ds in enumerate(specs):
                key = (ds.name, ds.split)
                if key in out:
                    continue
                where = f"stages.{i}.{kind}.{j}.name"
                try:
                    out[key] = data.load(ds.name, split=ds.split, data_dir=data_dir)
                except (ValueError, FileNotFoundError) as e:
                    raise config_lib.ConfigError(str(e), where) from e
                report = getattr(out[key], "report", None)
                if report is not None and report.num_skipped:
                    print(f"warning: {report.summary()}", flush=True)
                if len(out[key]) == 0:
                    raise config_lib.ConfigError(f"{ds.name}[{ds.split}] has no usable rows", where)
    return out


def check_workdir(workdir) -> None:
    """The workdir (local, created, or a URL) is writable, or a ConfigError naming it."""
    try:
        paths.check_writable(workdir)
    except OSError as e:
        raise config_lib.ConfigError(f"{workdir} is not writable ({e.strerror or e})", "workdir") from None


def check_compilation_cache(value: str) -> None:
    """A compilation cache in a bucket (`compilation_cache_dir=gs://...`, which JAX reads and writes
    through etils) is writable, or a ConfigError naming it (JAX itself would only warn at every
    compile); a local cache is JAX's to create."""
    cache = paths.cache_dir(value)
    if cache is not None and paths.is_url(cache):
        try:
            paths.check_writable(cache)
        except OSError as e:
            raise config_lib.ConfigError(f"{cache} is not writable ({e})", "compilation_cache_dir") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_model_dir(path: str) -> None:
    """The model directory has its config, weights and tokenizer files, or a ConfigError saying
    which is missing."""
    try:
        d = paths.model_dir(path)  # a folder, a URL or a Hugging Face hub id
    except paths.ModelPathError as e:
        raise config_lib.ConfigError(str(e), "model.path") from None
    if not d.is_dir():
        raise config_lib.ConfigError(f"model directory {str(d)!r} does not exist", "model.path")
    missing = [f for f in ("config.json", "preprocessor_config.json") if not (d / f).is_file()]
    if not any(d.glob("*.safetensors")):
        missing.append("*.safetensors")
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    if missing:
        raise config_lib.ConfigError(
            f"{str(d)!r} lacks {', '.join(missing)}; a model directory needs the weights, config, image "
            f"processor and tokenizer files (copy the tokenizer and preprocessor files of the base model "
            f"into it, or export a workdir with python -m vlm_jax.export)",
            "model.path",
        )


def configure_processor(processor, data_cfg) -> None:
    """Applies the config's pixel bounds to the image processor."""
    ip = processor.image_processor
    ip.size = type(ip.size)(
        shortest_edge=data_cfg.min_pixels_per_image, longest_edge=data_cfg.max_pixels_per_image
    )


def setup(cfg: config_lib.Config, workdir: Path) -> Env:
    from vlm_jax.data.processor import Processor

    if not cfg.model.path:
        raise config_lib.ConfigError("model.path: no model directory given", "model.path")
    check_model_dir(cfg.model.path)
    check_rewards(cfg)
    sources = open_sources(cfg)
    check_sft_targets(cfg, sources)
    check_reward_signatures(cfg, sources)
    try:
        processor = Processor.from_pretrained(cfg.model.path)
    except (OSError, ValueError) as e:
        raise config_lib.ConfigError(f"{cfg.model.path}: cannot load the tokenizer / image processor: {e}",
                                     "model.path") from e
    configure_processor(processor, cfg.data)
    from vlm_jax.data.check import preflight

    preflight(cfg, sources, processor)  # refuses data training would mostly skip, before the model loads
    cache = paths.cache_dir(cfg.compilation_cache_dir)
    if cache is not None:
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    mesh = sharding.make_mesh(cfg.mesh)
    model, params = models.from_pretrained(
        cfg.model.path,
        dtype=dtype_of(cfg.model.dtype),
        mesh=mesh,
        rules=cfg.logical_axis_rules,
        options=model_options(cfg),
    )
    check_rollout_layouts(cfg, model.config, mesh.devices.size)
    check_data_shards(cfg, mesh)
    patch = int(processor.image_processor.patch_size)  # 14 (Qwen2.5-VL) or 16 (Qwen3-VL)
    return Env(cfg, workdir, model, params, processor, sources, num_patches_for(cfg, patch))


def check_rollout_layouts(cfg: config_lib.Config, model_config, n_devices: int) -> None:
    """Each GRPO stage's `grpo.rollout_tensor` divides the device count and the model's KV heads."""
    from vlm_jax.rl import sampler

    for i, st in enumerate(cfg.stages):
        if st.objective == "grpo" and st.grpo.rollout_tensor:
            sampler.check_decode_layout(model_config, n_devices, st.grpo.rollout_tensor,
                                        f"stages.{i}.grpo.rollout_tensor")


def data_shards(cfg: config_lib.Config) -> int:
    """The number of data shards of every stage (`data.shards`, 0: one per process)."""
    return cfg.data.shards or jax.process_count()


def check_data_shards(cfg: config_lib.Config, mesh) -> None:
    """The data shards split over the processes, every stage's batch over the shards, and each
    process's rows over its devices' batch shards (ConfigErrors naming the key, before any compile)."""
    shards, procs = data_shards(cfg), jax.process_count()
    if shards % procs:
        raise config_lib.ConfigError(
            f"{shards} data shards do not split over {procs} processes; use a multiple of {procs}",
            "data.shards")
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    for i, st in enumerate(cfg.stages):
        if st.batch_size % shards:
            raise config_lib.ConfigError(
                f"batch_size {st.batch_size} does not split over {shards} data shards "
                f"({'data.shards' if cfg.data.shards else 'one per process'})", f"stages.{i}.batch_size")
        if procs > 1:
            if st.batch_size % n_batch:
                raise config_lib.ConfigError(
                    f"batch_size {st.batch_size} does not split over the mesh's {n_batch} batch shards "
                    f"(data x fsdp); each of the {procs} processes places only its own rows",
                    f"stages.{i}.batch_size")
            if st.objective == "grpo" and st.grpo.rollout_chunk % procs:
                raise config_lib.ConfigError(
                    f"rollout_chunk {st.grpo.rollout_chunk} does not split over {procs} processes",
                    f"stages.{i}.grpo.rollout_chunk")
    if procs > 1:  # every process's devices hold the same number of a batch's rows
        from vlm_jax.rl.sampler import decode_mesh
        from vlm_jax.sharding import process_rows

        meshes = [("mesh", mesh)] + [(f"stages.{i}.grpo.rollout_tensor", decode_mesh(mesh, st.grpo.rollout_tensor))
                                     for i, st in enumerate(cfg.stages)
                                     if st.objective == "grpo" and st.grpo.rollout_tensor]
        for key, m in meshes:
            try:
                process_rows(m, m.devices.size * procs)
            except ValueError as e:
                raise config_lib.ConfigError(str(e), key) from None


def model_options(cfg: config_lib.Config) -> dict:
    """The model's compute settings from the config (the family's `ModelOptions` fields)."""
    m = cfg.model
    return dict(
        compute_dtype=m.compute_dtype or None,
        attention_chunk=m.attention_chunk,
        logits_chunk=m.logits_chunk,
        scan_layers=m.scan_layers,
    )


def num_patches_for(cfg: config_lib.Config, patch_size: int = 14, merge_unit: int = 4) -> int:
    """The fixed per-row vision patch budget: a row's pixel budget (the loader's, `max_pixels_per_image`)
    in `patch_size`-pixel patches (14 Qwen2.5-VL, 16 Qwen3-VL), and never more than a row's tokens
    can hold (the loader drops rows longer than `max_prompt_len` / the largest length bucket; each
    image token is `merge_unit` patches). The vision inputs are laid out per row ([rows, budget]),
    so they split over the batch like the tokens."""
    max_tokens = max(cfg.data.max_prompt_len, max(cfg.data.length_buckets))
    return min(row_patch_budget(cfg.data.max_pixels_per_image, patch_size), max_tokens * merge_unit)


def loss_config(st: config_lib.StageConfig) -> grpo.GRPOLossConfig:
    """The GRPO loss settings of a stage (a static argument of `grpo_step`)."""
    g = st.grpo
    return grpo.GRPOLossConfig(
        clip_low=g.clip_low,
        clip_high=g.clip_high,
        clip_c=g.clip_c,
        ratio_level=g.ratio_level,
        kl_coef=g.kl_coef,
        kl_estimator=g.kl_estimator,
        loss_agg=g.loss_agg,
        norm_length=g.max_new_tokens,
    )


# ------------------------------------------------------------------------------------------------
# checks before the first step (config and data problems of any stage fail here, not mid-run)
# ------------------------------------------------------------------------------------------------

TARGET_SCAN_ROWS = 256  # rows per dataset looked at for an SFT stage's target field


def check_rewards(cfg: config_lib.Config) -> None:
    """Every stage's reward names resolve (builtins, user files and functions), SFT stages included."""
    for i, st in enumerate(cfg.stages):
        try:
            rewards_lib.build_reward(st.reward)
        except ValueError as e:
            raise config_lib.ConfigError(f"stage {st.name!r}: {e}", f"stages.{i}.reward") from e


def _first_rows(source, n: int) -> list[dict]:
    return [source[k] for k in range(min(n, len(source)))]


def check_sft_targets(cfg: config_lib.Config, sources: dict) -> None:
    """Each SFT stage's data has its target field (`sft.target`) in some row; else a ConfigError
    naming the field, the fields the rows do have, and the fix."""
    for i, st in enumerate(cfg.stages):
        if st.objective != "sft":
            continue
        target = st.sft.target
        present: set[str] = set()
        for ds in st.datasets:
            rows = _first_rows(sources[(ds.name, ds.split)], TARGET_SCAN_ROWS)
            if any(str(r.get(target, "")).strip() for r in rows):
                break
            present |= {k for r in rows for k, v in r.items() if k != "images" and str(v).strip()
                        and not (isinstance(v, float) and v < 0)}
        else:
            names = ", ".join(f"{d.name}[{d.split}]" for d in st.datasets)
            others = [f for f in ("solution", "answer", "caption") if f in present and f != target]
            fix = (f"set --config.stages.{i}.sft.target={others[0]}" if others else
                   f"add a {target!r} field to the rows")
            raise config_lib.ConfigError(
                f"SFT stage {st.name!r} trains on the field {target!r}, but no row of {names} has it "
                f"(first {TARGET_SCAN_ROWS} rows of each checked); the rows have: "
                f"{', '.join(sorted(present)) or 'no non-empty fields'}, images; fix: {fix}",
                f"stages.{i}.sft.target",
            )


def check_reward_signatures(cfg: config_lib.Config, sources: dict) -> None:
    """Calls each user reward of each GRPO stage once on a row of the stage's data (unguarded), so a
    wrong signature stops the run now, with its traceback, instead of scoring 0 all run."""
    for i, st in enumerate(cfg.stages):
        if st.objective != "grpo":
            continue
        row = _first_rows(sources[(st.datasets[0].name, st.datasets[0].split)], 1)[0]
        for j, (name, _) in enumerate(st.reward):
            try:
                rewards_lib.check_reward(name, row)
            except ValueError as e:
                err = config_lib.ConfigError(f"stage {st.name!r}: {e}", f"stages.{i}.reward.{j}.0")
                err.details = getattr(e, "details", "")
                raise err from e


def check_first_batches(env: Env, stop_check=None) -> None:
    """Every stage's data iterator produces its first batch (a stage whose rows are all unusable,
    e.g. all over max_prompt_len, fails here with the counts per reason, before any step)."""
    from vlm_jax.data.pipeline import BadRowError, NoUsableRowsError

    for i, st in enumerate(env.cfg.stages):
        try:
            it = make_iterator(env, i, stop_check=stop_check)
        except ValueError as e:  # e.g. a source with fewer rows than data shards
            raise config_lib.ConfigError(f"stage {st.name!r}: {e}", f"stages.{i}.datasets") from None
        try:
            next(it)
        except (NoUsableRowsError, BadRowError) as e:  # BadRowError: data.strict and a bad row
            raise config_lib.ConfigError(f"stage {st.name!r}: {e}", f"stages.{i}.datasets") from None
        except StopIteration:
            raise config_lib.ConfigError(f"stage {st.name!r}: the data gave no batch",
                                         f"stages.{i}.datasets") from None
        finally:
            it.close()


# ------------------------------------------------------------------------------------------------
# one stage
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Stage:
    """Everything built for one stage: optimizer, data iterator, reward, step function."""

    index: int
    cfg: config_lib.StageConfig
    optimizer: Any
    iterator: Any
    model: Any = None  # the env's model with this stage's remat policy
    reward_fn: Any = None
    loss_cfg: grpo.GRPOLossConfig | None = None
    frozen: lora.Frozen | None = None  # a LoRA stage's base (its TrainState's params are the adapters)

    def policy(self, state: TrainState):
        """The parameters the model runs with: the state's, or the base with the state's adapters."""
        return lora.with_adapters(self.frozen, state.params)


def make_iterator(env: Env, index: int, stop_check=None):
    """The data iterator of stage `index` (from its start): this process's data shards
    (`vlm_jax.data.shards`), giving this process's rows of each batch (`batch_size / processes`)."""
    from vlm_jax.data.pipeline import REASONING_INSTRUCTION, make_dataset
    from vlm_jax.data.shards import ShardedBatches

    st = env.cfg.stages[index]
    sft = st.objective == "sft"
    target = st.sft.target if sft else None
    shards = data_shards(env.cfg)
    rows = st.batch_size // shards  # each shard's rows of a batch

    def make_shard(k: int):
        return make_dataset(
            [(env.sources[(d.name, d.split)], d.weight) for d in st.datasets],
            env.processor,
            batch_size=rows,
            shard_index=k,
            shard_count=shards,
            seed=env.cfg.seed + 1000 * index,
            order=st.order,
            order_key=st.order_key,
            target_field=target,
            length_buckets=env.cfg.data.length_buckets,
            max_prompt_len=env.cfg.data.max_prompt_len,
            max_pixels_per_batch=env.cfg.data.max_pixels_per_image * rows,
            strict=env.cfg.data.strict,
            text_only=sft and st.sft.caption_as_input,
            instruction=CAPTION_INSTRUCTION if target == "caption" else REASONING_INSTRUCTION,
            stop_check=stop_check,
        )

    return ShardedBatches(make_shard, shard_count=shards, padding_side="right" if sft else "left",
                          pad_token_id=int(env.processor.pad_token_id))


def build_stage(env: Env, index: int, data_state: dict | None, stop_check=None) -> Stage:
    st = env.cfg.stages[index]
    optimizer = make_optimizer(st.optimizer, st.steps, st.trainable)
    sft = st.objective == "sft"
    iterator = make_iterator(env, index, stop_check=stop_check)
    if data_state is not None:
        from vlm_jax.data.shards import ShardCountError

        try:
            iterator.set_state(data_state)
        except ShardCountError as e:
            iterator.close()
            raise config_lib.ConfigError(str(e), "data.shards") from None
    stage = Stage(index, st, optimizer, iterator, env.model.with_options(remat=st.remat))
    if not sft:
        stage.reward_fn = rewards_lib.build_reward(st.reward)
        stage.loss_cfg = loss_config(st)
    return stage


def step_rng(seed: int, stage_index: int, stage_step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stage_index), stage_step)


def train_step(env: Env, stage: Stage, state: TrainState, ref_params, rng) -> tuple[TrainState, dict]:
    """One step of the stage's objective; returns host metrics."""
    model, proc, st = stage.model, env.processor, stage.cfg
    if st.objective == "sft":
        batch = next(stage.iterator)  # this process's rows
        inputs = models.place_inputs(model, models.prepare_local(model, batch, num_patches=env.num_patches),
                                     local=True)
        loss_mask = np.asarray(batch["loss_mask"], np.float32)
        loss_mask = (jnp.asarray(loss_mask) if model.mesh is None
                     else sharding.shard_batch(loss_mask, model.mesh, local=True))
        sft_batch = SFTBatch(inputs, loss_mask)
        state, m = sft_step(
            state,
            sft_batch,
            graphdef=model.graphdef,
            optimizer=stage.optimizer,
            normalize=st.sft.normalize,
            micro_batch=st.micro_batch_size,
            mesh=model.mesh,
            frozen=stage.frozen,
        )
        host = {k: float(v) for k, v in sharding.to_host(m).items()}
    else:
        g = st.grpo
        errors_before = sum(rewards_lib.reward_errors().values())
        roll_rng, upd_rng = jax.random.split(rng)
        rbatch, _, host = collect_rollout(
            model,
            stage.policy(state),
            ref_params,
            stage.iterator,
            cfg=g,
            tokenizer=proc.tokenizer,
            reward_fn=stage.reward_fn,
            rng=roll_rng,
            eos_token_ids=proc.eos_token_ids,
            pad_token_id=proc.pad_token_id,
            image_token_id=proc.image_token_id,
            batch_size=st.batch_size // jax.process_count(),  # this process's prompts
            prompt_buckets=env.cfg.data.length_buckets,
            num_patches=env.num_patches,
            rules=env.cfg.logical_axis_rules,
            shards=data_shards(env.cfg) // jax.process_count(),
        )
        state, m = grpo_step(
            state,
            rbatch,
            upd_rng,
            graphdef=model.graphdef,
            optimizer=stage.optimizer,
            group_size=g.num_samples,
            loss_cfg=stage.loss_cfg,
            mu=g.mu,
            minibatch=g.mini_batch_size,
            micro_batch=st.micro_batch_size,
            mesh=model.mesh,
            frozen=stage.frozen,
            share_prompt=g.share_prompt,
        )
        host.update({k: float(v) for k, v in sharding.to_host(m).items()})
        host["reward/errors"] = sum(rewards_lib.reward_errors().values()) - errors_before
    host["skipped_nonfinite"] = int(state.skipped)
    host.update(data_metrics(stage.iterator))
    return state, host


def data_metrics(iterator) -> dict:
    """The stage's data counters so far: `data/rows` used, `data/skipped` and `data/skipped/<reason>`
    for each reason that occurred."""
    stats = iterator.stats
    skipped = {r: n for r, n in stats["skipped"].items() if n}
    out = {"data/rows": stats["rows"], "data/skipped": sum(skipped.values())}
    out.update({f"data/skipped/{r}": n for r, n in skipped.items()})
    return out


def stage_summary(stage: Stage, steps_done: int) -> str:
    """The line printed when a stage ends: steps, rows used, rows skipped per reason."""
    from vlm_jax.data.pipeline import describe_skips

    stats = stage.iterator.stats
    n_skipped = sum(stats["skipped"].values())
    return (f"stage {stage.cfg.name}: {steps_done}/{stage.cfg.steps} steps; data rows used "
            f"{stats['rows']}, skipped {n_skipped} ({describe_skips(stats['skipped'])})")


def evaluate_stage(
    env: Env, stage: Stage, params, *, global_step: int, stage_step: int, when: str, writer: MetricsWriter
) -> dict:
    from vlm_jax.data.pipeline import StopRequested
    from vlm_jax.evaluate import evaluate_source

    ev = stage.cfg.eval
    out = {}
    for ds in ev.datasets:
        name = f"{ds.name}[{ds.split}]"
        try:
            result = _evaluate_one(env, ev, ds, name, params, evaluate_source)
        except StopRequested:  # SIGTERM while reading eval data: skip it, the loop stops next
            log.warning("evaluation of %s interrupted by a stop request; not recorded", name)
            break
        result["when"] = when
        writer.write_eval(global_step, stage.cfg.name, name, result, stage_step=stage_step)
        out[name] = result
    return out


def _evaluate_one(env: Env, ev, ds, name: str, params, evaluate_source) -> dict:
    return evaluate_source(
        env.model,
        params,
        env.processor,
        env.sources[(ds.name, ds.split)],
        name=name,
        max_examples=ev.max_examples,
        batch_size=ev.batch_size,
        max_new_tokens=ev.max_new_tokens,
        length_buckets=env.cfg.data.length_buckets,
        max_pixels_per_batch=env.cfg.data.max_pixels_per_image * ev.batch_size,
        seed=env.cfg.seed,
    )


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------


def fresh_adapters(cfg: config_lib.Config, index: int, base, mesh=None):
    """Stage `index`'s adapters at its start (the same for a given seed and stage)."""
    lc = cfg.stages[index].lora
    rng = jax.random.fold_in(jax.random.key(cfg.seed), 1_000_003 + index)
    return lora.init_adapters(base, lc.targets, lc.rank, rng, mesh)


def state_target(cfg: config_lib.Config, opt_index: int, base_params, mesh=None) -> TrainState:
    """The restore target of a checkpoint written during (or at the end of) stage `opt_index`: its
    parameters are the full weights, or the adapters of a LoRA stage."""
    st = cfg.stages[opt_index]
    optimizer = make_optimizer(st.optimizer, st.steps, st.trainable)
    if st.lora.enabled:
        return init_state(fresh_adapters(cfg, opt_index, base_params, mesh), optimizer)
    return init_state(base_params, optimizer)


def lora_base(cfg: config_lib.Config, bases: Checkpointer, index: int, base_params) -> lora.Frozen:
    """LoRA stage `index`'s frozen base: the weights saved in `bases` at its start when an earlier
    stage had changed them, else the loaded model (`base_params`), stored as `lora.base_dtype`."""
    lc = cfg.stages[index].lora
    base = lora.cast(base_params, dtype_of(lc.base_dtype or cfg.model.dtype))
    if index in bases.all_steps():
        base, _ = bases.restore(index, target=base)
    return lora.Frozen(base, lc.scale)


def check_lora(env: Env) -> None:
    """Each LoRA stage's targets select adaptable layers of this model, in modules the stage trains."""
    from vlm_jax.train_state import module_of

    for i, st in enumerate(env.cfg.stages):
        if not st.lora.enabled:
            continue
        try:
            modules = lora.target_modules(env.base_params, st.lora.targets)
        except ValueError as e:
            raise config_lib.ConfigError(f"stage {st.name!r}: {e}", f"stages.{i}.lora.targets") from None
        frozen = sorted({module_of(tuple(m.split("."))) for m in modules} - set(st.trainable))
        if frozen:
            raise config_lib.ConfigError(
                f"stage {st.name!r}: lora.targets put adapters in {frozen}, which stages.{i}.trainable "
                f"({', '.join(st.trainable)}) leaves frozen; add them to trainable or drop those targets",
                f"stages.{i}.lora.targets",
            )


def _restore(env: Env, ckpt: Checkpointer, refs: Checkpointer):
    """(state, meta, ref_params) from the newest checkpoint that restores completely (damaged newer
    ones are reported and set aside), or None for a fresh run."""

    def target_for(meta):  # full weights: abstract (placed by the init's output shardings, no memory)
        st = env.cfg.stages[meta["opt_stage"]]
        if st.lora.enabled:  # adapters and their moments: small, built for real
            return state_target(env.cfg, meta["opt_stage"], env.base_params, env.model.mesh)
        optimizer = make_optimizer(st.optimizer, st.steps, st.trainable)
        return jax.eval_shape(init_fn(env.base_params, optimizer), env.base_params)

    if ckpt.latest_step() is None:
        return None
    if not env.cfg.stages[0].lora.enabled:  # stage 0's LoRA base is the loaded model: kept for it
        drop_base_params(env)  # a resume trains the checkpoint's parameters, never the loaded ones
    restored = ckpt.restore_newest(target_for)
    if restored is None:
        return None
    step, state, meta = restored
    ref = None
    if refs.latest_step() == meta["stage_index"] and meta["stage_step"] > 0:
        ref, _ = refs.restore(meta["stage_index"], target=env.base_params)
    print(f"resumed from step {step}: stage {meta['stage_index']} "
          f"({env.cfg.stages[meta['stage_index']].name if meta['stage_index'] < len(env.cfg.stages) else 'end'}), "
          f"stage step {meta['stage_step']}", flush=True)
    return state, meta, ref


def check_optimizer_carry(env: Env) -> None:
    """A stage with reset_optimizer=False can take over the previous stage's optimizer state (same
    state structure), checked on abstract shapes before anything runs."""
    cfg = env.cfg
    shape = lambda st: jax.tree.structure(
        jax.eval_shape(make_optimizer(st.optimizer, st.steps, st.trainable).init, env.base_params))
    for index in range(1, len(cfg.stages)):
        st = cfg.stages[index]
        if not st.reset_optimizer and shape(st) != shape(cfg.stages[index - 1]):
            raise config_lib.ConfigError(
                f"stages.{index}.reset_optimizer=False needs the same optimizer and trainable "
                f"modules as the previous stage",
                f"stages.{index}.reset_optimizer",
            )


def remove_partial_checkpoints(directory) -> None:
    """Deletes orbax's temporary directories of saves that never committed (a crash mid-save), so
    the newest entry in the checkpoint directory is always a complete checkpoint. In a bucket orbax
    writes a step in place and marks it committed with `commit_success.txt`; a step without it is
    removed."""
    directory = paths.as_path(directory)
    for tmp in directory.glob("*.orbax-checkpoint-tmp*"):
        paths.rmtree(tmp)
    if paths.is_url(directory) and directory.exists():
        for step in directory.iterdir():
            if step.name.isdigit() and not (step / "commit_success.txt").exists():
                paths.rmtree(step)


def run(cfg: config_lib.Config, workdir: str | Path, *, stop_after: int | None = None) -> str:
    """Runs (or resumes) the curriculum; returns "finished" or "preempted".

    Everything that can fail on the config or the data of any stage is checked before the first
    step (see `setup`, `check_first_batches`). `stop_after` requests a stop (exactly like SIGTERM)
    once the global step reaches it, e.g. for a time-boxed job; the run checkpoints and returns
    "preempted". On an error the pending checkpoint saves finish (or their partial directories are
    removed) and every writer is closed before the error propagates."""
    workdir = paths.resolve(workdir)  # orbax needs absolute paths (or a URL)
    from vlm_jax.data.pipeline import interrupt_data_waits

    check_workdir(workdir)
    check_compilation_cache(cfg.compilation_cache_dir)
    with PreemptionGuard() as guard, interrupt_data_waits():
        env = setup(cfg, workdir)
        check_lora(env)
        check_optimizer_carry(env)
        check_first_batches(env, stop_check=lambda: guard.requested)
        if jax.process_index() == 0:  # one writer of a shared workdir (one upload to a bucket)
            (workdir / "config.json").write_text(json.dumps(config_lib.config_to_dict(cfg), indent=2))
            # a save killed mid-write (SIGKILL) leaves one behind
            for sub in ("checkpoints", "reference", "lora_base"):
                remove_partial_checkpoints(workdir / sub)
        ckpt = Checkpointer(
            workdir / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
        )
        refs = Checkpointer(workdir / "reference", keep=1, async_save=False)
        bases = Checkpointer(workdir / "lora_base", keep=2, async_save=False)
        writer = MetricsWriter(workdir, tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress)
        try:
            status = _loop(env, cfg, ckpt, refs, bases, writer, guard, stop_after)
        except BaseException:
            _close_quietly(ckpt, (refs, bases), writer, env.open_iterators)
            raise
        ckpt.wait()
        ckpt.close()
        refs.close()
        bases.close()
        writer.close()
    if status == "finished" and jax.process_index() == 0:  # one writer of the report and plots
        from vlm_jax import report

        text = report.write_report(workdir, [s.name for s in cfg.stages],
                                   {s.name: [d.name for d in s.datasets] for s in cfg.stages})
        report.plot(workdir)
        print(text)
    return status


def _close_quietly(ckpt: Checkpointer, others: tuple[Checkpointer, ...], writer: MetricsWriter,
                   iterators=()) -> None:
    """After an error: stop the data readers, let in-flight saves commit, close orbax (no threads or
    event loops left to fail at interpreter exit), drop uncommitted save directories; never mask the
    original error."""
    for closer in (*(it.close for it in iterators), ckpt.close, *(c.close for c in others), writer.close):
        try:
            closer()
        except Exception as e:  # noqa: BLE001 - the original error is the one to report
            log.warning("while closing after an error: %s: %s", type(e).__name__, e)
    for c in (ckpt, *others):
        remove_partial_checkpoints(c.directory)


def _loop(env: Env, cfg: config_lib.Config, ckpt: Checkpointer, refs: Checkpointer, bases: Checkpointer,
          writer: MetricsWriter, guard: PreemptionGuard, stop_after: int | None) -> str:
    from vlm_jax.data.pipeline import BadRowError, StopRequested

    restored = _restore(env, ckpt, refs)
    if restored is None:
        state, meta, ref_params = (
            None,
            dict(stage_index=0, stage_step=0, global_step=0, opt_stage=0, data_state=None),
            None,
        )
    else:
        state, meta, ref_params = restored
        writer.truncate_after(meta["global_step"] + 1)
        if meta["stage_step"] == 0 and meta["stage_index"] < len(cfg.stages):
            # the stage-start evaluation of this stage runs again: drop a record of it already logged
            writer.drop_records(meta["global_step"], cfg.stages[meta["stage_index"]].name)
    global_step = meta["global_step"]
    # the base the state's adapters belong to, when the state comes from a LoRA stage
    frozen = None
    if state is not None and cfg.stages[meta["opt_stage"]].lora.enabled:
        frozen = lora_base(cfg, bases, meta["opt_stage"], env.base_params)
    status = "finished"
    stop_check = lambda: guard.requested
    for index in range(meta["stage_index"], len(cfg.stages)):
        st = cfg.stages[index]
        resuming = index == meta["stage_index"] and meta["stage_step"] > 0
        stage = build_stage(env, index, meta["data_state"] if resuming else None, stop_check=stop_check)
        env.open_iterators.append(stage.iterator)
        if resuming:
            pass  # state (params or adapters, optimizer, counters) comes from the checkpoint
        else:
            if state is None:
                params = env.base_params
            elif frozen is not None:  # a LoRA stage ended: its adapters merged into the weights
                params = lora.merge(lora.with_adapters(frozen, state.params), dtype=dtype_of(cfg.model.dtype))
            else:
                params = state.params
            frozen = None
            if st.lora.enabled:
                base = lora.cast(params, dtype_of(st.lora.base_dtype or cfg.model.dtype))
                if state is not None:  # weights changed by earlier stages: kept for a resume
                    bases.save(index, base, {"stage_index": index}, force=True)
                frozen = lora.Frozen(base, st.lora.scale)
                state = init_state(fresh_adapters(cfg, index, base, env.model.mesh), stage.optimizer)
            elif state is None or st.reset_optimizer:
                state = init_state(params, stage.optimizer)
            else:
                state = TrainState(state.params, state.opt_state, jnp.zeros_like(state.step), state.skipped)
            del params
        stage.frozen = frozen
        drop_base_params(env)  # the state (or the LoRA base) holds its own copy of the weights
        start = meta["stage_step"] if resuming else 0
        if st.objective != "grpo" or st.grpo.kl_coef == 0:
            ref_params = None  # no reference model kept in memory
        elif frozen is not None:  # LoRA: the reference is the base with the adapters off (no copy)
            ref_params = frozen.params
        elif not resuming:  # the reference is the policy at the start of this stage
            ref_params = jax.tree.map(jnp.copy, state.params)
            refs.save(index, ref_params, {"stage_index": index}, force=True)
        if ref_params is not None and frozen is None and st.objective == "grpo" and st.grpo.offload_reference:
            refs.wait()
            ref_params = sharding.to_memory(ref_params, "pinned_host")  # on the chips only while scoring
        if start == 0 and st.eval.datasets and st.eval.at_start:
            evaluate_stage(
                env,
                stage,
                stage.policy(state),
                global_step=global_step,
                stage_step=0,
                when="before",
                writer=writer,
            )
        meta_for = lambda s_idx, s_step, opt_idx, data_state: dict(
            stage_index=s_idx,
            stage_step=s_step,
            global_step=global_step,
            opt_stage=opt_idx,
            data_state=data_state,
            seed=cfg.seed,
        )
        steps_done = start
        with writer.stage_progress(st.name, st.steps, initial=start) as bar:
            for stage_step in range(start, st.steps):
                data_state = stage.iterator.get_state()
                ran = False
                if not guard.requested:
                    try:
                        state, host = train_step(
                            env, stage, state, ref_params, step_rng(cfg.seed, index, stage_step)
                        )
                        ran = True
                    except StopRequested:  # SIGTERM while waiting for data: this step never ran
                        pass
                    except BadRowError as e:  # data.strict: the row is named; bad input, exit 2
                        raise config_lib.ConfigError(f"stage {st.name!r}: {e}", f"stages.{index}.datasets") from None
                if not ran:
                    if ckpt.latest_step() != global_step:  # else saved already: same state, same data position
                        ckpt.save(global_step, state, meta_for(index, stage_step, index, data_state), force=True)
                    status = "preempted"
                    break
                steps_done = stage_step + 1
                global_step += 1
                if stop_after is not None and global_step >= stop_after:
                    guard.request()
                if (stage_step + 1) % cfg.logging.every == 0 or stage_step + 1 == st.steps:
                    writer.write(global_step, st.name, stage_step + 1, host)
                bar.update(host)
                if st.eval.every and (stage_step + 1) % st.eval.every == 0 and stage_step + 1 < st.steps:
                    evaluate_stage(
                        env,
                        stage,
                        stage.policy(state),
                        global_step=global_step,
                        stage_step=stage_step + 1,
                        when="during",
                        writer=writer,
                    )
                every = cfg.checkpoint.every  # 0: only at stage ends
                if every and (stage_step + 1) % every == 0 and stage_step + 1 < st.steps:
                    ckpt.save(
                        global_step,
                        state,
                        meta_for(index, stage_step + 1, index, stage.iterator.get_state()),
                    )
        print(stage_summary(stage, steps_done), flush=True)
        stage.iterator.close()
        if status == "preempted":
            break
        if st.eval.datasets:
            evaluate_stage(
                env,
                stage,
                stage.policy(state),
                global_step=global_step,
                stage_step=st.steps,
                when="after",
                writer=writer,
            )
        # boundary checkpoint: the next stage starts from here
        ckpt.save(global_step, state, meta_for(index + 1, 0, index, None), force=True)
        if guard.requested and index + 1 < len(cfg.stages):
            status = "preempted"
            break
    return status


def restore_for_export(workdir: str | Path, *, with_meta: bool = False):
    """(model, params, processor) of the newest checkpoint of a training workdir that restores
    completely (a damaged newer one is reported and skipped, and left where it is); `params` are a
    `lora.LoraParams` (base and adapters) when the checkpoint comes from a LoRA stage. `with_meta`:
    the checkpoint's metadata as a fourth element."""
    from vlm_jax.data.processor import Processor

    workdir = paths.resolve(workdir)
    cfg_file = workdir / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(
            f"{workdir} is neither a model directory nor a training workdir (no config.json)"
        )
    cfg = config_lib.config_from_dict(json.loads(cfg_file.read_text()))
    model, base = models.from_pretrained(cfg.model.path, dtype=dtype_of(cfg.model.dtype))
    with Checkpointer(workdir / "checkpoints", keep=cfg.checkpoint.keep) as ckpt:
        restored = ckpt.restore_newest(lambda meta: state_target(cfg, meta["opt_stage"], base), set_aside=False)
        if restored is None:
            raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
        _, state, meta = restored
    params = state.params
    if cfg.stages[meta["opt_stage"]].lora.enabled:  # the adapters with the base they belong to
        with Checkpointer(workdir / "lora_base", keep=2, async_save=False) as bases:
            params = lora.with_adapters(lora_base(cfg, bases, meta["opt_stage"], base), params)
    processor = Processor.from_pretrained(cfg.model.path)
    return (model, params, processor, meta) if with_meta else (model, params, processor)

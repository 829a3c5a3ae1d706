"""Start-up: everything that can fail on the config, the model directory or the data of any stage
is checked here, before any compile (`setup`, then `check_lora`, `check_optimizer_carry`,
`check_first_batches` once the model is loaded). Errors are `ConfigError`s naming the key.

Also the run's environment (`Env`: config, model, processor, data sources, patch budget) and each
stage's data iterator (`make_iterator`), which the checks and the stages share.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from vlm_jax import config as config_lib
from vlm_jax import models, paths, sharding
from vlm_jax.models import lora
from vlm_jax.rl import rewards as rewards_lib
from vlm_jax.shapes import row_patch_budget
from vlm_jax.train_state import make_optimizer

CAPTION_INSTRUCTION = "Describe the image in detail."


# ------------------------------------------------------------------------------------------------
# the run's environment
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
    eval_caches: dict = dataclasses.field(default_factory=dict)  # evaluation settings -> RowCache


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
    check_rollout_layouts(cfg, model.config, mesh)
    check_data_shards(cfg, mesh)
    patch = int(processor.image_processor.patch_size)  # 14 (Qwen2.5-VL) or 16 (Qwen3-VL)
    return Env(cfg, workdir, model, params, processor, sources, num_patches_for(cfg, patch))


def check_rollout_layouts(cfg: config_lib.Config, model_config, mesh) -> None:
    """Each GRPO stage's `grpo.rollout_tensor` divides the device count and the model's KV heads,
    and its `grpo.refill_slots` split over the data axis of the mesh it samples on."""
    from vlm_jax.rl import decode_layout, sampler

    for i, st in enumerate(cfg.stages):
        if st.objective != "grpo":
            continue
        g, sample_mesh = st.grpo, mesh
        if g.rollout_tensor:
            decode_layout.check_decode_layout(model_config, mesh.devices.size, g.rollout_tensor,
                                        f"stages.{i}.grpo.rollout_tensor")
            sample_mesh = decode_layout.decode_mesh(mesh, g.rollout_tensor)
        sampler.check_slots(g.refill_slots, sample_mesh, f"stages.{i}.grpo.refill_slots")


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
        from vlm_jax.rl.decode_layout import decode_mesh
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


# ------------------------------------------------------------------------------------------------
# a stage's data
# ------------------------------------------------------------------------------------------------


def make_iterator(env: Env, index: int, stop_check=None):
    """The data iterator of stage `index` (from its start): this process's data shards
    (`vlm_jax.data.shards`), giving this process's rows of each batch (`batch_size / processes`)."""
    from vlm_jax.data.pipeline import make_dataset
    from vlm_jax.data.rows import REASONING_INSTRUCTION
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
            pace_rows=math.ceil(st.steps * st.batch_size * st.pace_share),
            pace_start=st.pace_start,
            target_field=target,
            length_buckets=env.cfg.data.length_buckets,
            max_prompt_len=env.cfg.data.max_prompt_len,
            max_pixels_per_batch=env.cfg.data.max_pixels_per_image * rows,
            strict=env.cfg.data.strict,
            text_only=sft and st.sft.caption_as_input,
            instruction=CAPTION_INSTRUCTION if target == "caption" else REASONING_INSTRUCTION,
            # the process's row-cache budget split over the shards it reads
            row_cache=env.cfg.data.row_cache_mb * 2**20 * jax.process_count() // shards,
            stop_check=stop_check,
        )

    return ShardedBatches(make_shard, shard_count=shards, padding_side="right" if sft else "left",
                          pad_token_id=int(env.processor.pad_token_id))


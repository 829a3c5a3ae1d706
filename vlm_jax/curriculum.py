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
from vlm_jax import models, sharding
from vlm_jax.checkpoint import Checkpointer, PreemptionGuard
from vlm_jax.metrics import MetricsWriter
from vlm_jax.rl import grpo
from vlm_jax.rl import rewards as rewards_lib
from vlm_jax.rl.policy import grpo_step
from vlm_jax.rl.rollout import collect_rollout
from vlm_jax.sft import SFTBatch, sft_step
from vlm_jax.train_state import TrainState, init_state, make_optimizer

log = logging.getLogger(__name__)

CAPTION_INSTRUCTION = "Describe the image in detail."
PATCH = 14 * 14  # pixels per vision patch (Qwen2.5-VL)


# ------------------------------------------------------------------------------------------------
# set-up (everything that can fail on bad input happens here, before any compile)
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Env:
    cfg: config_lib.Config
    workdir: Path
    model: models.Model
    base_params: Any
    processor: Any
    sources: dict  # (name, split) -> random-access source
    num_patches: int  # fixed vision patch bucket (pixel budget), so shapes stay the same


def dtype_of(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def open_sources(cfg: config_lib.Config) -> dict:
    """Loads every training and evaluation dataset of every stage (a missing one fails here)."""
    from vlm_jax import data

    out = {}
    for i, stage in enumerate(cfg.stages):
        for kind, specs in (("datasets", stage.datasets), ("eval.datasets", stage.eval.datasets)):
            for j, ds in enumerate(specs):
                key = (ds.name, ds.split)
                if key in out:
                    continue
                try:
                    out[key] = data.load(ds.name, split=ds.split, data_dir=cfg.data.data_dir)
                except (ValueError, FileNotFoundError) as e:
                    raise config_lib.ConfigError(
                        f"stages.{i}.{kind}.{j}.name: {e}", f"stages.{i}.{kind}.{j}.name"
                    ) from e
    return out


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
    sources = open_sources(cfg)
    if cfg.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(Path(cfg.compilation_cache_dir).resolve()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    mesh = sharding.make_mesh(cfg.mesh)
    model, params = models.from_pretrained(
        cfg.model.path,
        dtype=dtype_of(cfg.model.dtype),
        mesh=mesh,
        rules=cfg.logical_axis_rules,
        options=model_options(cfg),
    )
    processor = Processor.from_pretrained(cfg.model.path)
    configure_processor(processor, cfg.data)
    return Env(cfg, workdir, model, params, processor, sources, num_patches_for(cfg))


def model_options(cfg: config_lib.Config) -> dict:
    """The model's compute settings from the config (the family's `ModelOptions` fields)."""
    m = cfg.model
    return dict(
        compute_dtype=m.compute_dtype or None, attention_chunk=m.attention_chunk, logits_chunk=m.logits_chunk
    )


def num_patches_for(cfg: config_lib.Config) -> int:
    """The fixed vision patch bucket: the largest batch's pixel budget, rounded up to a power of 2."""
    max_batch = max(s.batch_size for s in cfg.stages)
    budget = cfg.data.max_pixels_per_image * max_batch // PATCH
    return int(2 ** np.ceil(np.log2(max(budget, 64))))


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


def build_stage(env: Env, index: int, data_state: dict | None) -> Stage:
    from vlm_jax.data.pipeline import REASONING_INSTRUCTION, make_dataset

    st = env.cfg.stages[index]
    optimizer = make_optimizer(st.optimizer, st.steps, st.trainable)
    sft = st.objective == "sft"
    target = st.sft.target if sft else None
    # Every process reads the same global batch (shard 0 of 1) and supplies its own devices' slices
    # of it (`sharding.shard_batch`): the vision inputs (patches of all rows, window layout) are laid
    # out for the whole batch, which loading a part per process would split inconsistently.
    iterator = make_dataset(
        [(env.sources[(d.name, d.split)], d.weight) for d in st.datasets],
        env.processor,
        batch_size=st.batch_size,
        shard_index=0,
        shard_count=1,
        seed=env.cfg.seed + 1000 * index,
        order=st.order,
        order_key=st.order_key,
        target_field=target,
        length_buckets=env.cfg.data.length_buckets,
        max_prompt_len=env.cfg.data.max_prompt_len,
        max_pixels_per_batch=env.cfg.data.max_pixels_per_image * st.batch_size,
        strict=env.cfg.data.strict,
        text_only=sft and st.sft.caption_as_input,
        instruction=CAPTION_INSTRUCTION if target == "caption" else REASONING_INSTRUCTION,
    )
    if data_state is not None:
        iterator.set_state(data_state)
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
        batch = next(stage.iterator)
        inputs = models.place_inputs(model, model.prepare(batch, num_patches=env.num_patches))
        loss_mask = np.asarray(batch["loss_mask"], np.float32)
        loss_mask = jnp.asarray(loss_mask) if model.mesh is None else sharding.shard_batch(loss_mask, model.mesh)
        sft_batch = SFTBatch(inputs, loss_mask)
        state, m = sft_step(
            state,
            sft_batch,
            graphdef=model.graphdef,
            optimizer=stage.optimizer,
            normalize=st.sft.normalize,
            micro_batch=st.micro_batch_size,
            mesh=model.mesh,
        )
        host = {k: float(v) for k, v in sharding.to_host(m).items()}
    else:
        g = st.grpo
        roll_rng, upd_rng = jax.random.split(rng)
        rbatch, _, host = collect_rollout(
            model,
            state.params,
            ref_params,
            stage.iterator,
            cfg=g,
            tokenizer=proc.tokenizer,
            reward_fn=stage.reward_fn,
            rng=roll_rng,
            eos_token_ids=proc.eos_token_ids,
            pad_token_id=proc.pad_token_id,
            image_token_id=proc.image_token_id,
            batch_size=st.batch_size,
            prompt_buckets=env.cfg.data.length_buckets,
            num_patches=env.num_patches,
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
        )
        host.update({k: float(v) for k, v in sharding.to_host(m).items()})
    host["skipped_nonfinite"] = int(state.skipped)
    return state, host


def evaluate_stage(
    env: Env, stage: Stage, params, *, global_step: int, stage_step: int, when: str, writer: MetricsWriter
) -> dict:
    from vlm_jax.evaluate import evaluate_source

    ev = stage.cfg.eval
    out = {}
    for ds in ev.datasets:
        name = f"{ds.name}[{ds.split}]"
        result = evaluate_source(
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
        result["when"] = when
        writer.write_eval(global_step, stage.cfg.name, name, result, stage_step=stage_step)
        out[name] = result
    return out


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------


def _restore(env: Env, ckpt: Checkpointer, refs: Checkpointer):
    """(state, meta, ref_params) from the latest checkpoint, or None for a fresh run."""
    step = ckpt.latest_step()
    if step is None:
        return None
    meta = ckpt.restore_meta(step)
    opt_stage = env.cfg.stages[meta["opt_stage"]]
    target = init_state(
        env.base_params, make_optimizer(opt_stage.optimizer, opt_stage.steps, opt_stage.trainable)
    )
    state, meta = ckpt.restore(step, target=target)
    ref = None
    if refs.latest_step() == meta["stage_index"] and meta["stage_step"] > 0:
        ref, _ = refs.restore(meta["stage_index"], target=env.base_params)
    log.info("resuming from step %d: stage %d, stage step %d", step, meta["stage_index"], meta["stage_step"])
    return state, meta, ref


def run(cfg: config_lib.Config, workdir: str | Path, *, stop_after: int | None = None) -> str:
    """Runs (or resumes) the curriculum; returns "finished" or "preempted".

    `stop_after` requests a stop (exactly like SIGTERM) once the global step reaches it, e.g. for a
    time-boxed job; the run checkpoints and returns "preempted"."""
    workdir = Path(workdir).resolve()  # orbax needs absolute paths
    workdir.mkdir(parents=True, exist_ok=True)
    env = setup(cfg, workdir)
    (workdir / "config.json").write_text(json.dumps(config_lib.config_to_dict(cfg), indent=2))
    ckpt = Checkpointer(
        workdir / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
    )
    refs = Checkpointer(workdir / "reference", keep=1, async_save=False)
    writer = MetricsWriter(workdir, tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress)
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
    global_step = meta["global_step"]
    status = "finished"
    with PreemptionGuard() as guard:
        for index in range(meta["stage_index"], len(cfg.stages)):
            st = cfg.stages[index]
            resuming = index == meta["stage_index"] and meta["stage_step"] > 0
            stage = build_stage(env, index, meta["data_state"] if resuming else None)
            params = env.base_params if state is None else state.params
            if resuming:
                pass  # state (params, optimizer, counters) comes from the checkpoint
            elif state is None or st.reset_optimizer:
                state = init_state(params, stage.optimizer)
            else:
                fresh = init_state(params, stage.optimizer)
                if jax.tree.structure(fresh.opt_state) != jax.tree.structure(state.opt_state):
                    raise config_lib.ConfigError(
                        f"stages.{index}.reset_optimizer=False needs the same optimizer and trainable "
                        f"modules as the previous stage",
                        f"stages.{index}.reset_optimizer",
                    )
                state = TrainState(state.params, state.opt_state, jnp.zeros_like(state.step), state.skipped)
            start = meta["stage_step"] if resuming else 0
            if st.objective != "grpo" or st.grpo.kl_coef == 0:
                ref_params = None  # no reference model kept in memory
            elif not resuming:  # the reference is the policy at the start of this stage
                ref_params = jax.tree.map(jnp.copy, state.params)
                refs.save(index, ref_params, {"stage_index": index}, force=True)
            if start == 0 and st.eval.datasets:
                evaluate_stage(
                    env,
                    stage,
                    state.params,
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
            with writer.stage_progress(st.name, st.steps, initial=start) as bar:
                for stage_step in range(start, st.steps):
                    if guard.requested:
                        ckpt.save(
                            global_step,
                            state,
                            meta_for(index, stage_step, index, stage.iterator.get_state()),
                            force=True,
                        )
                        status = "preempted"
                        break
                    state, host = train_step(
                        env, stage, state, ref_params, step_rng(cfg.seed, index, stage_step)
                    )
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
                            state.params,
                            global_step=global_step,
                            stage_step=stage_step + 1,
                            when="during",
                            writer=writer,
                        )
                    if (stage_step + 1) % cfg.checkpoint.every == 0 and stage_step + 1 < st.steps:
                        ckpt.save(
                            global_step,
                            state,
                            meta_for(index, stage_step + 1, index, stage.iterator.get_state()),
                        )
            if status == "preempted":
                break
            if st.eval.datasets:
                evaluate_stage(
                    env,
                    stage,
                    state.params,
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
    ckpt.wait()
    ckpt.close()
    refs.close()
    writer.close()
    if status == "finished":
        from vlm_jax import report

        text = report.write_report(workdir, [s.name for s in cfg.stages])
        report.plot(workdir)
        print(text)
    return status


def restore_for_export(workdir: str | Path):
    """(model, params, processor) of the latest checkpoint of a training workdir."""
    from vlm_jax.data.processor import Processor

    workdir = Path(workdir).resolve()
    cfg_file = workdir / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(
            f"{workdir} is neither a model directory nor a training workdir (no config.json)"
        )
    cfg = config_lib.config_from_dict(json.loads(cfg_file.read_text()))
    model, base = models.from_pretrained(cfg.model.path, dtype=dtype_of(cfg.model.dtype))
    with Checkpointer(workdir / "checkpoints", keep=cfg.checkpoint.keep) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
        meta = ckpt.restore_meta()
        st = cfg.stages[meta["opt_stage"]]
        target = init_state(base, make_optimizer(st.optimizer, st.steps, st.trainable))
        state, _ = ckpt.restore(target=target)
    processor = Processor.from_pretrained(cfg.model.path)
    return model, state.params, processor

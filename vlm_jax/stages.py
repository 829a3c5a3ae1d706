"""Stage objects: what one stage of the curriculum runs, per objective.

`build_stage` makes an `SFTStage` or a `GRPOStage` (optimizer, data iterator, the model with the
stage's remat policy). Every stage's `enter` builds its training state once (full weights, or fresh
LoRA adapters over a frozen base, the previous LoRA stage's adapters merged first; the optimizer
reset or carried over); a stage's `reference` is its KL reference model (GRPO only) and `step` one
step of its objective. A new objective is a new `Stage` subclass and a line in `build_stage`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import config as config_lib
from vlm_jax import models, sharding
from vlm_jax.checkpoint import Checkpointer
from vlm_jax.metrics import MetricsWriter
from vlm_jax.models import lora
from vlm_jax.rl import grpo
from vlm_jax.rl import rewards as rewards_lib
from vlm_jax.rl.grouped import grpo_step_grouped
from vlm_jax.rl.policy import grpo_step
from vlm_jax.rl.rollout import SpecialTokens, collect_rollout
from vlm_jax.sft import SFTBatch, sft_step
from vlm_jax.startup import Env, data_shards, dtype_of, make_iterator
from vlm_jax.train_state import TrainState, init_state, make_optimizer
from vlm_jax.workdir import fresh_adapters

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Stage:
    """Everything built for one stage: optimizer, data iterator, the model it trains."""

    index: int
    cfg: config_lib.StageConfig
    optimizer: Any
    iterator: Any
    model: Any = None  # the env's model with this stage's remat policy
    frozen: lora.Frozen | None = None  # a LoRA stage's base (its TrainState's params are the adapters)

    def policy(self, state: TrainState):
        """The parameters the model runs with: the state's, or the base with the state's adapters."""
        return lora.with_adapters(self.frozen, state.params)

    def enter(self, env: Env, state: TrainState | None, frozen: lora.Frozen | None,
              bases: Checkpointer) -> TrainState:
        """The training state at this stage's start, from the previous stage's (`None`: the loaded
        model; `frozen`: the previous stage was a LoRA stage, its adapters are merged first). Sets
        `self.frozen` for a LoRA stage."""
        cfg, st = env.cfg, self.cfg
        if state is None:
            params = env.base_params
        elif frozen is not None:  # a LoRA stage ended: its adapters merged into the weights
            params = lora.merge(lora.with_adapters(frozen, state.params), dtype=dtype_of(cfg.model.dtype))
        else:
            params = state.params
        self.frozen = None
        if st.lora.enabled:
            base = lora.cast(params, dtype_of(st.lora.base_dtype or cfg.model.dtype))
            if state is not None:  # weights changed by earlier stages: kept for a resume
                bases.save(self.index, base, {"stage_index": self.index}, force=True)
            self.frozen = lora.Frozen(base, st.lora.scale)
            return init_state(fresh_adapters(cfg, self.index, base, env.model.mesh), self.optimizer)
        if state is None or st.reset_optimizer:
            return init_state(params, self.optimizer)
        return TrainState(state.params, state.opt_state, jnp.zeros_like(state.step), state.skipped)

    def reference(self, state: TrainState, restored, refs: Checkpointer, resuming: bool):
        """The KL reference parameters this stage's steps take (`restored`: the one a resume read);
        an objective without a reference model has none."""
        return None

    def step(self, env: Env, state: TrainState, ref_params, rng) -> tuple[TrainState, dict]:
        """One step of the stage's objective on this process's rows; returns host metrics."""
        raise NotImplementedError

    def evaluate(self, env: Env, state: TrainState, writer: MetricsWriter, *, global_step: int,
                 stage_step: int, when: str) -> dict:
        """Evaluates the policy on the stage's eval datasets and logs each result (`when`: before,
        during or after the stage)."""
        from vlm_jax.data.pipeline import StopRequested
        from vlm_jax.data.rows import RowCache
        from vlm_jax.evaluate import evaluate_source

        ev, params, out = self.cfg.eval, self.policy(state), {}
        for ds in ev.datasets:
            name = f"{ds.name}[{ds.split}]"
            # a set evaluated again (after every stage) is read and encoded once per run
            key = (ds.name, ds.split, ev.max_examples, ev.batch_size)
            if key not in env.eval_caches:
                env.eval_caches[key] = RowCache(env.cfg.data.row_cache_mb * 2**20)
            try:
                result = evaluate_source(
                    env.model, params, env.processor, env.sources[(ds.name, ds.split)], name=name,
                    max_examples=ev.max_examples, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
                    length_buckets=env.cfg.data.length_buckets,
                    max_pixels_per_batch=env.cfg.data.max_pixels_per_image * ev.batch_size, seed=env.cfg.seed,
                    row_cache=env.eval_caches[key], slots=ev.refill_slots)
            except StopRequested:  # SIGTERM while reading eval data: skip it, the loop stops next
                log.warning("evaluation of %s interrupted by a stop request; not recorded", name)
                break
            result["when"] = when
            writer.write_eval(global_step, self.cfg.name, name, result, stage_step=stage_step)
            out[name] = result
        return out

    def summary(self, steps_done: int) -> str:
        """The line printed when the stage ends: steps, rows used, rows skipped per reason."""
        from vlm_jax.data.pipeline import describe_skips

        stats = self.iterator.stats
        return (f"stage {self.cfg.name}: {steps_done}/{self.cfg.steps} steps; data rows used "
                f"{stats['rows']}, skipped {sum(stats['skipped'].values())} ({describe_skips(stats['skipped'])})")

    def update_args(self) -> dict:
        """The keyword arguments every objective's update step takes from the stage."""
        return dict(graphdef=self.model.graphdef, optimizer=self.optimizer, micro_batch=self.cfg.micro_batch_size,
                    mesh=self.model.mesh, frozen=self.frozen)

    def finish_metrics(self, state: TrainState, host: dict) -> dict:
        host["skipped_nonfinite"] = int(state.skipped)
        host.update(data_metrics(self.iterator))
        return host


class SFTStage(Stage):
    """Cross-entropy on the target field's tokens (`vlm_jax.sft.sft_step`)."""

    def step(self, env, state, ref_params, rng):
        model, st = self.model, self.cfg
        batch = next(self.iterator)  # this process's rows
        inputs = models.place_inputs(model, models.prepare_local(model, batch, num_patches=env.num_patches),
                                     local=True)
        loss_mask = np.asarray(batch["loss_mask"], np.float32)
        loss_mask = (jnp.asarray(loss_mask) if model.mesh is None
                     else sharding.shard_batch(loss_mask, model.mesh, local=True))
        state, m = sft_step(state, SFTBatch(inputs, loss_mask), normalize=st.sft.normalize, **self.update_args())
        host = {k: float(v) for k, v in sharding.to_host(m).items()}
        return state, self.finish_metrics(state, host)


@dataclasses.dataclass
class GRPOStage(Stage):
    """Sample groups, score them with the stage's reward, one GRPO update (`vlm_jax.rl`)."""

    reward_fn: Any = None
    loss_cfg: grpo.GRPOLossConfig | None = None

    def reference(self, state, restored, refs, resuming):
        """None without a KL term; a LoRA stage's base with the adapters off (no copy); else the
        policy at the stage's start (saved for a resume; in host memory between its uses with
        `grpo.offload_reference`)."""
        g = self.cfg.grpo
        if g.kl_coef == 0:
            return None  # no reference model kept in memory
        if self.frozen is not None:
            return self.frozen.params
        ref_params = restored
        if not resuming:
            ref_params = jax.tree.map(jnp.copy, state.params)
            refs.save(self.index, ref_params, {"stage_index": self.index}, force=True)
        if ref_params is not None and g.offload_reference:
            refs.wait()
            ref_params = sharding.to_memory(ref_params, "pinned_host")  # on the chips only while scoring
        return ref_params

    def step(self, env, state, ref_params, rng):
        model, proc, st = self.model, env.processor, self.cfg
        g = st.grpo
        errors_before = sum(rewards_lib.reward_errors().values())
        roll_rng, upd_rng = jax.random.split(rng)
        rbatch, _, host = collect_rollout(
            model,
            self.policy(state),
            ref_params,
            self.iterator,
            cfg=g,
            tokenizer=proc.tokenizer,
            reward_fn=self.reward_fn,
            rng=roll_rng,
            tokens=SpecialTokens.of(proc),
            batch_size=st.batch_size // jax.process_count(),  # this process's prompts
            prompt_buckets=env.cfg.data.length_buckets,
            num_patches=env.num_patches,
            rules=env.cfg.logical_axis_rules,
            shards=data_shards(env.cfg) // jax.process_count(),
        )
        args = self.update_args()
        if g.length_groups:  # micro-batches of similar response length, each cut to its own buckets
            update = functools.partial(grpo_step_grouped, groups=g.length_groups,
                                       prompt_buckets=env.cfg.data.length_buckets)
            del args["micro_batch"]
        else:
            update = grpo_step
        state, m = update(state, rbatch, upd_rng, group_size=g.num_samples, loss_cfg=self.loss_cfg, mu=g.mu,
                          minibatch=g.mini_batch_size, share_prompt=g.share_prompt, **args)
        host.update({k: float(v) for k, v in sharding.to_host(m).items()})
        host["reward/errors"] = sum(rewards_lib.reward_errors().values()) - errors_before
        return state, self.finish_metrics(state, host)


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


def build_stage(env: Env, index: int, data_state: dict | None, stop_check=None) -> Stage:
    """Stage `index` from its start (`data_state` None) or from a checkpoint's data position."""
    st = env.cfg.stages[index]
    optimizer = make_optimizer(st.optimizer, st.steps, st.trainable)
    iterator = make_iterator(env, index, stop_check=stop_check)
    if data_state is not None:
        from vlm_jax.data.shards import ShardCountError

        try:
            iterator.set_state(data_state)
        except ShardCountError as e:
            iterator.close()
            raise config_lib.ConfigError(str(e), "data.shards") from None
    model = env.model.with_options(remat=st.remat)
    if st.objective == "sft":
        return SFTStage(index, st, optimizer, iterator, model)
    return GRPOStage(index, st, optimizer, iterator, model, reward_fn=rewards_lib.build_reward(st.reward),
                     loss_cfg=loss_config(st))


def step_rng(seed: int, stage_index: int, stage_step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stage_index), stage_step)


def data_metrics(iterator) -> dict:
    """The stage's data counters so far: `data/rows` used, `data/skipped` and `data/skipped/<reason>`
    for each reason that occurred."""
    stats = iterator.stats
    skipped = {r: n for r, n in stats["skipped"].items() if n}
    out = {"data/rows": stats["rows"], "data/skipped": sum(skipped.values())}
    out.update({f"data/skipped/{r}": n for r, n in skipped.items()})
    return out

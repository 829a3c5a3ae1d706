"""The workdir's checkpoints: the restore target of each stage's checkpoints, a LoRA stage's frozen
base, resuming a run (`restore`), the cleanup of partial saves, and `restore_for_export` (what
export and evaluation read from a training workdir).

A workdir holds `config.json`, `checkpoints/` (the training state, async saves), `reference/` (a
GRPO stage's KL reference, the policy at the stage's start) and `lora_base/` (a LoRA stage's base
when earlier stages changed the loaded weights).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax

from vlm_jax import config as config_lib
from vlm_jax import models, paths
from vlm_jax.checkpoint import Checkpointer
from vlm_jax.metrics import MetricsWriter
from vlm_jax.models import lora
from vlm_jax.startup import Env, drop_base_params, dtype_of
from vlm_jax.train_state import TrainState, init_fn, init_state, make_optimizer

log = logging.getLogger(__name__)


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


class RunCheckpoints:
    """The three checkpoint directories of a run's workdir (partial saves of a killed run removed
    first)."""

    def __init__(self, cfg: config_lib.Config, workdir: Path):
        if jax.process_index() == 0:  # a save killed mid-write (SIGKILL) leaves one behind
            for sub in ("checkpoints", "reference", "lora_base"):
                remove_partial_checkpoints(workdir / sub)
        self.ckpt = Checkpointer(
            workdir / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
        )
        self.refs = Checkpointer(workdir / "reference", keep=1, async_save=False)
        self.bases = Checkpointer(workdir / "lora_base", keep=2, async_save=False)

    def close(self) -> None:
        self.ckpt.wait()
        for c in (self.ckpt, self.refs, self.bases):
            c.close()

    def close_quietly(self, writer: MetricsWriter, iterators=()) -> None:
        """After an error: stop the data readers, let in-flight saves commit, close orbax (no threads
        or event loops left to fail at interpreter exit), drop uncommitted save directories; never
        mask the original error."""
        checkpointers = (self.ckpt, self.refs, self.bases)
        for closer in (*(it.close for it in iterators), *(c.close for c in checkpointers), writer.close):
            try:
                closer()
            except Exception as e:  # noqa: BLE001 - the original error is the one to report
                log.warning("while closing after an error: %s: %s", type(e).__name__, e)
        for c in checkpointers:
            remove_partial_checkpoints(c.directory)


def restore(env: Env, ckpt: Checkpointer, refs: Checkpointer):
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

"""The staged curriculum: one loop for every stage, stage objects swapped at stage boundaries.

For each stage of `config.stages` (perception -> textual reasoning -> visual reasoning by default,
any order allowed) the loop builds the stage (`vlm_jax.stages`: an `SFTStage` or a `GRPOStage` with
its data iterator, optimizer, reward and step, jitted once per shape and reused whenever the
objective and shapes repeat), enters it (training state, LoRA base, KL reference), then runs its
steps with logging, periodic evaluation and async checkpoints. The checks before the first step
live in `vlm_jax.startup`, the checkpoint plumbing and resume in `vlm_jax.workdir`.

Rerunning with the same workdir resumes from the latest checkpoint: same stage, stage step, data
position and RNG, so the result is bitwise that of an uninterrupted run (CPU). SIGTERM checkpoints at
the next step boundary and returns "preempted" (the CLI exits 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax

from vlm_jax import config as config_lib
from vlm_jax import paths
from vlm_jax.checkpoint import PreemptionGuard
from vlm_jax.metrics import MetricsWriter
from vlm_jax.stages import Stage, build_stage, step_rng
from vlm_jax.startup import (Env, check_compilation_cache, check_first_batches, check_lora, check_optimizer_carry,
                             check_workdir, drop_base_params, setup)
from vlm_jax.train_state import TrainState
from vlm_jax.workdir import RunCheckpoints, lora_base, restore


def train_step(env: Env, stage: Stage, state: TrainState, ref_params, rng) -> tuple[TrainState, dict]:
    """One step of the stage's objective; returns host metrics (the loop's one call into a stage's
    step, which tests and benchmarks wrap)."""
    return stage.step(env, state, ref_params, rng)


def run(cfg: config_lib.Config, workdir: str | Path, *, stop_after: int | None = None) -> str:
    """Runs (or resumes) the curriculum; returns "finished" or "preempted".

    Everything that can fail on the config or the data of any stage is checked before the first
    step (see `vlm_jax.startup`). `stop_after` requests a stop (exactly like SIGTERM) once the global
    step reaches it, e.g. for a time-boxed job; the run checkpoints and returns "preempted". On an
    error the pending checkpoint saves finish (or their partial directories are removed) and every
    writer is closed before the error propagates."""
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
        ckpts = RunCheckpoints(cfg, workdir)
        writer = MetricsWriter(workdir, tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress)
        try:
            status = _loop(env, cfg, ckpts, writer, guard, stop_after)
        except BaseException:
            ckpts.close_quietly(writer, env.open_iterators)
            raise
        ckpts.close()
        writer.close()
    if status == "finished" and jax.process_index() == 0:  # one writer of the report and plots
        from vlm_jax import report

        text = report.write_report(workdir, [s.name for s in cfg.stages],
                                   {s.name: [d.name for d in s.datasets] for s in cfg.stages})
        report.plot(workdir)
        print(text)
    return status


def _loop(env: Env, cfg: config_lib.Config, ckpts: RunCheckpoints, writer: MetricsWriter,
          guard: PreemptionGuard, stop_after: int | None) -> str:
    from vlm_jax.data.pipeline import BadRowError, StopRequested

    ckpt = ckpts.ckpt
    restored = restore(env, ckpt, ckpts.refs)
    state, meta, restored_ref = restored or (
        None, dict(stage_index=0, stage_step=0, global_step=0, opt_stage=0, data_state=None), None)
    if restored is not None:
        writer.truncate_after(meta["global_step"] + 1)
        if meta["stage_step"] == 0 and meta["stage_index"] < len(cfg.stages):
            # the stage-start evaluation of this stage runs again: drop a record of it already logged
            writer.drop_records(meta["global_step"], cfg.stages[meta["stage_index"]].name)
    global_step = meta["global_step"]
    # the base the state's adapters belong to, when the state comes from a LoRA stage
    frozen = None
    if state is not None and cfg.stages[meta["opt_stage"]].lora.enabled:
        frozen = lora_base(cfg, ckpts.bases, meta["opt_stage"], env.base_params)
    status = "finished"
    for index in range(meta["stage_index"], len(cfg.stages)):
        st = cfg.stages[index]
        resuming = index == meta["stage_index"] and meta["stage_step"] > 0
        stage = build_stage(env, index, meta["data_state"] if resuming else None,
                            stop_check=lambda: guard.requested)
        env.open_iterators.append(stage.iterator)
        if resuming:  # state (params or adapters, optimizer, counters) comes from the checkpoint
            stage.frozen = frozen
        else:
            state = stage.enter(env, state, frozen, ckpts.bases)
        frozen = stage.frozen
        drop_base_params(env)  # the state (or the LoRA base) holds its own copy of the weights
        ref_params = stage.reference(state, restored_ref if resuming else None, ckpts.refs, resuming)
        start = meta["stage_step"] if resuming else 0

        def evaluate(stage_step: int, when: str) -> None:
            stage.evaluate(env, state, writer, global_step=global_step, stage_step=stage_step, when=when)

        def save(stage_index: int, stage_step: int, data_state, force: bool = False) -> None:
            ckpt.save(global_step, state, dict(stage_index=stage_index, stage_step=stage_step,
                                               global_step=global_step, opt_stage=index,
                                               data_state=data_state, seed=cfg.seed), force=force)

        if start == 0 and st.eval.datasets and st.eval.at_start:
            evaluate(0, "before")
        steps_done = start
        with writer.stage_progress(st.name, st.steps, initial=start) as bar:
            for stage_step in range(start, st.steps):
                data_state = stage.iterator.get_state()
                ran = False
                if not guard.requested:
                    try:
                        state, host = train_step(env, stage, state, ref_params, step_rng(cfg.seed, index, stage_step))
                        ran = True
                    except StopRequested:  # SIGTERM while waiting for data: this step never ran
                        pass
                    except BadRowError as e:  # data.strict: the row is named; bad input, exit 2
                        raise config_lib.ConfigError(f"stage {st.name!r}: {e}", f"stages.{index}.datasets") from None
                if not ran:
                    if ckpt.latest_step() != global_step:  # else saved already: same state, same data position
                        save(index, stage_step, data_state, force=True)
                    status = "preempted"
                    break
                steps_done = stage_step + 1
                global_step += 1
                if stop_after is not None and global_step >= stop_after:
                    guard.request()
                if steps_done % cfg.logging.every == 0 or steps_done == st.steps:
                    writer.write(global_step, st.name, steps_done, host)
                bar.update(host)
                if st.eval.every and steps_done % st.eval.every == 0 and steps_done < st.steps:
                    evaluate(steps_done, "during")
                every = cfg.checkpoint.every  # 0: only at stage ends
                if every and steps_done % every == 0 and steps_done < st.steps:
                    save(index, steps_done, stage.iterator.get_state())
        print(stage.summary(steps_done), flush=True)
        stage.iterator.close()
        if status == "preempted":
            break
        if st.eval.datasets:
            evaluate(st.steps, "after")
        save(index + 1, 0, None, force=True)  # boundary checkpoint: the next stage starts from here
        if guard.requested and index + 1 < len(cfg.stages):
            status = "preempted"
            break
    return status

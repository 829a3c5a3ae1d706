"""python -m vlm_jax.train --config configs/NAME.py [--config.KEY=VALUE ...] --workdir DIR

Runs the staged curriculum of the config; rerunning with the same workdir resumes (from the newest
checkpoint that restores completely). Exits 0 when finished or when preempted by SIGTERM (after
checkpointing), 2 on a bad config or input (one line `error: ...`, checked for every stage before the
first step), 1 when a checkpoint cannot be written (the previous one stays intact) or none of the
existing ones restores (one line), and 1 on any other error (one line `error: ...`, then its
traceback once).

Several processes (one per host): `--distributed=auto` on a TPU pod slice (`jax.distributed`
discovers the slice), or `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` on
CPU/GPU clusters. Every process runs the same command.

A process that fails ends the job: one that raises tells the others through JAX's coordination
service and all exit non-zero at once, naming it; one that dies (SIGKILL, lost host) is declared
dead by the service after `--heartbeat_timeout` seconds (default 100, JAX's) and the others then
terminate, naming it. `--shutdown_timeout` and `--initialization_timeout` bound the exit barrier
and the start-up handshake.
"""

import logging
import sys
import traceback

from vlm_jax import config as config_lib
from vlm_jax.checkpoint import CheckpointDamagedError, CheckpointWriteError
from vlm_jax.models import CheckpointError


DISTRIBUTED_FLAGS = ("workdir", "distributed", "coordinator_address", "num_processes", "process_id")
TIMEOUT_FLAGS = ("heartbeat_timeout", "shutdown_timeout", "initialization_timeout")


def init_distributed(flags: dict) -> None:
    """`jax.distributed.initialize` from the command line flags (nothing for a single process)."""
    explicit = [k for k in ("coordinator_address", "num_processes", "process_id") if k in flags]
    if "distributed" in flags and flags["distributed"] != "auto":
        raise config_lib.ConfigError(f"--distributed={flags['distributed']}: the only value is 'auto'")
    if explicit and len(explicit) != 3:
        raise config_lib.ConfigError(
            "--coordinator_address, --num_processes and --process_id go together; got " + ", ".join(explicit)
        )
    if not explicit and "distributed" not in flags:
        return
    timeouts = {}
    for name in TIMEOUT_FLAGS:
        if name in flags:
            try:
                timeouts[f"{name}_s"] = int(flags[name])
            except ValueError:
                timeouts[f"{name}_s"] = 0
            if timeouts[f"{name}_s"] < 1:
                raise config_lib.ConfigError(f"--{name}={flags[name]}: must be a whole number of seconds >= 1")
    from vlm_jax import sharding

    if explicit:
        sharding.initialize_distributed(
            flags["coordinator_address"], int(flags["num_processes"]), int(flags["process_id"]), **timeouts
        )
    else:
        sharding.initialize_distributed(**timeouts)


EXPECTED_ERRORS = (config_lib.ConfigError, CheckpointError, FileNotFoundError)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        path, overrides, flags = config_lib.parse_flags(
            sys.argv[1:] if argv is None else argv, known_flags=DISTRIBUTED_FLAGS + TIMEOUT_FLAGS
        )
        if path is None or "workdir" not in flags:
            raise config_lib.ConfigError(
                "usage: python -m vlm_jax.train --config FILE --workdir DIR [--config.KEY=VALUE ...]"
            )
        cfg = config_lib.load_config(path, overrides)
        init_distributed(flags)
        from vlm_jax import curriculum

        try:
            status = curriculum.run(cfg, flags["workdir"])
        except BaseException as e:  # several processes: end the whole job, naming the error
            from vlm_jax import sharding

            expected = isinstance(e, EXPECTED_ERRORS)
            sharding.fail_job(e, code=2 if expected else 1, show_traceback=not expected)
            raise
    except EXPECTED_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        details = getattr(e, "details", "")
        if details:
            print(details, file=sys.stderr, end="" if details.endswith("\n") else "\n")
        return 2
    except (CheckpointWriteError, CheckpointDamagedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one readable line, then the traceback once
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        traceback.print_exception(e, file=sys.stderr)
        return 1
    print(f"run {status}: {flags['workdir']}")
    return 0


def cli() -> None:
    """The `vlm-jax-train` / `python -m vlm_jax.train` entry: `main`, then exit without waiting for
    data-reader threads still blocked in a read (a stop during a stalled read must not hang)."""
    import os
    import threading

    code = main()
    stuck = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon
             and t.name.startswith("grain")]
    if stuck:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()

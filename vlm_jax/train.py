"""python -m vlm_jax.train --config configs/NAME.py [--config.KEY=VALUE ...] --workdir DIR

Runs the staged curriculum of the config; rerunning with the same workdir resumes. Exits 0 when
finished or when preempted by SIGTERM (after checkpointing), 2 on a bad config or input.
"""

import logging
import sys

from vlm_jax import config as config_lib
from vlm_jax.models import CheckpointError


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        path, overrides, flags = config_lib.parse_flags(sys.argv[1:] if argv is None else argv)
        if path is None or "workdir" not in flags:
            raise config_lib.ConfigError(
                "usage: python -m vlm_jax.train --config FILE --workdir DIR [--config.KEY=VALUE ...]"
            )
        cfg = config_lib.load_config(path, overrides)
        from vlm_jax import curriculum

        status = curriculum.run(cfg, flags["workdir"])
    except (config_lib.ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run {status}: {flags['workdir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

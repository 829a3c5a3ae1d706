"""vlm_jax's two multi-core sampling paths in one process: one JAX device (XLA runs each matmul
on all cores) against one JAX CPU device per core on a `data` mesh (a decode loop per device, see
`sampler.data_parallel`). Same model, prompts and keys as `bench_rollout.py`; calls
alternate, so both see the same machine state.

    python scripts/compare_rollout_paths.py [--cpus 2] [--calls 14]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rollout import BENCH_SPEC, make_batch, pin_cpus  # (pins nothing at import)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=int, default=None, help="pin to this many cores (default: all)")
    parser.add_argument("--calls", type=int, default=14, help="timed calls per path")
    args = parser.parse_args(argv)
    cpus = pin_cpus(args.cpus)
    import jax

    jax.config.update("jax_num_cpu_devices", len(cpus))  # before anything starts the backend
    from vlm_jax import models, sharding
    from vlm_jax.data.processor import Processor
    from vlm_jax.models.tiny import build_tiny_model
    from vlm_jax.rl import sampler

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(Path(tmp) / "model", spec=BENCH_SPEC, seed=0)
        batch = make_batch(Processor.from_pretrained(path), 8)
        paths = {"one device": models.from_pretrained(path)}
        if len(jax.devices()) > 1:
            paths[f"{len(jax.devices())} devices, data mesh"] = models.from_pretrained(
                path, mesh=sharding.make_mesh())

    def call(name: str, key: int):
        model, params = paths[name]
        start = time.perf_counter()
        out = sampler.generate(model, params, batch, max_new_tokens=64, num_samples=4,
                               rng=jax.random.key(key), eos_token_ids=())
        return time.perf_counter() - start, out

    firsts = {name: call(name, 0)[1] for name in paths}  # compiles
    ref = next(iter(firsts.values()))
    times: dict[str, list[float]] = {name: [] for name in paths}
    for k in range(args.calls):
        for name in paths:
            times[name].append(call(name, k + 1)[0])
    print(f"command: python {' '.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}")
    print(f"cores {cpus}, jax {jax.__version__}, 8 prompts x 4 samples x 64 tokens, {args.calls} calls each")
    for name, ts in times.items():
        same = (firsts[name].tokens == ref.tokens).mean()
        print(f"{name:<26} median {statistics.median(ts) * 1e3:6.1f} ms   best {min(ts) * 1e3:6.1f} ms   "
              f"tokens equal to one device: {same:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

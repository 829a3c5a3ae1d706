"""Rollout throughput: vlm_jax's jitted sampler against transformers `generate` (PyTorch, fp32).

    python scripts/bench_rollout.py [--prompts 8] [--num_samples 4] [--new_tokens 64] [--repeats 3]
                                    [--spec bench|tiny] [--cpus N] [--torch_threads N]

Like with like: `--cpus N` pins the whole process (both sides) to N cores before either library
starts a thread, and torch gets N threads (override with `--torch_threads`). XLA sizes its CPU
thread pools from the cores the process may use, and XLA_FLAGS has no per-process thread-count
flag (`intra_op_parallelism_threads` is a TensorFlow option, not an XLA flag), so pinning is what
restricts the JAX side. The report prints the cores every thread of the process may run on.
Each library uses the cores its own way: torch with intra-op threads, vlm_jax with one JAX CPU
device per core (`jax_num_cpu_devices`) and the batch split over them on a `data` mesh, as on
any multi-device machine (`--single_device`: one device, whose matmuls use all the cores; slower
at this model size, where each decode step's matmuls are small: 0.36 against 0.25 s a call on
2026-12-03).
Timings are wall-clock: on a machine where other jobs run, a side that uses N threads suffers
more than one that uses one (torch's OpenMP threads wait for each other), so compare runs made
while nothing else runs.

Both sides load the SAME weights (a tiny real-format Qwen2.5-VL directory, config `BENCH_SPEC`
below: hidden 256, 4 layers, vocab 1024, vision depth 2), get the SAME processor batch (prompts
with one image each, left-padded) and sample (`do_sample`, temperature 1, no top-k / top-p) exactly
`--new_tokens` tokens per row (transformers: `min_new_tokens = max_new_tokens`; vlm_jax: no end
tokens). For each side: the first call (vlm_jax: compile + run), then `--repeats` rounds that call
each side in turn (both see the same background load) and report the median; generated tokens/s
counts prompts x num_samples x new_tokens per call. A greedy check first confirms both sides
produce the same tokens for these prompts (same weights, same inputs).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpu_pinning import pin_cpus  # noqa: E402  (re-exported: other scripts import it from here)

if __name__ == "__main__":
    _early = argparse.ArgumentParser(add_help=False)
    _early.add_argument("--cpus", type=int, default=None)
    pin_cpus(_early.parse_known_args()[0].cpus)

import jax
import numpy as np

from vlm_jax import models, sharding
from vlm_jax.data.processor import Processor
from vlm_jax.models.tiny import TinySpec, build_tiny_model
from vlm_jax.rl import sampler

BENCH_SPEC = TinySpec(
    vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, mrope_section=(8, 12, 12),
    vision_depth=2, vision_hidden_size=128, vision_intermediate_size=256, vision_num_heads=4,
    fullatt_block_indexes=(1,))
# `--spec tiny`: the test-size model (hidden 64, 2 layers), where per-op overhead dominates.
SPECS = {"bench": BENCH_SPEC, "tiny": TinySpec()}

QUESTIONS = ("How many circles are in the picture?", "What colour is the square?",
             "Describe the scene.", "Is the triangle left of the circle?",
             "Count the red shapes.", "What is written in the image?",
             "Which shape is the largest?", "What is 3 plus 4?")
IMAGE_SIZES = ((112, 112), (84, 140), (56, 112), (140, 84), (112, 56), (84, 84), (56, 56), (112, 84))


def make_batch(processor: Processor, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`n` chat prompts, each with one random RGB image of a different size (left-padded)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    texts, images = [], []
    for i in range(n):
        h, w = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        images.append([Image.fromarray(pixels)])
        messages = [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}]
        texts.append(processor.apply_chat_template(messages))
    return processor(texts, images, padding_side="left")


def torch_inputs(batch):
    """The processor batch as torch tensors; integer arrays as int64, which transformers indexes with."""
    import torch

    return {k: torch.as_tensor(v.astype(np.int64) if np.issubdtype(v.dtype, np.integer) else v)
            for k, v in batch.items()}


def busy_cpu_seconds() -> float:
    """CPU seconds all processes of this machine have used (user + nice + system + irq + softirq +
    steal, from /proc/stat; 0 where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def thread_cpus() -> tuple[int, set[int]]:
    """(number of threads, union of the cores they may run on) over all threads of this process."""
    cpus: set[int] = set()
    tasks = os.listdir("/proc/self/task")
    for tid in tasks:
        try:
            cpus |= os.sched_getaffinity(int(tid))
        except OSError:  # the thread ended meanwhile
            pass
    return len(tasks), cpus


def use_cpu_devices(n: int) -> None:
    """Asks JAX for `n` CPU devices; only possible before JAX starts its backend (the report prints
    how many devices there are)."""
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backend already started (main() called in a running process)
        pass


def vlm_jax_mesh():
    """A `data` mesh over all JAX devices, or None with one device."""
    return sharding.make_mesh() if len(jax.devices()) > 1 else None


def vlm_jax_call(path: Path, batch, args) -> Callable[[], None]:
    """One timed unit on the vlm_jax side: `sampler.generate` to numpy, output shape checked."""
    model, params = models.from_pretrained(path, mesh=vlm_jax_mesh())
    keys = iter(jax.random.split(jax.random.key(0), args.repeats + 1))
    rows = args.prompts * args.num_samples

    def call() -> None:
        out = sampler.generate(model, params, batch, max_new_tokens=args.new_tokens,
                               temperature=args.temperature, top_p=1.0, top_k=0,
                               num_samples=args.num_samples, rng=next(keys), eos_token_ids=())
        if out.tokens.shape != (rows, args.new_tokens) or not (out.lengths == args.new_tokens).all():
            raise RuntimeError(f"vlm_jax generated {out.tokens.shape}, lengths {set(out.lengths)}")
    return call


def transformers_call(path: Path, batch, args) -> Callable[[], None]:
    """One timed unit on the transformers side: `generate` with the same sampling settings."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    inputs = torch_inputs(batch)
    expected = (args.prompts * args.num_samples, inputs["input_ids"].shape[1] + args.new_tokens)

    def call() -> None:
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=True, temperature=args.temperature, top_k=0,
                                 top_p=1.0, num_return_sequences=args.num_samples,
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        if tuple(out.shape) != expected:
            raise RuntimeError(f"transformers generated {tuple(out.shape)}, expected {expected}")
    return call


def seconds(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(calls: dict[str, Callable[[], None]], repeats: int):
    """First-call seconds per side, then `repeats` rounds calling each side in turn, so both sides
    see the same background load (the machine may be shared)."""
    first = {name: seconds(fn) for name, fn in calls.items()}
    later: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            later[name].append(seconds(fn))
    return first, later


def greedy_agreement(path: Path, batch, new_tokens: int = 8) -> float:
    """Fraction of prompts whose first `new_tokens` greedy tokens agree on both sides: a check
    that the two sides really run the same weights and prompts."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, params = models.from_pretrained(path)
    ours = sampler.generate(model, params, batch, max_new_tokens=new_tokens, temperature=0.0,
                            rng=jax.random.key(0), eos_token_ids=()).tokens
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.inference_mode():
        theirs = hf.generate(**torch_inputs(batch), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    theirs = theirs[:, batch["input_ids"].shape[1]:].numpy()
    return float((ours == theirs).all(-1).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--cpus", type=int, default=None,
                        help="pin both sides to this many cores (default: all this process may use)")
    parser.add_argument("--torch_threads", type=int, default=None, help="default: the pinned cores")
    parser.add_argument("--spec", choices=sorted(SPECS), default="bench", help="model size")
    parser.add_argument("--skip_check", action="store_true", help="skip the greedy agreement check")
    parser.add_argument("--single_device", action="store_true",
                        help="vlm_jax on one JAX CPU device (default: one per pinned core)")
    args = parser.parse_args(argv)
    cpus = pin_cpus(args.cpus)  # already done at import when run as a script
    if args.torch_threads is None:
        args.torch_threads = len(cpus)
    use_cpu_devices(1 if args.single_device else len(cpus))

    load_before = os.getloadavg()
    busy_before, own_before, wall_before = busy_cpu_seconds(), sum(os.times()[:4]), time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(Path(tmp) / "model", spec=SPECS[args.spec], seed=0)
        processor = Processor.from_pretrained(path)
        batch = make_batch(processor, args.prompts)
        agree = None if args.skip_check else greedy_agreement(path, batch)
        first, later = interleaved({"vlm_jax": vlm_jax_call(path, batch, args),
                                    "transformers": transformers_call(path, batch, args)},
                                   args.repeats)
    steady = {name: statistics.median(times) for name, times in later.items()}

    tokens = args.prompts * args.num_samples * args.new_tokens
    print(f"command: python {' '.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}")
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"os.cpu_count()={os.cpu_count()}, jax {jax.__version__} on {jax.default_backend()}")
    print(f"model: --spec {args.spec}: {SPECS[args.spec]}")
    print(f"batch: {args.prompts} prompts (1 image each, input_ids {batch['input_ids'].shape}, "
          f"{batch['pixel_values'].shape[0]} patches) x {args.num_samples} samples x "
          f"{args.new_tokens} new tokens = {tokens} tokens/call, temperature {args.temperature}")
    if agree is not None:
        print(f"greedy agreement (8 tokens, same prompts): {agree:.0%} of prompts")
    print()
    print(f"{'':<14}{'first call s':>14}{'steady s':>12}{'tokens/s':>12}   later calls s")
    for name in later:
        print(f"{name:<14}{first[name]:>14.2f}{steady[name]:>12.3f}{tokens / steady[name]:>12.0f}   "
              f"{', '.join(f'{t:.3f}' for t in later[name])}")
    import torch

    n_threads, used = thread_cpus()
    mesh = vlm_jax_mesh()
    print(f"threads: process pinned to cores {cpus} (all {n_threads} threads: cores {sorted(used)}); "
          f"vlm_jax: XLA CPU on those {len(cpus)} cores, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"{len(jax.devices())} JAX devices, mesh {None if mesh is None else dict(mesh.shape)}; "
          f"transformers: torch.get_num_threads()={torch.get_num_threads()}")
    # CPU time used by everything but this process while it ran (the load average also counts
    # threads blocked in the kernel, so it can read ~1 on an idle machine)
    others = (busy_cpu_seconds() - busy_before) - (sum(os.times()[:4]) - own_before)
    print(f"1-min load average before / after this run: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}; "
          f"other processes used {max(others, 0.0):.1f} CPU s in the {time.monotonic() - wall_before:.0f} s "
          "of this run")
    print(f"vlm_jax compile (first call - steady): {first['vlm_jax'] - steady['vlm_jax']:.2f} s; "
          f"steady-state speed-up: {steady['transformers'] / steady['vlm_jax']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

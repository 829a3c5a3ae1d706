"""One full GRPO iteration: vlm_jax against TRL's `GRPOTrainer` (PyTorch, fp32), same checkpoint.

    python scripts/bench_grpo.py [--prompts 4] [--num_samples 4] [--new_tokens 32] [--iters 3]
                                 [--lengths variable,fixed] [--truncated 0.2]
                                 [--spec grpo] [--cpus N] [--json OUT] [--peer_venv .venv-peer]
                                 [--share_prompt | --no-share_prompt] [--share_prompt_ab]
                                 [--length_groups N[,N]] [--refill_slots S[,S]] [--refill_ab]

An iteration is what a GRPO training step does: sample `--num_samples` completions for each of
`--prompts` prompts (one image each), decode them and score them with a host reward, score the
completions under the reference model (KL coefficient 0.04, k3), and one AdamW update over all
completions (one mini-batch, mu = 1, global-norm clipping at 1.0, every module trained). Both sides
load the SAME tiny real-format Qwen2.5-VL directory (built here, random weights; config `SPECS`),
get the SAME prompts and images (built from a seed on each side), the SAME reward function
(`reward`), sample at temperature 1 (no top-k / top-p) at most `--new_tokens` tokens per completion
and run in fp32.

Two length settings (`--lengths`, default both, the variable one first: it is the figure):
  * `variable`: completions end at end-of-sequence tokens, with a spread of lengths like a real
    run's. Both sides stop a completion at the same set of token ids (`stop_ids`: the model's own
    end tokens plus evenly spaced ordinary ids, enough of them that about `--truncated` of the
    completions reach the cap when the next-token distribution is near uniform), so the lengths
    follow the same distribution on both sides: from a few tokens to the cap (geometric, mean about
    half the cap), some truncated. Each side reports its realised mean length.
  * `fixed`: every completion exactly `--new_tokens` long (vlm_jax: no end tokens; TRL:
    `min_new_tokens = max_completion_length`), the one case where padding costs nothing.

For each side the JSON and the table give the real-token fraction of the positions the update
and the reference scoring compute (prompt + response positions of the arrays they run; the
response positions alone as `response_real_frac`), and the decode slot utilisation of the rollout
(generated tokens / (slots x decode steps); vlm_jax: its rollout metric `rollout/decode_slot_util`,
the tokens its decode loops generated over their slots x iterations, each completion's first
token coming from its prompt's prefill; without refilled slots a sampler call runs every slot
until its last row stops).
vlm_jax runs `vlm_jax.rl.rollout.collect_rollout` + `vlm_jax.rl.policy.grpo_step`, the two calls a
GRPO stage of the trainer makes per step (`vlm_jax.curriculum.train_step`); TRL runs
`GRPOTrainer.train()` with the old log-probs skipped (num_iterations 1, as vlm_jax reuses the
sampler's) and the reference model's log-probs computed (beta 0.04).

The default model (`--spec grpo`: hidden 512, 4 layers, vocab 4096, vision depth 2 width 256)
is chosen so that compute, not per-op dispatch, dominates both sides: at `--spec tiny` (hidden 64)
both sides mostly wait on Python and op launch overhead.

Like with like: `--cpus N` pins this process to N cores before any library starts a thread; the
TRL side runs as a child process in its own venv (`--peer_venv`, created with
`pip install torch==2.14.1 torchvision==0.29.1 transformers trl` when missing, ~90 s, 5.5 GB) and
inherits the pinning; torch gets N threads, vlm_jax one JAX CPU device (`--devices 1`, the default),
whose matmuls run on all N cores (JAX 0.10's XLA CPU runtime calls YNNPACK with a thread per core),
as the trainer runs on a CPU. `--devices N` splits the batch over N JAX devices on a `data` mesh
instead: slower here (update 0.88-0.97 against 0.64-0.70 s on 2026-12-03), as every device then
all-reduces the 78 MB of gradients and runs the whole AdamW update itself. The two sides alternate
iteration by iteration (the child waits on a pipe between its steps), so both see the same
background load, with `--pause`
seconds (default 1) of idleness between them: back to back, each side's step overlapped the other
side's leftovers (TRL's post-step bookkeeping runs after its timed step; caches and memory
refilled), which slowed both (2026-12-03, 2 cores: vlm_jax 1.50 -> 1.13 s/iter, TRL 3.46 -> 2.80
with a 1 s pause); the first
iteration of each side (vlm_jax: compiles) is reported apart and the median of the `--iters`
later ones is the figure. The split is rollout (sampling + decoding), rewards, scoring (reference
log-probs and the rest of batch preparation) and update, measured by wrapping each side's own
functions (vlm_jax: `generate_and_grade`, the reward, `score_responses`, `grpo_step`; TRL:
`_generate`, `_calculate_rewards`, `_generate_and_score_completions`, the step).

`--share_prompt` / `--no-share_prompt` (default: `GRPOConfig.share_prompt`) sets vlm_jax's
`grpo.share_prompt` (each prompt run once for its G completions in the scoring and the update).
`--share_prompt_ab` runs no TRL side: vlm_jax with the flag off against vlm_jax with it on, in one
process, alternating iteration by iteration, with the same split (no peer venv needed).
`--refill_slots S` sets vlm_jax's `grpo.refill_slots` (a rollout whose finished decode slots take
the waiting completions); `--refill_ab` runs no TRL side: vlm_jax without refilled slots (`plain`:
every completion of the call a slot), with its prompts in chunks of S / G prompts (`chunked`,
`grpo.rollout_chunk`: the same KV-cache rows as S slots; when S / G is a whole number of prompts
and fewer than `--prompts`) and with S refilled slots (`refill`), on the first `--lengths`
setting, alternating, with the split and each side's decode slot utilisation.
`--length_groups` and `--refill_slots` take one value for every `--lengths` setting or one per
setting, in its order (`--length_groups 4,0 --refill_slots 4,0`: the variable setting grouped and
refilled, the fixed one on the default path, where every completion is the cap and there is
nothing to cut); the other modes take the first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # CPU against CPU (libtpu, if installed, is for the planner)
PEER_PACKAGES = ("torch==2.14.1", "torchvision==0.29.1", "transformers", "trl")
PARTS = ("rollout", "rewards", "scoring", "update")  # an iteration's timed parts
KL_COEF = 0.04
LR = 1e-5
CLIP = 0.2
QUESTIONS = ("How many circles are in the picture?", "What colour is the square?",
             "Describe the scene.", "Is the triangle left of the circle?",
             "Count the red shapes.", "What is written in the image?",
             "Which shape is the largest?", "What is 3 plus 4?")
IMAGE_SIZES = ((112, 112), (84, 140), (56, 112), (140, 84), (112, 56), (84, 84), (56, 56), (112, 84))
# TinySpec keyword arguments per `--spec` (the peer never imports vlm_jax, so plain dicts)
SPECS = {
    "grpo": dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=64, mrope_section=(8, 12, 12),
                 vision_depth=2, vision_hidden_size=256, vision_intermediate_size=512,
                 vision_num_heads=4, fullatt_block_indexes=(1,)),
    "bench": dict(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, mrope_section=(8, 12, 12),
                  vision_depth=2, vision_hidden_size=128, vision_intermediate_size=256,
                  vision_num_heads=4, fullatt_block_indexes=(1,)),
    "tiny": {},
}


def stop_ids(vocab_size: int, ordinary: int, end_ids, new_tokens: int, truncated: float) -> list[int]:
    """The `variable` setting's end tokens: the model's own `end_ids` plus evenly spaced ordinary
    token ids (below `ordinary`), as many as make a completion reach `new_tokens` with probability
    about `truncated` when the next token is drawn near uniformly from `vocab_size` ids (a
    per-token stop probability p with (1 - p)^new_tokens = truncated)."""
    p = 1.0 - truncated ** (1.0 / new_tokens)
    k = min(ordinary, max(1, round(p * vocab_size)))
    return sorted({*map(int, end_ids), *(int(i * ordinary / k) for i in range(k))})


def fractions(prompt_real: int, prompt_positions: int, resp_real: int, resp_positions: int) -> dict:
    """Real-token fractions of computed positions: all (prompt + response), and responses alone."""
    return dict(real_frac=(prompt_real + resp_real) / max(1, prompt_positions + resp_positions),
                response_real_frac=resp_real / max(1, resp_positions))


def reward(texts: list[str]) -> list[float]:
    """The host reward both sides use: a cheap deterministic function of the decoded text that
    varies between samples (distinct characters mod 5, in [0, 1])."""
    return [float(len(set(t)) % 5) / 4.0 for t in texts]


def prompts(n: int, seed: int = 0):
    """`n` (question, RGB uint8 image) pairs, the same on both sides."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        out.append((QUESTIONS[i % len(QUESTIONS)], rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)))
    return out


from cpu_pinning import pin_cpus  # noqa: E402  (scripts/ is on sys.path; stdlib only: the TRL side imports it)


# ------------------------------------------------------------------------------------------------
# the TRL side (runs in the peer venv: no jax, no vlm_jax)
# ------------------------------------------------------------------------------------------------


def peer_main(args) -> int:
    """Builds a GRPOTrainer and runs `--warmup + --iters` steps, each one released by a line on
    stdin and reported as one `PEER {json}` line on stdout."""
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import (AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, TrainerCallback)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    path = args.peer
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor.from_pretrained(path),
        tokenizer=AutoTokenizer.from_pretrained(path),
        video_processor=Qwen2VLVideoProcessor(),
    )
    processor.chat_template = processor.tokenizer.chat_template
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    stops = [int(i) for i in args.stop_ids.split(",")] if args.stop_ids else None
    if stops:  # variable lengths: GRPOTrainer stops (and masks) at the model's end tokens
        model.generation_config.eos_token_id = stops
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
             "image": Image.fromarray(px)} for q, px in prompts(args.prompts)]
    steps = args.warmup + args.iters

    def trl_reward(prompts, completions, **kwargs):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return reward(texts)

    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_grpo_trl_"), use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=args.prompts * args.num_samples, gradient_accumulation_steps=1,
        steps_per_generation=1, num_generations=args.num_samples, num_iterations=1,
        max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs=None if stops else {"min_new_tokens": args.new_tokens},
        beta=KL_COEF, epsilon=CLIP, loss_type="bnpo", scale_rewards="group",
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", max_steps=steps, shuffle_dataset=False,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, log_completions=False,
    )
    times: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times[name] = times.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    class Gate(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if sys.stdin.readline().strip() != "step":
                raise SystemExit("bench_grpo peer: parent went away")
            times.clear()
            times["_start"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            total = time.perf_counter() - times.pop("_start")
            gen, rew, both = times.get("generate", 0.0), times.get("rewards", 0.0), times.get("gen_score", 0.0)
            report = dict(total=total, rollout=gen, rewards=rew, scoring=both - gen - rew, update=total - both,
                          work=dict(shapes))
            print("PEER " + json.dumps(report), flush=True)

    trainer = GRPOTrainer(model=model, reward_funcs=[trl_reward], args=cfg,
                          train_dataset=Dataset.from_list(rows), processing_class=processor, callbacks=[Gate()])
    trainer._generate = timed("generate", trainer._generate)
    trainer._calculate_rewards = timed("rewards", trainer._calculate_rewards)
    shapes: dict[str, float] = {}
    gen_score = timed("gen_score", trainer._generate_and_score_completions)

    def gen_score_shapes(*a, **k):  # the padded arrays the scoring and the update run on
        out = gen_score(*a, **k)
        pm, cm = out["prompt_mask"], out["completion_mask"]
        resp_real, rows, T = int(cm.sum()), cm.shape[0], cm.shape[1]
        frac = fractions(int(pm.sum()), pm.numel(), resp_real, cm.numel())
        shapes.update(response_length=resp_real / rows, decode_util=resp_real / (rows * T),
                      update=frac, scoring=frac)
        return out

    trainer._generate_and_score_completions = gen_score_shapes
    print("PEER " + json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
                                "trl": __import__("trl").__version__,
                                "transformers": __import__("transformers").__version__}), flush=True)
    trainer.train()
    return 0


class Peer:
    """The TRL side as a child process in the peer venv, one step per `step()` call."""

    def __init__(self, python: Path, model_dir: Path, args, log: Path):
        cmd = [str(python), str(Path(__file__).resolve()), "--peer", str(model_dir),
               "--prompts", str(args.prompts), "--num_samples", str(args.num_samples),
               "--new_tokens", str(args.new_tokens), "--iters", str(args.iters), "--warmup", "1",
               "--torch_threads", str(args.torch_threads), "--stop_ids", args.stop_ids or ""]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": "", "OMP_NUM_THREADS": str(args.torch_threads)}
        self.log = log
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(log, "w"), text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("PEER "):
                return json.loads(line[5:])
        raise RuntimeError(f"the TRL side stopped (exit {self.proc.wait()}); its log: {self.log}:\n"
                           + self.log.read_text()[-4000:])

    def step(self) -> dict:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def ensure_peer_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if python.exists():
        return python
    print(f"creating the TRL venv {venv}: pip install {' '.join(PEER_PACKAGES)} (~90 s, 5.5 GB)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *PEER_PACKAGES], check=True)
    return python


# ------------------------------------------------------------------------------------------------
# the vlm_jax side
# ------------------------------------------------------------------------------------------------


class VlmJax:
    """One GRPO iteration as `curriculum.train_step` runs it, with the split timed."""

    current = None  # the instance whose step runs (the timed wrappers below are installed once)

    def __init__(self, model_dir: Path, args, share_prompt: bool, stops=(), refill_slots: int | None = None,
                 rollout_chunk: int = 0, length_groups: int | None = None):
        import jax
        import numpy as np
        from PIL import Image

        from vlm_jax import config as config_lib
        from vlm_jax import models, sharding
        from vlm_jax.data.processor import Processor
        from vlm_jax.rl import policy, rollout
        from vlm_jax.train_state import init_state, make_optimizer

        self.jax, self.np, self.policy, self.rollout_lib = jax, np, policy, rollout
        self.mesh = sharding.make_mesh() if args.devices > 1 else None
        self.model, params = models.from_pretrained(model_dir, mesh=self.mesh)
        self.proc = Processor.from_pretrained(model_dir)
        texts, images = [], []
        for q, px in prompts(args.prompts):
            images.append([Image.fromarray(px)])
            texts.append(self.proc.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]))
        self.batch = {**self.proc(texts, images, padding_side="left"), "answer": [""] * args.prompts}
        self.cfg = config_lib.GRPOConfig(
            num_samples=args.num_samples, max_new_tokens=args.new_tokens, temperature=1.0, kl_coef=KL_COEF,
            kl_estimator="k3", clip_low=CLIP, clip_high=CLIP, clip_c=None, loss_agg="token_mean",
            share_prompt=share_prompt,
            length_groups=args.length_groups if length_groups is None else length_groups,
            refill_slots=args.refill_slots if refill_slots is None else refill_slots,
            rollout_chunk=rollout_chunk)
        self.optimizer = make_optimizer(
            config_lib.OptimizerConfig(lr=LR, weight_decay=0.0, max_grad_norm=1.0), 1000,
            ("vision", "merger", "language_model"))
        self.loss_cfg = self.policy_loss_config()
        self.ref = params
        self.state = init_state(jax.tree.map(lambda a: a.copy(), params), self.optimizer)
        self.args = args
        from vlm_jax.rl import sampler

        self.prompt_buckets = sampler.PROMPT_BUCKETS  # collect_rollout's default
        self.stops = tuple(stops)
        self.step_index = 0
        self.times: dict[str, float] = {}

        def reward_fn(texts, answers, **fields):
            start = time.perf_counter()
            r = np.asarray(reward(texts), np.float32)
            self.times["rewards"] = self.times.get("rewards", 0.0) + time.perf_counter() - start
            return r, {"bench": r}

        self.reward_fn = reward_fn
        if getattr(rollout, "_bench_timed", False):
            return
        # timed wrappers of the functions collect_rollout looks up at call time
        generate_and_grade, score_responses = rollout.generate_and_grade, rollout.score_responses

        def gen(*a, **k):
            start = time.perf_counter()
            out = generate_and_grade(*a, **k)
            VlmJax.current.times["gen_and_rewards"] = time.perf_counter() - start
            return out

        def score(*a, **k):
            start = time.perf_counter()
            out = jax.block_until_ready(score_responses(*a, **k))
            VlmJax.current.times["score"] = time.perf_counter() - start
            return out

        rollout.generate_and_grade, rollout.score_responses = gen, score
        rollout._bench_timed = True

    def policy_loss_config(self):
        from vlm_jax.rl import grpo

        c = self.cfg
        return grpo.GRPOLossConfig(clip_low=c.clip_low, clip_high=c.clip_high, clip_c=c.clip_c,
                                   ratio_level=c.ratio_level, kl_coef=c.kl_coef, kl_estimator=c.kl_estimator,
                                   loss_agg=c.loss_agg, norm_length=c.max_new_tokens)

    def step(self) -> dict:
        jax, np = self.jax, self.np
        from vlm_jax import sharding

        VlmJax.current = self
        self.times.clear()
        rng = jax.random.fold_in(jax.random.key(0), self.step_index)
        self.step_index += 1
        roll_rng, upd_rng = jax.random.split(rng)
        start = time.perf_counter()
        rbatch, graded, host = self.rollout_lib.collect_rollout(
            self.model, self.state.params, self.ref, iter([self.batch]), cfg=self.cfg,
            tokenizer=self.proc.tokenizer, reward_fn=self.reward_fn, rng=roll_rng,
            tokens=self.rollout_lib.SpecialTokens(self.stops, self.proc.pad_token_id, self.proc.image_token_id),
            batch_size=self.args.prompts)
        jax.block_until_ready(rbatch)
        collected = time.perf_counter()
        if self.cfg.length_groups:
            from vlm_jax.rl import grouped

            self.state, m = grouped.grpo_step_grouped(
                self.state, rbatch, upd_rng, graphdef=self.model.graphdef, optimizer=self.optimizer,
                group_size=self.cfg.num_samples, loss_cfg=self.loss_cfg, groups=self.cfg.length_groups,
                prompt_buckets=self.prompt_buckets, mu=1, minibatch=0, mesh=self.mesh,
                share_prompt=self.cfg.share_prompt)
        else:
            self.state, m = self.policy.grpo_step(
                self.state, rbatch, upd_rng, graphdef=self.model.graphdef, optimizer=self.optimizer,
                group_size=self.cfg.num_samples, loss_cfg=self.loss_cfg, mu=1, minibatch=0, micro_batch=0,
                mesh=self.mesh, share_prompt=self.cfg.share_prompt)
        metrics = {k: float(v) for k, v in sharding.to_host(m).items()}
        end = time.perf_counter()
        if not np.isfinite(metrics["loss"]):
            raise RuntimeError(f"vlm_jax: non-finite loss {metrics}")
        rew = self.times.get("rewards", 0.0)
        gen = self.times["gen_and_rewards"]
        return dict(total=end - start, rollout=gen - rew, rewards=rew,
                    scoring=collected - start - gen, update=end - collected,
                    work=self.work(rbatch, graded, host))

    def work(self, rbatch, graded, host: dict) -> dict:
        """Real-token fractions of the positions the scoring and the update compute, and the
        rollout's decode slot utilisation (its metric `rollout/decode_slot_util`)."""
        np = self.np
        from vlm_jax import sharding
        from vlm_jax.rl import policy

        lengths = np.asarray(graded.rollout.lengths)
        G = self.cfg.num_samples
        out = dict(response_length=float(lengths.mean()), decode_util=float(host["rollout/decode_slot_util"]))
        prompt_mask = np.asarray(sharding.to_host(rbatch.prompt.attention_mask_BL))
        N, T = rbatch.responses_NT.shape
        B, L = prompt_mask.shape
        share, groups = self.cfg.share_prompt, self.cfg.length_groups
        if groups:  # the length groups the scoring (same group size here) and the update run
            from vlm_jax.rl import grouped

            w = grouped.work(grouped.mask_lengths(rbatch.mask_NT), prompt_mask.sum(-1), groups, group_size=G,
                             cap=T, L=L, prompt_buckets=self.prompt_buckets, share=share)
            frac = fractions(w["prompt_real"], w["prompt_positions"], int(lengths.sum()), w["response_positions"])
        else:  # one micro-batch / scoring chunk of all rows, every response at T, every prompt at L
            prompt_rows = B if share else N
            prompt_real = int(prompt_mask.sum()) * (prompt_rows // B)
            frac = fractions(prompt_real, prompt_rows * L, int(lengths.sum()), N * T)
        out.update(update=frac, scoring=frac)
        del policy
        return out


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=32, help="the completion length cap")
    parser.add_argument("--lengths", default="variable,fixed",
                        help="length settings to run, comma separated, the first is the figure: variable "
                             "(end tokens, a spread of lengths) and/or fixed (every completion --new_tokens)")
    parser.add_argument("--truncated", type=float, default=0.2,
                        help="variable: the share of completions meant to reach the cap")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per side after the first")
    parser.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--spec", choices=sorted(SPECS), default="grpo", help="model size")
    parser.add_argument("--cpus", type=int, default=None,
                        help="pin both sides to this many cores (default: all this process may use)")
    parser.add_argument("--torch_threads", type=int, default=None, help="default: the pinned cores")
    parser.add_argument("--devices", type=int, default=1,
                        help="JAX CPU devices for vlm_jax (default 1: its matmuls use all pinned cores; "
                             "> 1: a data mesh)")
    parser.add_argument("--peer_venv", type=Path, default=ROOT / ".venv-peer")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--pause", type=float, default=1.0,
                        help="seconds of idleness between the two sides' steps (0: back to back)")
    parser.add_argument("--share_prompt", action=argparse.BooleanOptionalAction, default=None,
                        help="vlm_jax's grpo.share_prompt (default: the config default)")
    parser.add_argument("--share_prompt_ab", action="store_true",
                        help="no TRL side: vlm_jax with grpo.share_prompt off against on, alternating")
    parser.add_argument("--length_groups", default="0",
                        help="vlm_jax's grpo.length_groups (0, the trainer's default: every completion padded "
                             "to --new_tokens); one value, or one per --lengths setting, comma separated")
    parser.add_argument("--refill_slots", default="0",
                        help="vlm_jax's grpo.refill_slots (0, the default: every completion a decode slot); "
                             "one value, or one per --lengths setting, comma separated")
    parser.add_argument("--refill_ab", action="store_true",
                        help="no TRL side: vlm_jax without refilled slots against --refill_slots, "
                             "alternating")
    parser.add_argument("--no_peer", action="store_true",
                        help="vlm_jax only (no TRL venv): its times and its work figures per setting")
    parser.add_argument("--peer", default=None, help=argparse.SUPPRESS)  # internal: run the TRL side
    parser.add_argument("--stop_ids", default="", help=argparse.SUPPRESS)  # internal: the peer's end tokens
    args = parser.parse_args(argv)
    settings = [x.strip() for x in args.lengths.split(",") if x.strip()]
    per_setting = {}
    for name in ("length_groups", "refill_slots"):
        try:
            values = [int(x) for x in getattr(args, name).split(",")]
        except ValueError:
            parser.error(f"--{name} takes integers, comma separated (got {getattr(args, name)!r})")
        if len(values) not in (1, len(settings)) or min(values) < 0:
            parser.error(f"--{name} takes one value >= 0 or one per --lengths setting "
                         f"(got {getattr(args, name)!r})")
        per_setting[name] = dict(zip(settings, values * len(settings) if len(values) == 1 else values))
        setattr(args, name, values[0])  # the first setting's: the A/B modes and the shared set-up
    if args.devices < 1 or args.pause < 0:
        parser.error(f"--devices must be >= 1 and --pause >= 0 (got {args.devices}, {args.pause})")
    if args.refill_ab and not args.refill_slots:
        parser.error(f"--refill_slots must be > 0 with --refill_ab (got {args.refill_slots})")
    if not settings or set(settings) - {"variable", "fixed"} or not 0 < args.truncated < 1:
        parser.error(f"--lengths takes variable and/or fixed, --truncated is in (0, 1) "
                     f"(got {args.lengths!r}, {args.truncated})")
    cpus = pin_cpus(args.cpus)
    if args.torch_threads is None:
        args.torch_threads = len(cpus)
    if args.peer:
        return peer_main(args)

    sys.path.insert(0, str(ROOT))
    vlm_jax_only = args.share_prompt_ab or args.refill_ab or args.no_peer
    python = None if vlm_jax_only else ensure_peer_venv(args.peer_venv)
    import jax

    from vlm_jax.config import GRPOConfig

    if args.share_prompt is None:
        args.share_prompt = GRPOConfig.share_prompt

    if args.devices > 1:
        jax.config.update("jax_num_cpu_devices", args.devices)
    from vlm_jax.models.tiny import TinySpec, build_tiny_model

    spec = TinySpec(**SPECS[args.spec])
    parts = PARTS
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", spec=spec, seed=0)
        n_params = None
        ours = VlmJax(model_dir, args, args.share_prompt)
        n_params = sum(x.size for x in jax.tree.leaves(ours.ref))
        if args.share_prompt_ab:
            return share_prompt_ab(VlmJax(model_dir, args, False), VlmJax(model_dir, args, True), args,
                                   n_params, cpus, argv)
        tok = ours.proc.tokenizer
        end_ids = json.loads((model_dir / "generation_config.json").read_text()).get("eos_token_id", [])
        end_ids = [end_ids] if isinstance(end_ids, int) else list(end_ids)
        ordinary = min(i for i in tok.all_special_ids) if tok.all_special_ids else len(tok)
        setting_stops = {
            setting: (stop_ids(SPECS[args.spec].get("vocab_size", spec.vocab_size), ordinary,
                               [*end_ids, tok.eos_token_id], args.new_tokens, args.truncated)
                      if setting == "variable" else [])
            for setting in settings}
        if args.refill_ab:
            stops = setting_stops[settings[0]]
            sides = {"plain": VlmJax(model_dir, args, args.share_prompt, stops, refill_slots=0)}
            chunk, rest = divmod(args.refill_slots, args.num_samples)
            if not rest and 0 < chunk < args.prompts:
                sides["chunked"] = VlmJax(model_dir, args, args.share_prompt, stops, refill_slots=0,
                                          rollout_chunk=chunk)
            sides["refill"] = VlmJax(model_dir, args, args.share_prompt, stops)
            return refill_ab(sides, args, settings[0], n_params, cpus, argv)
        peer_info: dict = {}
        for setting in settings:
            stops = setting_stops[setting]
            args.stop_ids = ",".join(map(str, stops))
            side = VlmJax(model_dir, args, args.share_prompt, stops,
                          refill_slots=per_setting["refill_slots"][setting],
                          length_groups=per_setting["length_groups"][setting])
            runs: dict[str, list[dict]] = {"vlm_jax": []} if args.no_peer else {"vlm_jax": [], "trl": []}
            peer = None if args.no_peer else Peer(python, model_dir, args, Path(tmp) / f"peer_{setting}.log")
            try:
                for _ in range(1 + args.iters):  # alternate: both sides see the same background load
                    if peer is not None:
                        runs["trl"].append(peer.step())
                        time.sleep(args.pause)
                    runs["vlm_jax"].append(side.step())
                    time.sleep(args.pause)
            finally:
                if peer is not None:
                    peer.close()
                    peer_info = {k: v for k, v in peer.info.items() if k != "ready"}
            results[setting] = dict(runs=runs, stops=len(stops), load_average=os.getloadavg())

    cmd = f"python {' '.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}"
    config = dict(spec=args.spec, tiny_spec=SPECS[args.spec], params=int(n_params), prompts=args.prompts,
                  num_samples=args.num_samples, new_tokens=args.new_tokens, images_per_prompt=1,
                  kl_coef=KL_COEF, lr=LR, optimizer="adamw, clip 1.0", updates_per_iter=1, dtype="float32",
                  iters=args.iters, vlm_jax_devices=args.devices, torch_threads=args.torch_threads,
                  share_prompt=args.share_prompt, lengths=settings, truncated=args.truncated,
                  length_groups=per_setting["length_groups"], refill_slots=per_setting["refill_slots"])
    print(f"command: {cmd}")
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"os.cpu_count()={os.cpu_count()}, pinned to cores {cpus}; jax {jax.__version__}"
          + (f"; peer torch {peer_info['torch']} ({peer_info['threads']} threads), transformers "
             f"{peer_info['transformers']}, trl {peer_info['trl']}" if peer_info else ""))
    print(f"model: --spec {args.spec} ({n_params / 1e6:.1f}M parameters): {SPECS[args.spec]}")
    print(f"iteration: {args.prompts} prompts (1 image each) x {args.num_samples} samples x at most "
          f"{args.new_tokens} new tokens, reward on host, reference log-probs (KL {KL_COEF}), "
          f"1 AdamW update over {args.prompts * args.num_samples} completions, fp32; vlm_jax "
          f"grpo.share_prompt={args.share_prompt}, grpo.length_groups / grpo.refill_slots per setting "
          + ", ".join(f"{s} {per_setting['length_groups'][s]} / {per_setting['refill_slots'][s]}"
                      for s in settings))
    out: dict = dict(command=cmd, cores=cpus, config=config, peer=peer_info, settings={})
    for setting, res in results.items():
        runs = res["runs"]
        med = {side: {k: statistics.median(r[k] for r in rs[1:]) for k in ("total", *parts)}
               for side, rs in runs.items()}
        work = {side: {k: statistics.median(_flat(r["work"])[k] for r in rs[1:]) for k in _flat(rs[1]["work"])}
                for side, rs in runs.items()}
        print()
        label = (f"variable lengths ({res['stops']} end-token ids, ~{args.truncated:.0%} meant to reach the cap)"
                 if setting == "variable" else f"fixed lengths (every completion {args.new_tokens} tokens)")
        print(f"{label}; load average {tuple(round(x, 2) for x in res['load_average'])}")
        print_split(runs, med, parts, label=setting[:9])
        print(f"{'work':<10}{'mean len':>10}{'decode util':>13}{'update real':>13}{'(responses)':>13}"
              f"{'score real':>12}")
        for side, w in work.items():
            print(f"{side:<10}{w['response_length']:>10.1f}{w['decode_util']:>13.1%}{w['update.real_frac']:>13.1%}"
                  f"{w['update.response_real_frac']:>13.1%}{w['scoring.real_frac']:>12.1%}")
        entry = dict(vlm_jax_s_per_iter=med["vlm_jax"]["total"], split={s: {k: med[s][k] for k in parts} for s in med},
                     first_iter_s={s: runs[s][0]["total"] for s in runs}, work=work,
                     load_average=res["load_average"], stop_ids=res["stops"],
                     length_groups=per_setting["length_groups"][setting],
                     refill_slots=per_setting["refill_slots"][setting])
        if "trl" in runs:
            ratio = med["trl"]["total"] / med["vlm_jax"]["total"]
            # each TRL step is followed by a vlm_jax step: the ratio per pair sees (nearly) the same load
            pair_ratios = [t["total"] / v["total"] for t, v in zip(runs["trl"][1:], runs["vlm_jax"][1:])]
            print(f"speed-up (TRL s/iter / vlm_jax s/iter, medians): {ratio:.2f}x; per part: "
                  + ", ".join(f"{k} {med['trl'][k] / med['vlm_jax'][k]:.1f}x" for k in parts if med["vlm_jax"][k] > 0))
            print(f"speed-up per alternating pair: {', '.join(f'{r:.2f}x' for r in pair_ratios)} "
                  f"(median {statistics.median(pair_ratios):.2f}x)")
            entry.update(peer_s_per_iter=med["trl"]["total"], ratio=ratio, pair_ratios=pair_ratios)
        out["settings"][setting] = entry
    if args.json:
        first = out["settings"][settings[0]]  # the figure, also at the top level as before
        out.update({k: first[k] for k in ("vlm_jax_s_per_iter", "peer_s_per_iter", "ratio", "pair_ratios", "split",
                                          "first_iter_s", "load_average") if k in first})
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _flat(work: dict) -> dict:
    """{'update': {'real_frac': x}} -> {'update.real_frac': x}."""
    out = {}
    for k, v in work.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def print_split(runs: dict[str, list[dict]], med: dict[str, dict], parts, label: str = "") -> None:
    """One row per side: first-iteration seconds, median s/iter and per part, the later iterations."""
    print(f"{label:<10}{'first s':>10}{'s/iter':>10}" + "".join(f"{k:>10}" for k in parts)
          + "   later iterations s")
    for side, rs in runs.items():
        m = med[side]
        print(f"{side:<10}{rs[0]['total']:>10.2f}{m['total']:>10.3f}"
              + "".join(f"{m[k]:>10.3f}" for k in parts) + "   " + ", ".join(f"{r['total']:.3f}" for r in rs[1:]))


def alternate(sides: dict, iters: int, pause: float = 0.0) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Each of `sides` (name -> VlmJax) steps 1 + `iters` times, side after side, `pause` s after
    each step: (each side's step records, each side's medians of the total and `PARTS` over all
    but the first, compiling, iteration)."""
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for _ in range(1 + iters):
        for name, side in sides.items():
            runs[name].append(side.step())
            time.sleep(pause)
    med = {side: {k: statistics.median(r[k] for r in rs[1:]) for k in ("total", *PARTS)}
           for side, rs in runs.items()}
    return runs, med


def share_prompt_ab(off, on, args, n_params, cpus, argv) -> int:
    """vlm_jax with `grpo.share_prompt` off against on, alternating; prints the split and ratios."""
    import jax

    runs, med = alternate({"off": off, "on": on}, args.iters)
    parts = PARTS
    pairs = [a["total"] / b["total"] for a, b in zip(runs["off"][1:], runs["on"][1:])]
    print(f"command: python {' '.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}")
    print(f"machine: {platform.platform()}, os.cpu_count()={os.cpu_count()}, pinned to cores {cpus}; "
          f"jax {jax.__version__}; load average {os.getloadavg()}")
    print(f"model: --spec {args.spec} ({n_params / 1e6:.1f}M parameters); {args.prompts} prompts x "
          f"{args.num_samples} samples x {args.new_tokens} new tokens; vlm_jax only, grpo.share_prompt off vs on")
    print()
    print_split(runs, med, parts, label="share")
    print(f"speed-up (off / on, medians): {med['off']['total'] / med['on']['total']:.2f}x; per part: "
          + ", ".join(f"{k} {med['off'][k] / med['on'][k]:.2f}x" for k in parts if med["on"][k] > 0))
    print(f"per alternating pair: {', '.join(f'{r:.2f}x' for r in pairs)}")
    if args.json:
        args.json.write_text(json.dumps(dict(
            split={s: med[s] for s in med}, pair_ratios=pairs, load_average=os.getloadavg(), cores=cpus,
            first_iter_s={s: runs[s][0]["total"] for s in runs}), indent=2) + "\n")
    return 0


def refill_ab(sides: dict, args, setting: str, n_params, cpus, argv) -> int:
    """vlm_jax without refilled decode slots (`plain`, and `chunked` where given) against
    `--refill_slots` slots (`refill`), alternating; prints the split, each side's decode slot
    utilisation and the ratios against `plain`, and writes them to `--json`."""
    import jax

    runs, med = alternate(sides, args.iters, args.pause)
    parts = PARTS
    util = {side: [r["work"]["decode_util"] for r in rs] for side, rs in runs.items()}
    lengths = {side: [r["work"]["response_length"] for r in rs] for side, rs in runs.items()}
    cmd = f"python {' '.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}"
    print(f"command: {cmd}")
    print(f"machine: {platform.platform()}, os.cpu_count()={os.cpu_count()}, pinned to cores {cpus}; "
          f"jax {jax.__version__}; load average {os.getloadavg()}")
    print(f"model: --spec {args.spec} ({n_params / 1e6:.1f}M parameters); {args.prompts} prompts x "
          f"{args.num_samples} samples x at most {args.new_tokens} new tokens, {setting} lengths; "
          f"vlm_jax only, grpo.refill_slots 0 (every completion a slot"
          f"{', and rollout_chunk' if 'chunked' in sides else ''}) vs {args.refill_slots}")
    print()
    print_split(runs, med, parts, label="refill")
    for side in runs:
        print(f"{side:<10}decode slot utilisation per iteration: "
              f"{', '.join(f'{u:.1%}' for u in util[side])}; "
              f"mean response length: {', '.join(f'{n:.1f}' for n in lengths[side])}")
    ratio = statistics.median(util["refill"]) / statistics.median(util["plain"])
    print("decode slot utilisation (median): "
          + ", ".join(f"{s} {statistics.median(u):.1%}" for s, u in util.items())
          + f" (refill / plain {ratio:.2f}x); rollout s per side (medians): "
          + ", ".join(f"{s} {med[s]['rollout']:.3f}" for s in med))
    if args.json:
        args.json.write_text(json.dumps(dict(
            command=cmd, cores=cpus, setting=setting, refill_slots=args.refill_slots,
            rows_per_call=args.prompts * args.num_samples, decode_util=util,
            decode_util_median={s: statistics.median(u) for s, u in util.items()}, decode_util_ratio=ratio,
            response_length=lengths, split={s: med[s] for s in med},
            first_iter_s={s: runs[s][0]["total"] for s in runs}, load_average=os.getloadavg()),
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    if "--peer" not in sys.argv:  # pin before JAX or torch start their thread pools
        _early = argparse.ArgumentParser(add_help=False)
        _early.add_argument("--cpus", type=int, default=None)
        pin_cpus(_early.parse_known_args()[0].cpus)
    sys.exit(main())

"""Configs of the grid-world experiment (`vlm_jax.data.synthetic.grid`): the demo's staged run and
the arms `scripts/reproduce_paper.py` compares, all from one place so every arm shares the same
base, data, evaluation items and step budget.

Two forms of a staged run:
- ``project``: perception by GRPO, textual and visual reasoning by cross-entropy on reference
  solutions (the shape this project was asked for; the demo);
- ``paper``: every stage by GRPO (the paper's recipe).

Every stage ends with an evaluation of all three capabilities' 512 validation items (greedy), and
the first stage also starts with one, so a run's evaluations form a matrix capability x after-stage.
"""
from __future__ import annotations

import dataclasses

from vlm_jax.config import (CheckpointConfig, Config, DataConfig, DatasetSpec, EvalConfig, GRPOConfig,
                            LoggingConfig, MeshConfig, ModelConfig, OptimizerConfig, SFTConfig,
                            StageConfig)
from vlm_jax.config.recipes import merged_baseline
from vlm_jax.data.synthetic.grid import DATASETS, LENGTH_BUCKETS, MAX_NEW_TOKENS, MAX_PROMPT_LEN

CAPABILITIES = ("perception", "textual_reasoning", "visual_reasoning")
SHORT = {"perception": "P", "textual_reasoning": "T", "visual_reasoning": "V"}
BATCH = 32  # prompts per step, every stage (the merged baseline needs one batch size)
EVAL_ITEMS = 512


@dataclasses.dataclass(frozen=True)
class Budget:
    """Steps and learning rates per stage; `scale` multiplies every stage's steps (the experiment's
    --quick variant). Chosen by pilots from the demo's base so that each stage learns its own
    capability (docs/experiment.md): GRPO perception learns with 32 prompts x 8 samples per step
    (not with 8 x 4): +3 to +8 points in 40 steps, more than 3 standard errors in 8 of 10 seeds; +8
    to +9 in 60 steps, in every seed (its reward still rises at step 40); textual counting by cross-entropy starts to be
    learned after ~150 steps of 32 (not at all in 160 steps of 16 at 3e-3); the visual stage needs
    ~350 to relearn reading after the textual stage and count."""

    sft_steps: tuple[int, int, int] = (40, 300, 350)  # perception, textual, visual: a stage by SFT
    grpo_steps: tuple[int, int, int] = (60, 40, 40)  # the same stages by GRPO
    grpo_lr: float = 2e-4
    sft_lr: float = 1e-3
    num_samples: int = 8
    temperature: float = 0.7  # rollouts; at 1.0 the tiny model's sampled answers are far worse than its greedy ones
    warmup_steps: int = 10
    kl_coef: float = 1e-2
    scale: float = 1.0

    def steps_of(self, capability: str, objective: str) -> int:
        steps = self.grpo_steps if objective == "grpo" else self.sft_steps
        return max(1, round(steps[CAPABILITIES.index(capability)] * self.scale))


def eval_config(at_start: bool, max_examples: int = EVAL_ITEMS) -> EvalConfig:
    """All three capabilities' validation sets, greedy, the stage's generation cap."""
    return EvalConfig(datasets=tuple(DatasetSpec(name=DATASETS[c], split="validation") for c in CAPABILITIES),
                      every=0, at_start=at_start, max_examples=max_examples, max_new_tokens=MAX_NEW_TOKENS,
                      batch_size=128)


def stage(capability: str, objective: str, budget: Budget, *, first: bool, sft_target: str = "solution",
          data_order: str = "shuffle", name: str | None = None) -> StageConfig:
    """One stage on one capability's grid data, in ``data_order`` (``StageConfig.order``; easy to
    hard by question kind: count, either, not)."""
    steps = budget.steps_of(capability, objective)
    grpo = objective == "grpo"
    lr = budget.grpo_lr if grpo else budget.sft_lr
    return StageConfig(
        name=name or capability,
        capability=capability,
        objective=objective,
        datasets=(DatasetSpec(name=DATASETS[capability]),),
        steps=steps,
        batch_size=BATCH,
        order=data_order,
        order_key="difficulty",
        optimizer=OptimizerConfig(lr=lr, weight_decay=0.0, warmup_steps=budget.warmup_steps, schedule="cosine"),
        # the vision tower is frozen while the data has no images (the paper's stage 2)
        trainable=("language_model",) if capability == "textual_reasoning" else ("vision", "merger", "language_model"),
        grpo=GRPOConfig(num_samples=budget.num_samples, max_new_tokens=MAX_NEW_TOKENS, kl_coef=budget.kl_coef,
                        temperature=budget.temperature),
        sft=SFTConfig(target=sft_target, normalize="token"),
        eval=eval_config(at_start=first),
    )


def base_config(stages: tuple[StageConfig, ...], seed: int = 0) -> Config:
    return Config(
        model=ModelConfig(path="artifacts/tiny_base", dtype="float32"),
        mesh=MeshConfig(data=-1, fsdp=1, tensor=1),
        data=DataConfig(max_prompt_len=MAX_PROMPT_LEN,  # data_dir: the default data directory (vlm_jax.paths)
                        length_buckets=LENGTH_BUCKETS, min_pixels_per_image=28 * 28 * 4,
                        max_pixels_per_image=112 * 112),
        stages=stages,
        seed=seed,
        checkpoint=CheckpointConfig(every=0, keep=1),
        logging=LoggingConfig(every=1),
    )


def staged(*, form: str = "project", order: tuple[str, ...] = CAPABILITIES, perception: str = "grpo",
           data_order: str = "shuffle", budget: Budget = Budget(), seed: int = 0) -> Config:
    """A staged run. ``form``: "project" (GRPO perception, SFT reasoning) or "paper" (GRPO
    everywhere); ``perception``: "grpo", "caption_sft" (the grid described as text: "Cells: red
    ...") or "answer_sft" (the reference response); ``order``: the capabilities in stage order;
    ``data_order``: every stage's data order (``StageConfig.order``, which checks it)."""
    if form not in ("project", "paper"):
        raise ValueError(f"form must be 'project' or 'paper', got {form!r}")
    if perception not in ("grpo", "caption_sft", "answer_sft"):
        raise ValueError(f"perception must be grpo, caption_sft or answer_sft, got {perception!r}")
    if sorted(order) != sorted(CAPABILITIES):
        raise ValueError(f"order must be a permutation of {CAPABILITIES}, got {order!r}")
    stages = []
    for k, capability in enumerate(order):
        if capability == "perception":
            objective = "grpo" if perception == "grpo" else "sft"
            target = "caption" if perception == "caption_sft" else "solution"
        else:
            objective = "grpo" if form == "paper" else "sft"
            target = "solution"
        stages.append(stage(capability, objective, budget, first=k == 0, sft_target=target,
                            data_order=data_order))
    return base_config(tuple(stages), seed)


def merged(*, form: str = "paper", budget: Budget = Budget(), seed: int = 0) -> Config:
    """The paper's merged baseline: one stage over the same data mixture and total steps as the
    staged run, every module trained; evaluated at its start and end. ``form``: "paper" (one GRPO
    stage, against the paper-form staged run) or "sft" (one cross-entropy stage, against the
    staged run with every stage by cross-entropy, ``staged(perception="answer_sft")``)."""
    if form not in ("paper", "sft"):
        raise ValueError(f"form must be 'paper' or 'sft', got {form!r}")
    template = (staged(form="paper", budget=budget, seed=seed) if form == "paper"
                else staged(form="project", perception="answer_sft", budget=budget, seed=seed))
    cfg = merged_baseline(template)
    (st,) = cfg.stages
    return dataclasses.replace(cfg, stages=(dataclasses.replace(st, eval=eval_config(at_start=True)),))

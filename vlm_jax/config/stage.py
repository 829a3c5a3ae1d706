"""The stage part of the run configuration: a capability stage (`StageConfig`) and what it holds
(datasets, optimizer, the GRPO or cross-entropy objective, evaluation, LoRA), each field described
(`#:`) where it is declared. `vlm_jax.config.schema.Config` holds the ordered stages. Imports no JAX.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from vlm_jax.config.parse import _at_least, _Node, _require

MODULES: tuple[str, ...] = ("vision", "merger", "language_model")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_USER_REWARD = re.compile(r".+\.py:[A-Za-z_][A-Za-z0-9_]*")
_STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetSpec(_Node):
    """A dataset: a registered (TFDS) name or a path to a .jsonl/.json/.parquet file; mixing weight."""

    #: Registered (prepared / TFDS) dataset name, or a path to a .jsonl / .json / .parquet file.
    name: str
    #: Split to read.
    split: str = "train"
    #: Mixing weight among the stage's datasets (> 0).
    weight: float = 1.0

    def _check(self) -> None:
        _require(bool(self.name), "name", "must be non-empty")
        _require(bool(self.split), "split", "must be non-empty")
        _require(self.weight > 0, "weight", f"must be > 0, got {self.weight}")

    @property
    def is_file(self) -> bool:
        """True when `name` is a local data file rather than a registered dataset."""
        return self.name.endswith(_DATA_FILE_SUFFIXES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig(_Node):
    """Optimizer and schedule. `max_grad_norm=0` disables clipping; `lr_multipliers` scale the
    learning rate per module (keys among "vision", "merger", "language_model")."""

    #: Optimizer.
    name: Literal["adamw", "sgd", "adafactor"] = "adamw"
    #: Peak learning rate.
    lr: float = 1e-6
    #: Decoupled weight decay (adamw).
    weight_decay: float = 1e-2
    #: First-moment decay.
    b1: float = 0.9
    #: Second-moment decay.
    b2: float = 0.999
    #: Denominator epsilon.
    eps: float = 1e-8
    #: Learning-rate schedule after warm-up.
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    #: Linear warm-up steps.
    warmup_steps: int = 0
    #: Global gradient-norm clip (0 = off).
    max_grad_norm: float = 1.0
    #: Per-module learning-rate scale, pairs of (module, factor); modules vision, merger, language_model.
    lr_multipliers: tuple[tuple[str, float], ...] = ()

    def _check(self) -> None:
        _at_least(self, 0, "lr", "weight_decay", "max_grad_norm", "warmup_steps")
        for key in ("b1", "b2"):
            _require(0 <= getattr(self, key) < 1, key, f"must be in [0, 1), got {getattr(self, key)}")
        _require(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        names = [m for m, _ in self.lr_multipliers]
        for i, (module, mult) in enumerate(self.lr_multipliers):
            key = f"lr_multipliers.{i}.0"
            _require(module in MODULES, key, f"unknown module {module!r}; valid: {MODULES}")
            _require(names.count(module) == 1, key, f"module {module!r} given twice")
            _require(mult >= 0, f"lr_multipliers.{i}.1", f"must be >= 0, got {mult}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig(_Node):
    """Rollout sampling and the GRPO-family policy loss (formulas: docs/concepts/grpo.md).

    One rollout gives `mu * batch_size * num_samples / mini_batch_size` optimizer updates.
    `rollout_tensor` must divide the device count and the model's KV heads. `share_prompt` gains
    the most when a micro-batch holds whole groups (unshuffled, the default); with shuffled
    mini-batches (`mini_batch_size < batch_size * num_samples`) it gains little.
    """

    #: Group size G: completions sampled per prompt (>= 2 in a GRPO stage).
    num_samples: int = 5
    #: Rollout sampling temperature.
    temperature: float = 1.0
    #: Rollout nucleus-sampling threshold (1 = off).
    top_p: float = 1.0
    #: Rollout top-k (0 = off).
    top_k: int = 0
    #: Longest completion in tokens.
    max_new_tokens: int = 128
    #: Advantage estimator: grpo, dr_grpo (no std), rloo (leave-one-out), reinforce_pp (batch baseline).
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"] = "grpo"
    #: Divisor of the advantage: group std, batch std, or none.
    reward_scaling: Literal["group", "batch", "none"] = "group"
    #: PPO clip below: the ratio is clipped at 1 - clip_low.
    clip_low: float = 0.2
    #: PPO clip above: the ratio is clipped at 1 + clip_high.
    clip_high: float = 0.3
    #: Dual-clip constant for negative advantages (none = off; > 1).
    clip_c: float | None = 3.0
    #: Importance ratio per token (PPO) or per sequence (GSPO).
    ratio_level: Literal["token", "sequence"] = "token"
    #: Weight of the KL-to-reference loss term (0 = no reference kept in memory).
    kl_coef: float = 1e-2
    #: KL estimator: k1, k2 or k3 (low-variance, the paper's).
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    #: How per-token losses reduce to one number (token mean, mean of sequence means, Dr.GRPO's sum / length).
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    #: Passes over each rollout batch (updates per rollout = mu x completions / mini_batch_size).
    mu: int = 1
    #: Completions (prompts x G) per optimizer update (0 = the whole rollout batch).
    mini_batch_size: int = 0
    #: Drop completions that hit max_new_tokens without a stop token from the loss (DAPO).
    mask_truncated: bool = False
    #: Drop groups whose rewards are all equal and draw more prompts to refill the batch (DAPO).
    dynamic_sampling: bool = False
    #: Most extra draws dynamic sampling makes per step.
    max_extra_draws: int = 4
    #: Soft overlong penalty over the last that-many tokens of max_new_tokens (0 = off).
    overlong_buffer: int = 0
    #: Completions per reference-scoring call (0 = all at once).
    score_chunk: int = 0
    #: Prompts per sampler call; the KV cache is sized for them (0 = all at once).
    rollout_chunk: int = 0
    #: Decode slots of a refilling rollout (> 0): a completion that stops hands its slot to the next waiting
    #: one, so a sampler call decodes for about its total tokens / slots steps, not its longest completion
    #: (same completions; must split over the sampling mesh's data axis; 0 = off: every completion a slot).
    refill_slots: int = 0
    #: Keep the KL reference in host memory, moved to the chips only for scoring.
    offload_reference: bool = False
    #: Sample on a decoding mesh (data = devices / N, fsdp 1, tensor N) resharded once per rollout (0 = off).
    rollout_tensor: int = 0
    #: Run each distinct prompt once per micro-batch / scoring chunk (same values as full rows, less work).
    share_prompt: bool = True
    #: Length-grouped scoring and update (> 0): each mini-batch sorted by response length into that many
    #: micro-batches, each cut to its own length / prompt bucket (same values, work near the real tokens;
    #: replaces the stage's micro_batch_size); the scoring uses groups of the same size (0 = off).
    length_groups: int = 0

    def _check(self) -> None:
        _at_least(self, 1, "num_samples", "max_new_tokens", "mu")
        _at_least(self, 0, "temperature", "top_k", "clip_low", "clip_high", "kl_coef", "mini_batch_size",
                  "max_extra_draws", "overlong_buffer", "score_chunk", "rollout_chunk", "rollout_tensor",
                  "length_groups", "refill_slots")
        _require(0 <= self.top_p <= 1, "top_p", f"must be in [0, 1], got {self.top_p}")
        _require(self.clip_c is None or self.clip_c > 1, "clip_c",
                 f"dual-clip constant must be > 1 or none, got {self.clip_c}")
        _require(self.overlong_buffer < self.max_new_tokens, "overlong_buffer",
                 f"must be < max_new_tokens ({self.max_new_tokens}), got {self.overlong_buffer}")
        _require(self.advantage != "dr_grpo" or self.reward_scaling == "none", "reward_scaling",
                 f"advantage 'dr_grpo' means no std scaling: set reward_scaling='none' (got {self.reward_scaling!r})")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig(_Node):
    """Cross-entropy objective: which field is the target, how the loss is normalised, and whether
    the caption is fed as input (caption-SFT ablation)."""

    #: Row field the model learns to produce: solution, answer, or caption (the caption-SFT ablation).
    target: Literal["solution", "answer", "caption"] = "solution"
    #: Cross-entropy normalised per token (over the batch) or per sequence.
    normalize: Literal["token", "sequence"] = "token"
    #: Feed the row's caption in the prompt.
    caption_as_input: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig(_Node):
    """Evaluation sets and cadence (`every=0`: only at stage start and end); greedy decoding.
    `at_start=False` skips the stage-start evaluation (where the previous stage's end evaluated the
    same sets on the same weights, e.g. a matrix of every capability after every stage)."""

    #: Evaluation sets (greedy decoding; accuracy and mean response length in tokens).
    datasets: tuple[DatasetSpec, ...] = ()
    #: Evaluate every that-many steps (0 = only at the stage's start and end).
    every: int = 0
    #: Evaluate at the stage's start (False: the previous stage's end already evaluated these weights).
    at_start: bool = True
    #: Examples per evaluation set.
    max_examples: int = 64
    #: Longest evaluated answer in tokens.
    max_new_tokens: int = 128
    #: Prompts per evaluation batch.
    batch_size: int = 8
    #: Decode slots refilled as answers finish (`grpo.refill_slots`; 0 = every row to the batch's longest).
    refill_slots: int = 0

    def _check(self) -> None:
        _at_least(self, 0, "every", "refill_slots")
        _at_least(self, 1, "max_examples", "max_new_tokens", "batch_size")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig(_Node):
    """Low-rank adapters for a stage (`rank` 0 = off: the stage trains full weights).

    The stage starts fresh adapters (a Kaiming-uniform, b zero: the model starts as it was) on the linear
    layers `targets` selects: aliases "language" (q/k/v/o, gate/up/down of every decoder layer),
    "attention" (q/k/v/o only), "vision" (vision blocks' qkv/proj/MLP), "merger" (the patch merger
    and Qwen3-VL's DeepStack mergers), or full-match regexes over module paths such as
    `visual.blocks.3.attn.qkv`. The base (the weights at the stage's start) stays frozen, stored as
    `base_dtype` ("" = model.dtype); the adapters (fp32) and their optimizer moments are trained,
    scaled by alpha / rank; at the stage's end they are merged into the weights the next stage
    starts from. No dropout (the adapters are applied inside the linear layers)."""

    #: Adapter rank (0 = off: the stage trains full weights).
    rank: int = 0
    #: Adapter scale numerator (scale = alpha / rank).
    alpha: float = 16.0
    #: Adapted layers: aliases language, attention, vision, merger, or full-match regexes over module paths.
    targets: tuple[str, ...] = ("language",)
    #: Storage dtype of the frozen base ("" = model.dtype).
    base_dtype: Literal["", "float32", "bfloat16"] = ""

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def _check(self) -> None:
        _at_least(self, 0, "rank")
        _require(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        _require(not self.enabled or len(self.targets) > 0, "targets", "a LoRA stage needs targets")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageConfig(_Node):
    """One capability stage: its data, objective, steps, optimizer, trainable modules and reward.

    `reward` pairs a reward name (builtin, resolved lazily by `vlm_jax.rl.rewards.get`, or
    `path/to/file.py:function`) with its weight. `reset_optimizer=False` carries the optimizer
    state over from the previous stage.
    """

    #: Stage name (used in paths and metric keys).
    name: str
    #: Capability the stage trains (mixed = the merged baseline).
    capability: Literal["perception", "textual_reasoning", "visual_reasoning", "mixed"]
    #: grpo (RL on verifiable rewards) or sft (cross-entropy).
    objective: Literal["grpo", "sft"]
    #: Training datasets, mixed by their weights.
    datasets: tuple[DatasetSpec, ...]
    #: Optimizer steps (GRPO: rollout steps) in the stage.
    steps: int
    #: Rows per step (GRPO: prompts per rollout).
    batch_size: int
    #: Data order: seeded shuffle; easy_to_hard by order_key within each capability (every epoch);
    #: or paced, a competence curriculum: the first pace_share of the stage's rows are drawn from
    #: the easiest rows of each dataset, the pool growing from pace_start of them to all, then
    #: shuffled epochs (vlm_jax.data.pipeline).
    order: Literal["shuffle", "easy_to_hard", "paced"] = "shuffle"
    #: Row field easy_to_hard and paced sort by.
    order_key: Literal["pass_rate", "difficulty"] = "difficulty"
    #: paced: the share of the easiest rows the first draws come from.
    pace_start: float = 0.25
    #: paced: the share of the stage's rows (steps x batch_size) over which the pool grows to all rows.
    pace_share: float = 0.5
    #: Optimizer and schedule of the stage.
    optimizer: OptimizerConfig = OptimizerConfig()
    #: Start fresh optimizer state (False carries the previous stage's).
    reset_optimizer: bool = True
    #: Modules trained: vision, merger, language_model (the rest frozen).
    trainable: tuple[str, ...] = MODULES
    #: GRPO options (used when objective is grpo).
    grpo: GRPOConfig = GRPOConfig()
    #: SFT options (used when objective is sft).
    sft: SFTConfig = SFTConfig()
    #: Weighted rewards, pairs of (name, weight); a name is a builtin or path/to/file.py:function.
    reward: tuple[tuple[str, float], ...] = (("auto", 0.9), ("format", 0.1))
    #: Evaluation sets and cadence.
    eval: EvalConfig = EvalConfig()
    #: Rows (SFT) or completions (GRPO) per gradient-accumulation micro-batch (0 = none).
    micro_batch_size: int = 0
    #: Recompute policy for decoder layers and vision blocks in the backward pass.
    remat: Literal["none", "full", "save_dots"] = "none"
    #: Low-rank adapters for the stage (rank 0 = full weights).
    lora: LoraConfig = LoraConfig()

    def _check(self) -> None:
        who = f"stage {self.name!r}"
        _at_least(self, 0, "micro_batch_size", who=f"{who}: ")
        if self.micro_batch_size:
            if self.objective == "sft":
                _require(self.batch_size % self.micro_batch_size == 0, "micro_batch_size",
                         f"{who}: batch_size {self.batch_size} is not divisible by {self.micro_batch_size}")
            else:
                mb = self.grpo.mini_batch_size or self.batch_size * self.grpo.num_samples
                _require(mb % self.micro_batch_size == 0, "micro_batch_size",
                         f"{who}: the mini-batch of {mb} completions is not divisible by "
                         f"{self.micro_batch_size}")
        _require(bool(_STAGE_NAME.fullmatch(self.name)), "name",
                 f"must match {_STAGE_NAME.pattern} (used in paths and metrics), got {self.name!r}")
        _at_least(self, 1, "steps", "batch_size", who=f"{who}: ")
        _require(len(self.datasets) > 0, "datasets", f"{who}: needs at least one dataset")
        _require(0 < self.pace_start <= 1, "pace_start", f"{who}: must be in (0, 1], got {self.pace_start}")
        _require(0 < self.pace_share <= 1, "pace_share", f"{who}: must be in (0, 1], got {self.pace_share}")
        _require(len(self.trainable) > 0, "trainable", f"{who}: at least one module must be trainable")
        for i, module in enumerate(self.trainable):
            key = f"trainable.{i}"
            _require(module in MODULES, key, f"{who}: unknown module {module!r}; valid: {MODULES}")
            _require(self.trainable.count(module) == 1, key, f"{who}: module {module!r} given twice")
        _require(len(self.reward) > 0, "reward", f"{who}: needs at least one reward")
        names = [n for n, _ in self.reward]
        for i, (name, _) in enumerate(self.reward):
            _require(bool(_IDENTIFIER.fullmatch(name) or _USER_REWARD.fullmatch(name)), f"reward.{i}.0",
                     f"{who}: reward {name!r} is neither a builtin name nor 'path/to/file.py:function'")
            _require(names.count(name) == 1, f"reward.{i}.0", f"{who}: reward {name!r} given twice")
        if self.objective == "grpo":
            g = self.grpo
            _require(g.num_samples >= 2, "grpo.num_samples",
                     f"{who}: GRPO needs a group of >= 2 samples, got {g.num_samples}")
            total = self.batch_size * g.num_samples
            _require(g.mini_batch_size == 0 or total % g.mini_batch_size == 0, "grpo.mini_batch_size",
                     f"{who}: batch_size*num_samples = {total} is not divisible by {g.mini_batch_size}")

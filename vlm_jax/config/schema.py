"""The run configuration's schema: typed, frozen dataclasses, each field described (`#:`) where it
is declared, and the checks that span several objects (`validate`). The stages' part
(`StageConfig` and what it holds) is `vlm_jax.config.stage`.

Every default lives in the dataclasses below; nothing else in the code base supplies one. Each
dataclass checks and normalises its own fields in `__post_init__` (`vlm_jax.config.parse._Node`:
types and `Literal` choices generically from the annotations, ranges by hand in `_check`). Imports
no JAX.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Union

from vlm_jax.config.parse import ConfigError, _at_least, _Node, _require
from vlm_jax.config.stage import StageConfig

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# Logical parameter/activation axis name -> mesh axis (or axes, or None = replicated).
AxisRule = tuple[str, Union[str, tuple[str, ...], None]]
LOGICAL_AXIS_RULES: tuple[AxisRule, ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("vision_patch", None),
    ("merger_in", "fsdp"),
    ("length", None),
    ("kv_length", None),
)



@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig(_Node):
    """Device mesh sizes for the axes (data, fsdp, tensor); -1 takes the remaining devices."""

    #: Data-parallel axis size (batch rows split over it); -1 takes the devices the other axes leave.
    data: int = -1
    #: Fully-sharded axis size: parameters and optimizer state split over it, batch rows too.
    fsdp: int = 1
    #: Tensor-parallel axis size: heads, MLP and vocabulary split over it.
    tensor: int = 1

    def _check(self) -> None:
        sizes = dict(zip(MESH_AXES, self._sizes()))
        for axis, size in sizes.items():
            _require(size == -1 or size >= 1, axis, f"must be >= 1 or -1 (the rest), got {size}")
        wild = [a for a, s in sizes.items() if s == -1]
        _require(len(wild) <= 1, wild[-1] if wild else "", f"at most one mesh axis may be -1, got {wild}")

    def _sizes(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    def shape(self, n_devices: int) -> tuple[int, int, int]:
        """Concrete (data, fsdp, tensor) sizes for `n_devices`, filling in the -1 axis."""
        if n_devices < 1:
            raise ConfigError(f"need at least one device, got {n_devices}", "mesh")
        sizes = self._sizes()
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n_devices % known:
                raise ConfigError(f"fixed axes {sizes} (product {known}) do not divide {n_devices} devices",
                                  "mesh")
            return tuple(n_devices // known if s == -1 else s for s in sizes)  # type: ignore[return-value]
        if known != n_devices:
            raise ConfigError(f"mesh {sizes} has {known} devices but {n_devices} are available", "mesh")
        return sizes


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(_Node):
    """Which Hugging Face directory to load, and how its parameters are stored and computed.

    `dtype` is how parameters (and so optimizer
    moments and checkpoints) are stored, `compute_dtype` what activations and matmuls use ("" = the
    stored dtype). On accelerators store fp32 and compute bf16: a recipe update at lr 1e-6 is below
    bf16 resolution for weights of normal size (bf16 spacing near 0.02 is ~1.2e-4) and would be lost,
    so training refuses bf16 storage. `attention_chunk` / `logits_chunk` bound the memory of
    attention and of log-probs / cross-entropy (query / sequence chunks; 0 = one block).
    `scan_layers` runs the decoder layers as one scan (one layer body in the compiled programs:
    compile time independent of depth; costs a transient stacked copy of the layer weights in the
    compute dtype)."""

    #: Hugging Face model directory (config.json + *.safetensors + tokenizer and image processor files).
    path: str = ""
    #: Storage dtype of parameters, optimizer moments and checkpoints; bfloat16 only when every stage is LoRA.
    dtype: Literal["float32", "bfloat16"] = "float32"
    #: Dtype of activations and matmuls ("" = the storage dtype); bfloat16 on accelerators.
    compute_dtype: Literal["", "float32", "bfloat16"] = ""
    #: Query positions per attention chunk in training, scoring and prefill (0 = one block).
    attention_chunk: int = 512
    #: Sequence positions per log-prob / entropy / cross-entropy chunk (0 = one block).
    logits_chunk: int = 256
    #: Run the decoder layers as one scan: one layer body per program (compile time independent of depth).
    scan_layers: bool = False

    def _check(self) -> None:
        _at_least(self, 0, "attention_chunk", "logits_chunk")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig(_Node):
    """Data location, length limits and padding buckets, image pixel bounds, strictness.

    `data_dir=""` uses the one default data directory of every command (`$VLM_JAX_DATA_DIR`, else
    `$VLM_JAX_HOME/data`, see `vlm_jax.paths`). Pixel defaults are the Qwen2.5-VL processor's
    (`56*56` .. `28*28*1280`). `strict` stops the run at the first unusable row (naming it) instead
    of skipping and counting it. Before anything compiles, `train` checks `preflight_rows` rows (evenly spread; -1 = all, 0 = no check) of every stage
    dataset with the pipeline's own row encoding (`python -m vlm_jax.data.check`) and refuses to
    start when a dataset would skip more than `preflight_max_skip_share` of them.

    `shards`: each stage's data is read as that many shards (0: one per process), each filling
    `batch_size / shards` rows of every batch; a process reads only its own shards (its rows and
    images), and the batches depend on `shards`, not on the process count, so a run resumes (and
    repeats) on any process count that divides it (`vlm_jax.data.shards`).
    """

    #: Prepared datasets directory ("" = $VLM_JAX_DATA_DIR, else $VLM_JAX_HOME/data).
    data_dir: str = ""
    #: Shards each stage's data is read as (0 = one per process); batches depend on it, not on processes.
    shards: int = 0
    #: Longest prompt in tokens after image-token expansion; longer rows are skipped and counted.
    max_prompt_len: int = 512
    #: Padded sequence lengths (few shapes, each compiled once); strictly increasing.
    length_buckets: tuple[int, ...] = (64, 128, 256, 512)
    #: Upper pixel bound per image (larger images are resized down).
    max_pixels_per_image: int = 1_003_520
    #: Lower pixel bound per image (smaller images are resized up).
    min_pixels_per_image: int = 3_136
    #: Stop at the first unusable row, naming it, instead of skipping and counting it.
    strict: bool = False
    #: Rows of every stage dataset encoded before the model loads (-1 = all, 0 = no check).
    preflight_rows: int = 256
    #: Largest share of skipped rows the preflight check accepts before refusing to start.
    preflight_max_skip_share: float = 0.1
    #: Encoded rows each stage keeps in memory per process (MiB; 0 = none): a row drawn again is not re-encoded.
    row_cache_mb: int = 1024

    def _check(self) -> None:
        _at_least(self, 1, "max_prompt_len", "min_pixels_per_image")
        _at_least(self, -1, "preflight_rows")
        _at_least(self, 0, "shards", "row_cache_mb")
        _require(0 <= self.preflight_max_skip_share <= 1, "preflight_max_skip_share",
                 f"must be in [0, 1], got {self.preflight_max_skip_share}")
        b = self.length_buckets
        _require(len(b) > 0 and b[0] >= 1 and all(x < y for x, y in zip(b, b[1:])), "length_buckets",
                 f"must be positive and strictly increasing, got {b}")
        _require(self.max_pixels_per_image >= self.min_pixels_per_image, "max_pixels_per_image",
                 f"must be >= min_pixels_per_image ({self.min_pixels_per_image}), "
                 f"got {self.max_pixels_per_image}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig(_Node):
    """Checkpoint cadence in steps (0 = only at stage ends), how many to keep, async writes."""

    #: Checkpoint every that-many steps (0 = only at stage ends).
    every: int = 50
    #: Newest checkpoints kept.
    keep: int = 3
    #: Write checkpoints in the background.
    async_save: bool = True

    def _check(self) -> None:
        _at_least(self, 0, "every")
        _at_least(self, 1, "keep")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoggingConfig(_Node):
    """Metric logging cadence in steps and which sinks are on (JSONL is always written)."""

    #: Log metrics every that-many steps.
    every: int = 1
    #: Write TensorBoard events (metrics.jsonl is always written).
    tensorboard: bool = True
    #: Console progress line.
    progress: bool = True

    def _check(self) -> None:
        _at_least(self, 1, "every")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(_Node):
    """A whole run: model, mesh, data, the ordered stages, and run-wide settings.
    `compilation_cache_dir=""` turns the persistent compilation cache off; "default" is
    `$VLM_JAX_HOME/jax_cache` (see `vlm_jax.paths`), the same from any directory."""

    #: Model directory and precision.
    model: ModelConfig = ModelConfig()
    #: Device mesh sizes.
    mesh: MeshConfig = MeshConfig()
    #: Data location, lengths, pixels and checks (all stages).
    data: DataConfig = DataConfig()
    #: The ordered capability stages.
    stages: tuple[StageConfig, ...]
    #: Seed of data order, sampling and adapter init.
    seed: int = 0
    #: Checkpoint cadence.
    checkpoint: CheckpointConfig = CheckpointConfig()
    #: Metric logging.
    logging: LoggingConfig = LoggingConfig()
    #: Logical axis name -> mesh axis (or axes, or none = replicated) table.
    logical_axis_rules: tuple[AxisRule, ...] = LOGICAL_AXIS_RULES
    #: Persistent compilation cache ("" = off, "default" = $VLM_JAX_HOME/jax_cache).
    compilation_cache_dir: str = "default"

    def _check(self) -> None:
        validate(self)


def validate(cfg: Config) -> Config:
    """Checks that span several config objects; returns `cfg`. Run by `Config` on construction."""
    _require(len(cfg.stages) > 0, "stages", "at least one stage is required")
    _require(cfg.model.dtype != "bfloat16" or all(st.lora.enabled for st in cfg.stages), "model.dtype",
             "bfloat16 parameter storage loses small updates (an lr 1e-6 AdamW step is below bf16 "
             "resolution for weights of normal size); store float32 and set "
             "model.compute_dtype=bfloat16 for bf16 compute (bfloat16 is fine when every stage trains "
             "LoRA adapters, which are fp32, over a frozen base)")
    first: dict[str, int] = {}
    for i, stage in enumerate(cfg.stages):
        _require(stage.name not in first, f"stages.{i}.name",
                 f"duplicate stage name {stage.name!r} (also stages.{first.get(stage.name)})")
        first[stage.name] = i
        if i > 0 and not stage.reset_optimizer:
            _require(not stage.lora.enabled and not cfg.stages[i - 1].lora.enabled, f"stages.{i}.reset_optimizer",
                     "a LoRA stage starts fresh adapters and merges them at its end, so no optimizer state "
                     "carries into or out of it; set reset_optimizer=True")
    seen: set[str] = set()
    for i, (logical, mesh_axes) in enumerate(cfg.logical_axis_rules):
        _require(logical not in seen, f"logical_axis_rules.{i}.0", f"logical axis {logical!r} given twice")
        seen.add(logical)
        axes = (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ())
        for axis in axes:
            _require(axis in MESH_AXES, f"logical_axis_rules.{i}.1",
                     f"unknown mesh axis {axis!r} for {logical!r}; valid: {MESH_AXES}")
    return cfg

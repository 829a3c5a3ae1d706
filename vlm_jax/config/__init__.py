"""Typed, frozen run configuration: schema, file loading, dotted overrides, validation.

A run is described by a Python file whose `get_config()` (or `get_config(arg)`, for
`--config FILE.py:ARG`) returns a `Config`. The package's parts:

- `vlm_jax.config.schema`: the run's dataclasses (every default, every field's `#:` description)
  and `validate`, the checks that span several objects; `vlm_jax.config.stage`: a stage's
  (datasets, optimizer, GRPO / cross-entropy objective, evaluation, LoRA);
- `vlm_jax.config.parse`: the typed coercion every dataclass runs on construction, the string
  override parser (`--config.stages.1.grpo.kl_coef=0.02`) and the command-line splitter;
- `vlm_jax.config.load`: `load_config` (file, argument, overrides) and the `config.json` form;
- `vlm_jax.config.recipes`: recipe transforms (the merged baseline, the CPU smoke variant) that
  recipes offer as config arguments.

A bad config fails at start-up, before anything compiles, with an error naming the full dotted key
(`stages.1.grpo.kl_coef`) and the valid keys or choices. This package imports no JAX: it is loaded
by every CLI before the backend is initialised.
"""

from vlm_jax.config.load import config_from_dict, config_to_dict, load_config, split_config_arg
from vlm_jax.config.parse import ConfigError, _Node, apply_override, parse_flags
from vlm_jax.config.schema import (
    LOGICAL_AXIS_RULES,
    MESH_AXES,
    AxisRule,
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    MeshConfig,
    ModelConfig,
    validate,
)
from vlm_jax.config.stage import (
    MODULES,
    DatasetSpec,
    EvalConfig,
    GRPOConfig,
    LoraConfig,
    OptimizerConfig,
    SFTConfig,
    StageConfig,
)

__all__ = [
    "LOGICAL_AXIS_RULES", "MESH_AXES", "MODULES", "AxisRule", "CheckpointConfig", "Config", "ConfigError",
    "DataConfig", "DatasetSpec", "EvalConfig", "GRPOConfig", "LoggingConfig", "LoraConfig", "MeshConfig",
    "ModelConfig", "OptimizerConfig", "SFTConfig", "StageConfig", "apply_override", "config_from_dict",
    "config_to_dict", "load_config", "parse_flags", "split_config_arg", "validate", "_Node",
]

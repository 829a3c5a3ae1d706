"""Loading a config: the `config.json` form (`config_to_dict` / `config_from_dict`) and a config
file with its argument and dotted overrides (`load_config("configs/x.py:smoke", ["stages.0.steps=2"])`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from vlm_jax.config.parse import ConfigError, _build, apply_override
from vlm_jax.config.schema import Config


def config_to_dict(cfg: Any) -> Any:
    """JSON-serialisable plain form of a config (dicts, lists, scalars) for `config.json`."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [config_to_dict(v) for v in cfg]
    return cfg


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Inverse of `config_to_dict`: builds and validates a `Config`; unknown keys are errors."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"expected a mapping for Config, got {type(d).__name__}")
    return _build(Config, d, "")


def split_config_arg(path: str) -> tuple[str, str | None]:
    """`"configs/x.py:merged,smoke"` -> (`"configs/x.py"`, `"merged,smoke"`); no argument: None."""
    file, colon, arg = path.partition(".py:")
    return (file + ".py", arg) if colon else (path, None)


def load_config(path: str, overrides: Sequence[str] = ()) -> Config:
    """Import the config file at `path`, call its `get_config()`, apply dotted overrides, validate.

    `path` may end in `:ARG` (`configs/qwen2_5_vl_7b_tpu.py:smoke`): the file's `get_config(arg)` is
    called with it (big_vision's config arguments), e.g. a recipe's variants
    (`vlm_jax.config.recipes`)."""
    path, arg = split_config_arg(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    name = f"_vlm_jax_config_{abs(hash(os.path.abspath(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"config file {path!r} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        if not callable(get_config):
            raise ConfigError(f"config file {path!r} defines no get_config() function")
        if arg is None:
            cfg = get_config()
        elif not inspect.signature(get_config).parameters:
            raise ConfigError(f"config file {path!r} takes no argument (its get_config() has no parameter), "
                              f"got {arg!r}")
        else:
            cfg = get_config(arg)
    except ConfigError as e:
        raise ConfigError(f"in {path}: {e}") from None
    except TypeError as e:  # e.g. a StageConfig without its required `steps`
        raise ConfigError(f"in {path}: get_config() failed: {e}") from e
    finally:
        sys.modules.pop(name, None)
    if isinstance(cfg, Mapping):
        cfg = config_from_dict(cfg)
    if not isinstance(cfg, Config):
        raise ConfigError(f"get_config() in {path!r} returned {type(cfg).__name__}, expected Config")
    if not overrides:
        return cfg
    tree = config_to_dict(cfg)
    for override in overrides:
        apply_override(tree, override, Config)
    return config_from_dict(tree)

"""The config's typed coercion and string-override parser, generic over the schema's dataclasses.

`_Node` is the base of every config dataclass: it coerces each field from its annotation (lists to
tuples, dicts to dataclasses, ints to floats, `Literal` choices) and runs the class's own `_check`.
`apply_override` applies one `--config.a.b=value` to a plain-dict config, parsing the text by the
type of the field it targets; `parse_flags` splits a command line. Errors are `ConfigError`s naming
the full dotted key. Imports no JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """Any invalid config: bad file, unknown key, bad value, bad flag. `key` is the dotted path."""

    def __init__(self, message: str, key: str = ""):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error, seen from the object that holds this one under `prefix`."""
        return ConfigError(self.message, _join(prefix, self.key))


def _join(*parts: object) -> str:
    return ".".join(str(p) for p in parts if str(p))


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(message, key)


# -------------------------------------------------------------------------- typed coercion (dicts)
@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return re.sub(r"typing\.|vlm_jax\.config\.(schema\.|stage\.)?", "", str(hint))


def _is_pairs(hint: Any) -> bool:
    """tuple[tuple[str, V], ...]: a mapping written as pairs (reward, lr_multipliers, axis rules)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is not tuple or len(args) != 2 or args[1] is not Ellipsis:
        return False
    inner = typing.get_args(args[0])
    return typing.get_origin(args[0]) is tuple and len(inner) == 2 and inner[0] is str


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against annotation `hint` and normalise it (lists -> tuples, dicts ->
    dataclasses, ints -> floats). Errors name `key` and what was expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return _build(hint, value, key)
    elif origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(f"invalid value {value!r}; valid choices: {', '.join(map(repr, args))}", key)
    elif _is_union(hint):
        if value is None and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                continue
    elif origin is tuple:
        if isinstance(value, Mapping) and _is_pairs(hint):
            value = list(value.items())
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], _join(key, i)) for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(_coerce(v, a, _join(key, i)) for i, (v, a) in enumerate(zip(value, args)))
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _require(math.isfinite(value), key, f"must be finite, got {value}")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{key}: unsupported annotation {hint!r} in the config schema")
    raise ConfigError(f"expected {_type_name(hint)}, got {value!r} ({type(value).__name__})", key)


def _build(cls: type, values: Mapping[str, Any], key: str) -> Any:
    """`cls(**values)` with unknown and missing keys reported by full dotted key."""
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    for name in values:
        _require(name in names, _join(key, name),
                 f"unknown key {name!r}; valid keys of {cls.__name__}: {', '.join(names)}")
    for f in fields:
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        _require(not required or f.name in values, _join(key, f.name),
                 f"required key of {cls.__name__} is missing")
    try:
        return cls(**values)
    except ConfigError as e:
        raise e.under(key) from None


class _Node:
    """Base of every config dataclass: coerce/check each field from its annotation, then `_check`."""

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = _coerce(getattr(self, field.name), hints[field.name], field.name)
            object.__setattr__(self, field.name, value)
        self._check()

    def _check(self) -> None:
        """Range and cross-field checks local to this object (keys relative to it)."""


def _at_least(obj: object, bound: float, *keys: str, who: str = "") -> None:
    """Require `obj.<key> >= bound` for each key (`who` prefixes the message)."""
    for key in keys:
        value = getattr(obj, key)
        _require(value >= bound, key, f"{who}{key} must be >= {bound}, got {value}")


# ------------------------------------------------------------------------------ string overrides
_NONE_WORDS = ("none", "null")
_BOOL_WORDS = {"true": True, "1": True, "false": False, "0": False}


def _parse_json(text: str, key: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"expected {what} as JSON, got {text!r} ({e.msg})", key) from None


def _parse_text(text: str, hint: Any, key: str) -> Any:
    """Parse an override's text by the type of the field it targets (result still goes through
    `_coerce` when the config is rebuilt)."""
    s = text.strip()
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _parse_json(s, key, f"a {hint.__name__} object")
    if origin is Literal:
        if s in args:
            return s
        raise ConfigError(f"invalid value {s!r}; valid choices: {', '.join(map(repr, args))}", key)
    if _is_union(hint):
        if s.lower() in _NONE_WORDS and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(_parse_text(s, arm, key), arm, key)
            except ConfigError as e:
                errors.append(e.message)
        raise ConfigError(f"cannot parse {s!r} as {_type_name(hint)}: {'; '.join(errors)}", key)
    if origin is tuple:
        if s[:1] in "[{":
            return _parse_json(s, key, _type_name(hint))
        if s[:1] == "(" and s[-1:] == ")":
            s = s[1:-1].strip()
        items = [p.strip() for p in s.split(",")] if s else []
        if items and items[-1] == "":
            items.pop()  # "(1,)" style trailing comma
        if _is_pairs(hint):
            value_hint = typing.get_args(args[0])[1]
            pairs = []
            for item in items:
                name, eq, v = item.rpartition("=")
                _require(bool(eq and name), key, f"expected NAME=VALUE items, got {item!r}")
                pairs.append((name.strip(), _parse_text(v, value_hint, _join(key, name.strip()))))
            return pairs
        if len(args) == 2 and args[1] is Ellipsis:
            return [_parse_text(v, args[0], _join(key, i)) for i, v in enumerate(items)]
        _require(len(items) == len(args), key,
                 f"expected {len(args)} comma-separated items, got {len(items)}")
        return [_parse_text(v, a, _join(key, i)) for i, (v, a) in enumerate(zip(items, args))]
    if hint is bool:
        if s.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[s.lower()]
        raise ConfigError(f"expected a bool (true/false/1/0), got {s!r}", key)
    if hint in (int, float):
        try:
            return hint(s)
        except ValueError:
            raise ConfigError(f"expected {'an int' if hint is int else 'a float'}, got {s!r}", key) from None
    if hint is str:
        return json.loads(s) if len(s) >= 2 and s[0] == s[-1] == '"' else s
    raise TypeError(f"{key}: unsupported annotation {hint!r} in the config schema")


def _child(node: Any, hint: Any, part: str, key: str, override_key: str) -> tuple[Any, Any, Any]:
    """One step down an override path: (container, slot, hint of the slot). `key` = path so far;
    errors are reported under the whole `override_key`."""
    if dataclasses.is_dataclass(hint) and isinstance(node, dict):
        names = [f.name for f in dataclasses.fields(hint)]
        _require(part in names, override_key,
                 f"unknown key {part!r}; valid keys of {hint.__name__}: {', '.join(names)}")
        return node, part, _type_hints(hint)[part]
    if typing.get_origin(hint) is tuple and isinstance(node, list):
        args = typing.get_args(hint)
        _require(part.isdigit(), override_key, f"{key} is a tuple: expected an index, got {part!r}")
        index = int(part)
        _require(index < len(node), override_key, f"index {index} out of range: {key} has length {len(node)}")
        return node, index, args[0] if args[1:] == (Ellipsis,) else args[index]
    raise ConfigError(f"{key} is {_type_name(hint)}, which has no sub-key {part!r}", override_key)


def apply_override(tree: dict[str, Any], override: str, root: type) -> None:
    """Apply one `--config.a.b=value` (or `a.b=value`) override to a `config_to_dict` tree of a
    `root` dataclass (`Config`) in place."""
    path, eq, text = override.partition("=")
    path = path.strip().removeprefix("--").removeprefix("config.")
    _require(bool(eq and path), "", f"override {override!r} must look like --config.KEY=VALUE")
    node, hint, key = tree, root, ""
    parts = path.split(".")
    for part in parts[:-1]:
        container, slot, hint = _child(node, hint, part, key, path)
        node, key = container[slot], _join(key, part)
    container, slot, hint = _child(node, hint, parts[-1], key, path)
    container[slot] = _parse_text(text, hint, path)


def parse_flags(argv: Sequence[str], known_flags: Sequence[str] = ("workdir",)
                ) -> tuple[str, tuple[str, ...], dict[str, str]]:
    """Split CLI arguments (without the program name) into (config path, config overrides, other
    flags). Accepts `--config PATH`, `--config=PATH`, `--config.KEY=VALUE` and, for each name in
    `known_flags`, `--NAME VALUE` / `--NAME=VALUE`. Anything else is a ConfigError naming it."""
    config_path: str | None = None
    overrides: list[str] = []
    other: dict[str, str] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        name = flag[2:] if flag.startswith("--") else None
        if name is not None and name.startswith("config."):
            _require(bool(eq), "", f"config override {arg!r} needs a value: --config.KEY=VALUE")
            overrides.append(arg)
        elif name == "config" or name in known_flags:
            if not eq:
                has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
                _require(has_value, "", f"flag {flag} needs a value")
                i, value = i + 1, args[i + 1]
            _require(value != "", "", f"flag {flag} needs a non-empty value")
            if name == "config":
                _require(config_path is None, "", "flag --config given twice")
                config_path = value
            else:
                _require(name not in other, "", f"flag {flag} given twice")
                other[name] = value
        else:
            valid = ", ".join(["--config", "--config.KEY=VALUE", *(f"--{k}" for k in known_flags)])
            raise ConfigError(f"unknown flag or argument {arg!r}; valid flags: {valid}")
        i += 1
    _require(config_path is not None, "", "missing --config PATH")
    return config_path, tuple(overrides), other  # type: ignore[return-value]

"""Pages the docs generate from the code at build time, so they cannot drift from it.

- the config reference (`config_reference_markdown`): every field of every config dataclass in
  `vlm_jax.config`, with its type, default and the one-line `#:` description written above it;
- the command-line tools' `--help` texts;
- a copy of `notebooks/colab_tpu.ipynb` for myst-nb to render (not executed).

Sphinx runs `setup` (conf.py lists this module as an extension); `tests/test_docs.py` calls
`config_reference_markdown` and compares its fields with the dataclasses.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1]
ROOT = DOCS.parent
GENERATED = DOCS / "_generated"

# (file stem, command): the `--help` texts included by docs/reference/cli.md
CLI_HELP = (
    ("prepare", ["-m", "vlm_jax.data.prepare", "--help"]),
    ("evaluate", ["-m", "vlm_jax.evaluate", "--help"]),
    ("export", ["-m", "vlm_jax.export", "--help"]),
    ("filter", ["-m", "vlm_jax.filter", "--help"]),
    ("demo_setup", ["-m", "vlm_jax.demo_setup", "--help"]),
    ("plan_memory", ["scripts/plan_memory.py", "--help"]),
)


# ------------------------------------------------------------------------------ config reference
def config_classes() -> list[type]:
    """Every config dataclass of `vlm_jax.config`: those reachable from `Config` in field order,
    then any other (so a new class shows up even before it is wired in)."""
    from vlm_jax import config as c

    order: list[type] = []

    def visit(cls: type) -> None:
        if cls in order:
            return
        order.append(cls)
        for hint in typing.get_type_hints(cls).values():
            for inner in _dataclasses_in(hint):
                visit(inner)

    visit(c.Config)
    others = [v for v in vars(c).values()
              if isinstance(v, type) and dataclasses.is_dataclass(v) and issubclass(v, c._Node)
              and v is not c._Node and v.__module__ == c.schema.__name__]
    return order + [cls for cls in others if cls not in order]


def _dataclasses_in(hint) -> list[type]:
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return [hint]
    return [d for arg in typing.get_args(hint) for d in _dataclasses_in(arg)]


def field_descriptions() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the `#:` comment above the field in vlm_jax/config/schema.py
    or vlm_jax/config/stage.py."""
    from sphinx.pycode import ModuleAnalyzer

    docs = {}
    for module in ("vlm_jax.config.schema", "vlm_jax.config.stage"):
        docs.update(ModuleAnalyzer.for_module(module).find_attr_docs())
    return {key: " ".join(line.strip() for line in lines).strip() for key, lines in docs.items()}


def config_paths() -> dict[str, list[str]]:
    """Class name -> the dotted keys where it sits in a Config (`stages.N.grpo`)."""
    from vlm_jax import config as c

    paths: dict[str, list[str]] = {"Config": ["(the whole config)"]}

    def visit(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            for inner in _dataclasses_in(hint):
                many = typing.get_origin(hint) is tuple
                key = f"{prefix}{f.name}" + (".N" if many else "")
                if key not in paths.setdefault(inner.__name__, []):
                    paths[inner.__name__].append(key)
                    visit(inner, key + ".")

    visit(c.Config, "")
    return paths


def _anchor(cls_name: str) -> str:
    return f"config-{cls_name.lower()}"


def _type_text(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a!r}`" if a != "" else '`""`' for a in args)
    if dataclasses.is_dataclass(hint):
        return f"{{ref}}`{hint.__name__} <{_anchor(hint.__name__)}>`"
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and dataclasses.is_dataclass(args[0]):
        return f"tuple of {{ref}}`{args[0].__name__} <{_anchor(args[0].__name__)}>`"
    text = hint.__name__ if isinstance(hint, type) else str(hint)
    text = text.replace("typing.", "").replace("NoneType", "None")
    return f"`{text}`".replace("|", "\\|")


def _default_text(cls: type, f: dataclasses.Field) -> str:
    from vlm_jax import config as c

    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if dataclasses.is_dataclass(value):
        changed = [x.name for x in dataclasses.fields(value)
                   if getattr(value, x.name) != getattr(type(value)(**_required_of(value)), x.name)]
        return "its defaults" if not changed else f"`{value!r}`"
    for name, obj in vars(c).items():  # a module constant: name it instead of printing it
        if name.isupper() and obj is value and isinstance(value, tuple) and len(repr(value)) > 40:
            return f"`vlm_jax.config.{name}`"
    return f"`{value!r}`".replace("|", "\\|")


def _required_of(value) -> dict:
    return {x.name: getattr(value, x.name) for x in dataclasses.fields(value)
            if x.default is dataclasses.MISSING and x.default_factory is dataclasses.MISSING}


def _code_spans(text: str) -> str:
    """Environment variables and quoted words as code (and so never read as math or emphasis)."""
    text = re.sub(r"(?<!`)(\$[A-Z_]+(?:/[\w.]+)*)", r"`\1`", text)
    return re.sub(r'(?<!`)("[^"]*")', r"`\1`", text)


def _summary(cls: type) -> str:
    """The class docstring, one line per paragraph (as markdown)."""
    paragraphs = inspect.cleandoc(cls.__doc__ or "").split("\n\n")
    flat = [re.sub(r"\s+", " ", p).strip() for p in paragraphs]
    return "\n\n".join(p if "`" in p else _code_spans(p) for p in flat if p)


def config_reference_markdown() -> str:
    """The config reference: a section per config class, a table row per field."""
    descriptions = field_descriptions()
    paths = config_paths()
    out = []
    for cls in config_classes():
        name = cls.__name__
        hints = typing.get_type_hints(cls)
        out += [f"({_anchor(name)})=", f"## {name}", ""]
        where = ", ".join(f"`{p}`" if not p.startswith("(") else p for p in paths.get(name, []))
        out += [_summary(cls), "", f"Keys: {where or '(not yet part of Config)'}.", ""]
        out += ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            desc = _code_spans(descriptions.get((name, f.name), "")).replace("|", "\\|")
            out.append(f"| `{f.name}` | {_type_text(hints[f.name])} | {_default_text(cls, f)} | {desc} |")
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------ build-time hook
def _write(path: Path, text: str) -> None:
    """Write only when changed, so Sphinx does not rebuild pages that include it every time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def generate(app=None) -> None:
    _write(GENERATED / "config_reference.md", config_reference_markdown())
    env = {**os.environ, "COLUMNS": "100", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for stem, args in CLI_HELP:
        r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {r.stderr[-2000:]}")
        _write(GENERATED / f"cli_{stem}.txt", r.stdout)
    notebook = ROOT / "notebooks" / "colab_tpu.ipynb"
    target = GENERATED / "colab_tpu.ipynb"
    if not target.exists() or target.read_bytes() != notebook.read_bytes():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(notebook, target)


def setup(app):
    app.connect("builder-inited", generate)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

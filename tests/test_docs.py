"""The documentation: results tables rendered from committed JSON, the README's size, the config
reference against the config dataclasses, the Python examples in the docs (executed with sybil),
and the walkthrough included rather than copied. The site's build with warnings as errors
(`sphinx-build -W`) runs in `.ci/run`."""

import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


render_docs = _module("render_docs", ROOT / "scripts" / "render_docs.py")


def test_every_results_block_is_what_the_script_renders_from_the_committed_json():
    stale = []
    for path in render_docs.markdown_files():
        text = path.read_text()
        rendered = render_docs.render_text(text, str(path))
        if rendered != text:
            stale.append(str(path.relative_to(ROOT)))
    assert not stale, f"results blocks differ from docs/results/*.json in {stale}: run python scripts/render_docs.py"


def test_the_check_mode_fails_on_a_block_edited_by_hand(tmp_path):
    text = "x\n<!-- BEGIN results:scale -->\n| hand | edited |\n<!-- END results:scale -->\n"
    assert render_docs.render_text(text) != text
    assert render_docs.render_text(render_docs.render_text(text)) == render_docs.render_text(text)
    with pytest.raises(ValueError, match="unbalanced"):
        render_docs.render_text("<!-- BEGIN results:scale -->\nno end\n")
    with pytest.raises(KeyError, match="no renderer"):
        render_docs.render_text("<!-- BEGIN results:nope -->\n<!-- END results:nope -->\n")


def test_a_missing_results_file_renders_as_not_yet_measured(monkeypatch, tmp_path):
    monkeypatch.setattr(render_docs, "RESULTS", tmp_path)
    for name in ("demo", "experiment", "headline", "scale"):
        assert render_docs.render_block(name).strip() == render_docs.NOT_MEASURED


def test_the_readme_is_short_and_carries_its_results_blocks():
    text = (ROOT / "README.md").read_text()
    assert len(text) <= 10_000, len(text)
    assert render_docs.blocks_in(text) == ["demo", "experiment", "headline"]
    assert "results:experiment" in (DOCS / "experiment.md").read_text()
    used = {name for path in render_docs.markdown_files() for name in render_docs.blocks_in(path.read_text())}
    assert used == set(render_docs.RENDERERS), set(render_docs.RENDERERS) ^ used


def test_every_figure_names_its_command_machine_and_commit():
    import json

    perf = json.loads((DOCS / "results" / "performance.json").read_text())
    for f in perf["figures"]:
        assert f["command"] and f["machine"] in perf["machines"] and re.fullmatch(r"[0-9a-f]{7,40}", f["commit"]), f
    scale = json.loads((DOCS / "results" / "scale.json").read_text())
    for plan in scale["plans"]:
        assert plan["command"].startswith("python scripts/plan_memory.py")
        assert all(re.fullmatch(r"[0-9a-f]{7,40}", r["commit"]) for r in plan["rows"]), plan["id"]


# ------------------------------------------------------------------------------ config reference
def _reference_tables(markdown: str) -> dict[str, dict[str, list[str]]]:
    """Class name -> field name -> [type, default, meaning] as the generated page shows them."""
    tables: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in markdown.splitlines():
        if line.startswith("## "):
            current = tables.setdefault(line[3:].strip(), {})
        elif current is not None and line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            current[cells[0].strip("`")] = cells[1:]
    return tables


def test_the_config_reference_lists_every_field_of_every_config_class():
    from vlm_jax import config

    docs_ext = _module("vlm_jax_docs", DOCS / "_ext" / "vlm_jax_docs.py")
    tables = _reference_tables(docs_ext.config_reference_markdown())
    classes = {v.__name__: v for v in vars(config).values()
               if isinstance(v, type) and dataclasses.is_dataclass(v) and issubclass(v, config._Node)
               and v is not config._Node}
    assert set(tables) == set(classes)
    for name, cls in classes.items():
        fields = [f.name for f in dataclasses.fields(cls)]
        assert list(tables[name]) == fields, name
        for field, (type_text, default, meaning) in tables[name].items():
            assert type_text and default, (name, field)
            assert meaning, f"{name}.{field} has no `#:` description in vlm_jax/config/"
    assert tables["GRPOConfig"]["kl_coef"][1] == "`0.01`"
    assert tables["StageConfig"]["steps"][1] == "required"


# ------------------------------------------------------------------------------ examples
def _pages_with_python():
    return sorted(p.relative_to(ROOT).as_posix() for p in DOCS.rglob("*.md")
                  if "_build" not in p.parts and "```python" in p.read_text())


@pytest.mark.parametrize("page", _pages_with_python())
def test_the_python_examples_in_the_docs_run(page, monkeypatch):
    from sybil import Sybil
    from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

    monkeypatch.chdir(ROOT)
    document = Sybil(parsers=[PythonCodeBlockParser(), SkipParser()]).parse(ROOT / page)
    examples = list(document)
    assert examples, page
    for example in examples:
        example.evaluate()


def test_the_docs_have_python_examples_and_include_the_walkthrough():
    pages = _pages_with_python()
    assert {"docs/getting-started/your-data.md", "docs/concepts/grpo.md", "docs/guides/rewards.md",
            "docs/reference/config.md"} <= set(pages)
    text = (DOCS / "getting-started" / "your-data.md").read_text()
    assert "```{literalinclude} ../../scripts/walkthrough.sh" in text
    walkthrough = (ROOT / "scripts" / "walkthrough.sh").read_text()
    copied = [line for line in walkthrough.splitlines() if len(line) > 30 and line in text.splitlines()]
    assert len(copied) <= 2, f"lines copied from scripts/walkthrough.sh (include it instead): {copied}"

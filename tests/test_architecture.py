"""The package's shape (docs/concepts/architecture.md): no import circles inside `vlm_jax` (lazy
imports inside functions included), no module over ~500 lines, and the architecture page's package
map names modules that exist."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vlm_jax"
MAX_LINES = 550  # "~500": a file past it is several modules in one


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its file (parent packages left out: importing
    a sub-module runs them, but they are not a dependency of it)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def resolve(dotted: str) -> str:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {resolve(a.name) for a in node.names if a.name.startswith("vlm_jax")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            if base.startswith("vlm_jax"):
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else resolve(base)
                          for a in node.names}
    return {m for m in found if m and m != name and not name.startswith(m + ".")}


def test_no_import_circles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    circles, state = [], {}

    def visit(name, stack):
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                circles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_no_module_is_several_modules_in_one():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_architecture_page_names_modules_that_exist():
    page = (ROOT / "docs" / "concepts" / "architecture.md").read_text()
    table = page.split("## Package map", 1)[1].split("##", 1)[0]
    names = [n for row in table.splitlines() if row.startswith("| `")
             for n in re.findall(r"`([\w/]+)`", row.split("|")[1])]
    assert len(names) > 20
    missing = [n for n in names if not ((PACKAGE / f"{n}.py").is_file() or (PACKAGE / n.strip("/")).is_dir())]
    assert not missing, missing

"""The package's shape, read from its source with `ast` (nothing is imported): every import, at the
top of a file or inside a function, is an edge. The graph has no cycle, no module imports one on a
higher layer, nothing outside `metricgp.experiments` imports it (bar the shims that keep documented
`python -m` paths working), and no library code outside it names a path under `results/`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "metricgp"
# lowest first: a module may import its own layer or a lower one (see metricgp/README.md)
LAYERS = [
    ("errors", "fileio", "provenance", "ranking", "plotting"),
    ("expr",),
    ("models", "data", "blocks", "offload"),
    ("stats",),
    ("prune",),
    ("measure", "zeroshot"),
    ("evaluate",),
    ("refit_fitness",),
    ("recover",),
    ("structured",),
    ("search",),
    ("darwin",),
    ("cli",),
    ("experiments",),
]
# `python -m` paths that README.md, results/README.md and the Makefile use; each only runs a command
# that lives in metricgp.cli or metricgp.experiments
ENTRY_SHIMS = {"metricgp.apply", "metricgp.memory", "metricgp.compare", "metricgp.bench", "metricgp.search.__main__",
               "metricgp.darwin.__main__", "metricgp.darwin.compare", "metricgp.structured.experiments"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> set[str]:
    """Every metricgp module `module` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {_resolve(a.name) for a in node.names if a.name.startswith("metricgp")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            if base.startswith("metricgp"):
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else _resolve(base) for a in node.names}
    return {m for m in found if m and m != module}


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _layer(module: str) -> int | None:
    part = module.split(".")[1] if "." in module else None
    return next((i for i, names in enumerate(LAYERS) if part in names), None)


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m != "metricgp" and m not in ENTRY_SHIMS and _layer(m) is None] == []


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(GRAPH[m]):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_no_import_from_a_lower_layer_to_a_higher_one():
    upward = [(m, t) for m, targets in GRAPH.items() if m != "metricgp" and m not in ENTRY_SHIMS
              for t in targets if t != "metricgp" and _layer(t) > _layer(m)]
    assert upward == []


def test_only_experiments_and_entry_shims_import_experiments():
    outside = [(m, t) for m, targets in GRAPH.items() for t in targets
               if t.startswith("metricgp.experiments") and not m.startswith("metricgp.experiments")
               and m not in ENTRY_SHIMS]
    assert outside == []


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


@pytest.mark.parametrize("module", [m for m in MODULES if not m.startswith("metricgp.experiments")])
def test_library_code_names_no_path_under_results(module):
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    docs = _docstrings(tree)
    named = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and id(node) not in docs and "results/" in node.value]
    assert named == [], f"{module} names a path under results/ (only metricgp.experiments may)"

"""No import cycle inside ``pipeline/`` (issue 30): every import statement counts, those inside
functions too, since a lazy import only hides a circle until the day someone moves it up, and so
does a stage's ``LazyModule("pipeline....")`` (a module the worker imports on first use).

The graph is read from the source with ``ast`` (no module is imported): a node per module of
pipeline/, an edge per ``import a.b`` / ``from a.b import c`` / relative import that names a module
of pipeline/ (``from pkg import name`` counts as an import of ``pkg.name`` when that is a module,
else of ``pkg``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _modules(package: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported(module: str, path: Path, node: ast.AST, modules: dict[str, Path]) -> set[str]:
    names: list[str] = []
    if isinstance(node, ast.Call):  # LazyModule("pipeline.models.sam")
        names = [node.args[0].value]
    elif isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    found = set()
    for name in names:
        while name and name not in modules:  # "pipeline.io.fs.open_input" -> "pipeline.io.fs"
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


def _is_lazy_module(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "LazyModule" and len(node.args) == 1
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))


def import_graph(package: Path) -> dict[str, set[str]]:
    modules = _modules(package)
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[module] = set().union(*(_imported(module, path, n, modules) for n in ast.walk(tree)
                                      if isinstance(n, (ast.Import, ast.ImportFrom)) or _is_lazy_module(n)))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative), each as
    one cycle through it for the message."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(_one_cycle(graph, set(component)))
    return found


def _one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    return paths[node] + [start]
                if child not in paths:
                    paths[child] = paths[node] + [child]
                    nxt.append(child)
        frontier = nxt
    raise AssertionError("a strongly connected component without a cycle")


def test_pipeline_has_no_import_cycle():
    found = cycles(import_graph(ROOT / "pipeline"))
    assert not found, "import cycles in pipeline/:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_walk_sees_lazy_and_relative_imports(tmp_path):
    """The test can fail: a package whose only circle goes through an import inside a function,
    and one through a relative import, are both reported."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import pkg.b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a\n    return a\n")
    (pkg / "sub" / "c.py").write_text("from . import d\n")
    (pkg / "sub" / "d.py").write_text("from ..sub.c import thing\n")
    (pkg / "e.py").write_text("from pkg.sub import c\n")  # no circle
    (pkg / "f.py").write_text("M = LazyModule('pkg.g')\n")
    (pkg / "g.py").write_text("import pkg.f\n")
    found = sorted(cycles(import_graph(pkg)))
    assert found == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.f", "pkg.g", "pkg.f"], ["pkg.sub.c", "pkg.sub.d", "pkg.sub.c"]]


@pytest.mark.parametrize("source, expected", [("import pipeline.io.fs as f\n", {"pipeline.io.fs"}),
                                              ("from pipeline.io import fs\n", {"pipeline.io.fs"}),
                                              ("from pipeline.io.fs import open_input\n", {"pipeline.io.fs"})])
def test_an_import_names_the_module_it_loads(tmp_path, source, expected):
    modules = {"pipeline": Path("pipeline/__init__.py"), "pipeline.io": Path("pipeline/io/__init__.py"),
               "pipeline.io.fs": Path("pipeline/io/fs.py"), "pipeline.x": Path("pipeline/x.py")}
    node = ast.parse(source).body[0]
    assert _imported("pipeline.x", modules["pipeline.x"], node, modules) == expected

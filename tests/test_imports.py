"""How the package's modules depend on each other: no module imports another package's private
(`_name`) helper, counting imports inside functions; a helper used elsewhere is public in its owner."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "birdbone_core"


def _package_of(module: str) -> str:
    """birdbone_core.prune.sequential -> birdbone_core.prune; birdbone_core.steps -> birdbone_core."""
    path = PACKAGE.parent / Path(*module.split("."))
    return module if path.is_dir() else module.rsplit(".", 1)[0]


def test_no_private_name_is_imported_across_packages():
    crossings = []
    for file in sorted(PACKAGE.rglob("*.py")):
        rel = file.relative_to(PACKAGE.parent).with_suffix("")
        here = ".".join(rel.parts[:-1]) if rel.name != "__init__" else ".".join(rel.parts[:-1])
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("birdbone_core"):
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    if private and _package_of(node.module) != here:
                        crossings.append(f"{rel}: from {node.module} import {alias.name}")
    assert not crossings, crossings


def _module_graph() -> dict[str, set[str]]:
    """module -> the birdbone_core modules it imports, at top level or inside functions.

    `from birdbone_core.pkg import sub` counts as importing the submodule `sub`, not the package's
    __init__ (which every submodule import runs anyway)."""
    modules = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        rel = file.relative_to(PACKAGE.parent).with_suffix("")
        modules[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = file
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, file in modules.items():
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("birdbone_core"):
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
                graph[name] |= subs or ({node.module} & set(modules))
                if len(subs) < len(node.names) and node.module in modules:   # names from the module itself
                    graph[name].add(node.module)
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names} & set(modules)
        graph[name].discard(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_counting_imports_inside_functions():
    assert _cycles(_module_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

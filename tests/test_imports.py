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

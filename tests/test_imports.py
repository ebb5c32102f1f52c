"""Imports only go down the layers, and no modules import each other in a circle.

Every module of ``megatron_prefpack`` is parsed with ``ast`` (nothing is imported), and every
``import`` / ``from ... import`` counts, at module level or inside a function: a function-level
import is a dependency all the same, only a later one.

Layers, lowest first: ``data`` < ``attention``, ``losses`` (siblings that do not import each
other) < ``models`` < ``training``. ``platform`` is a utility layer: it may import ``data``
and itself; ``models`` and ``training`` may import it. ``cli.py`` sits on top and may import
anything; the package ``__init__`` imports nothing of the layers.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "megatron_prefpack"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

RANK = {"data": 0, "attention": 1, "losses": 1, "models": 2, "training": 3}
"""Position of each ordered layer: a module may import its own layer or a lower rank."""
PLATFORM_IMPORTS = {"platform", "data"}
PLATFORM_IMPORTERS = {"platform", "models", "training"}
EXEMPT = {f"{PACKAGE}.cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imported_names(name: str, tree: ast.AST) -> Iterator[tuple[int, str]]:
    """``(line, module)`` of every import in ``tree`` (any depth), relative imports resolved
    against module ``name``; ``from X import Y`` yields ``X.Y`` when that is a module."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base


def package_imports(name: str) -> list[tuple[int, str]]:
    """``(line, module)`` of each import of a ``megatron_prefpack`` module by module ``name``
    (itself excluded), in file order."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    found = {
        (line, target)
        for line, target in imported_names(name, tree)
        if target.split(".")[0] == PACKAGE and target != name
    }
    return sorted(found)


def layer(name: str) -> str | None:
    """The layer (first subpackage) of a module; ``None`` for the package itself and ``cli``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in {*RANK, "platform"} else None


def may_import(importer: str, target: str) -> bool:
    if importer == "platform":
        return target in PLATFORM_IMPORTS
    if target == "platform":
        return importer in PLATFORM_IMPORTERS
    return RANK[target] < RANK[importer] or target == importer


def layer_violations(name: str) -> list[str]:
    """``file:line: reason`` for each import of module ``name`` that goes up or sideways."""
    if name in EXEMPT:
        return []
    importer = layer(name)
    path = MODULES[name].relative_to(ROOT.parent)
    found = []
    for line, target in package_imports(name):
        target_layer = layer(target)
        if importer is None and target_layer is not None:
            found.append(f"{path}:{line}: the package root imports {target}")
        elif importer and target_layer and not may_import(importer, target_layer):
            found.append(f"{path}:{line}: {importer} imports {target} ({target_layer})")
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """The nodes reached from ``start`` along one or more edges."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        new = graph[todo.pop()] - seen
        seen |= new
        todo.extend(new)
    return seen


def import_cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """Each set of modules that reach one another through imports (a cycle or several)."""
    reach = {node: reachable(graph, node) for node in graph}
    return {
        frozenset(other for other in reach[node] if node in reach[other])
        for node in graph
        if node in reach[node]
    }


def import_graph() -> dict[str, set[str]]:
    return {name: {t for _, t in package_imports(name) if t in MODULES} for name in MODULES}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_down_the_layers(name):
    found = layer_violations(name)
    assert not found, "\n".join(found)


def test_no_import_cycles():
    cycles = sorted(sorted(c) for c in import_cycles(import_graph()))
    assert not cycles, f"modules that import each other (at any level): {cycles}"


def test_the_checks_catch_what_they_guard_against():
    """The parser sees function-level and relative imports; upward, sideways and platform
    imports are refused; a cycle is found, and a module that only reaches one is not in it."""
    tree = ast.parse(
        "import os\n"
        "def f():\n"
        "    from megatron_prefpack.training import step\n"
        "    from ..losses import dpo\n"
        "    from . import params\n"
    )
    assert sorted(imported_names(f"{PACKAGE}.attention.masks", tree)) == [
        (1, "os"),
        (3, f"{PACKAGE}.training.step"),
        (4, f"{PACKAGE}.losses.dpo"),
        (5, f"{PACKAGE}.attention.params"),
    ]
    assert not may_import("data", "training") and not may_import("attention", "losses")
    assert not may_import("losses", "platform") and not may_import("platform", "models")
    assert may_import("training", "platform") and may_import("platform", "data")
    assert may_import("models", "attention") and may_import("training", "training")
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == {frozenset({"a", "b", "c"})}

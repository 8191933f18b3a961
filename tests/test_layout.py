"""The tree shows the architecture: imports run downward only, and nothing imports in a
circle. Parsed from the source (every import, also those inside functions), so a lazy
import cannot hide a cycle or a layer broken upward."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine"

# Lower numbers sit lower; a module may import its own package, the shared vocabulary
# (rank 0), and packages of a lower rank, never upward or sideways.
RANKS = {"": 0, "metrics": 0, "pb": 0, "amqp": 0, "pipeline": 1, "gate": 1,
         "resource_domain": 1, "fulfilment": 2,
         "process": 3, "admin": 3, "top": 4}
TOP = {"engine.cli", "engine.demo", "engine.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ENGINE.rglob("*.py") if "pb" not in p.parts}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Engine modules `path` imports, resolved to modules (not names inside them)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def package(module: str) -> str:
    if module in TOP:
        return "top"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else ""


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(p, known) - {m} for m, p in mods.items()}


def upward(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in graph.items():
        pkg = package(mod)
        for dep in deps:
            other = package(dep)
            if other == pkg or RANKS[other] == 0:
                continue
            if RANKS[other] >= RANKS[pkg]:
                bad.append(f"{mod} -> {dep}")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_package_is_ranked():
    assert {package(m) for m in modules()} <= set(RANKS)


def test_no_import_runs_upward_or_sideways():
    assert upward(graph()) == []


def test_no_import_cycle():
    assert cycles(graph()) == []


@pytest.mark.parametrize("edges,expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c", "a"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_the_cycle_finder_finds_cycles(edges, expected):
    assert cycles(edges) == expected


def test_the_layer_check_sees_an_upward_import():
    assert upward({"engine.pipeline.reader": {"engine.process.worker"}}) == [
        "engine.pipeline.reader -> engine.process.worker"]
    assert upward({"engine.gate.app": {"engine.pipeline.ids"}}) == [
        "engine.gate.app -> engine.pipeline.ids"]

"""The tree shows the architecture: imports run downward only, and nothing imports in a
circle. Parsed from the source (every import, also those inside functions and under
TYPE_CHECKING, relative ones resolved), so a lazy import cannot hide a cycle or a layer
broken upward.

Inside `engine` the packages are ranked; `engine.testing`, the harness, sits on top:
it may import anything in `engine`, and nothing else in `engine` imports it. The
benchmark (`bench`) and the load test (`loadtest`) stand beside the engine: they
import it, it never imports them, and no import circle runs through them either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = ("engine", "bench", "loadtest")

# Lower numbers sit lower; a module may import its own package, the shared vocabulary
# (rank 0), and packages of a lower rank, never upward or sideways.
RANKS = {"": 0, "metrics": 0, "pb": 0, "amqp": 0, "pipeline": 1, "gate": 1,
         "resource_domain": 1, "fulfilment": 2,
         "process": 3, "admin": 3, "top": 4, "testing": 5}
TOP = {"engine.cli", "engine.demo", "engine.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(trees: tuple[str, ...] = TREES) -> dict[str, Path]:
    """Every module of `trees` (engine/pb is generated: left out)."""
    return {module_name(p): p for tree in trees for p in (ROOT / tree).rglob("*.py")
            if "pb" not in p.relative_to(ROOT).parts}


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The module a `from ... import` names, a relative one resolved against `importer`."""
    if node.level == 0:
        return node.module or ""
    parts = importer.split(".")
    base = parts if is_package else parts[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Modules of `known` that `path` imports, resolved to modules (not names inside them)."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py", known)


def imports_in(source: str, importer: str, is_package: bool, known: set[str]) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, importer, is_package)
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def package(module: str) -> str:
    if module in TOP:
        return "top"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else ""


def graph(trees: tuple[str, ...] = TREES) -> dict[str, set[str]]:
    mods = modules(trees)
    known = set(mods)
    return {m: imports_of(p, known) - {m} for m, p in mods.items()}


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Imports between engine packages that run upward or sideways."""
    bad = []
    for mod, deps in graph.items():
        if not mod.startswith("engine."):
            continue
        pkg = package(mod)
        for dep in deps:
            other = package(dep)
            if not dep.startswith("engine.") or other == pkg or RANKS[other] == 0:
                continue
            if RANKS[other] >= RANKS[pkg]:
                bad.append(f"{mod} -> {dep}")
    return sorted(bad)


def outward(graph: dict[str, set[str]]) -> list[str]:
    """Imports from the engine into the benchmark or the load test."""
    return sorted(f"{mod} -> {dep}" for mod, deps in graph.items() for dep in deps
                  if mod.split(".")[0] == "engine" and dep.split(".")[0] != "engine")


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
    assert {package(m) for m in modules(("engine",))} <= set(RANKS)


def test_every_tree_is_read():
    found = {m.split(".")[0] for m in graph()}
    assert found == set(TREES)
    assert "bench.chaos.runner" in graph() and "loadtest.verify" in graph()


def test_no_import_runs_upward_or_sideways():
    assert upward(graph()) == []


def test_the_engine_imports_neither_the_bench_nor_the_load_test():
    assert outward(graph()) == []


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
    assert upward({"engine.admin.migrate": {"engine.testing.nodes"}}) == [
        "engine.admin.migrate -> engine.testing.nodes"]
    assert outward({"engine.cli": {"bench.env"}}) == ["engine.cli -> bench.env"]


def test_relative_and_lazy_imports_are_resolved():
    """A relative import (from a module or from a package's __init__, one or two levels
    up), inside a function or under TYPE_CHECKING, counts as the module it names."""
    known = {"bench", "bench.bff", "bench.floor", "bench.env", "bench.chaos",
             "bench.chaos.bff", "bench.chaos.runner"}
    lazy = "def measure():\n    from .floor import start_floor\n"
    assert imports_in(lazy, "bench.bff", False, known) == {"bench.floor"}
    assert imports_in("from . import bff\n", "bench.__main__", False, known) == {
        "bench", "bench.bff"}
    typed = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .bff import Bff\n"
    assert imports_in(typed, "bench.chaos.runner", False, known) == {"bench.chaos.bff"}
    assert imports_in("from ..env import x\n", "bench.chaos.runner", False, known) == {
        "bench.env"}
    assert imports_in("from .runner import Fault\n", "bench.chaos", True, known) == {
        "bench.chaos.runner"}


def near_twins(names: list[str]) -> list[tuple[str, str]]:
    """Module names of one package that differ only by a suffix of one or two letters
    (client / clientip, bff / bffab): a reader cannot tell from the names which is which."""
    return [(a, b) for a in names for b in names
            if a != b and b.startswith(a) and len(b) - len(a) <= 2]


def test_no_two_modules_of_a_package_differ_by_a_short_suffix():
    found = []
    for tree in (*TREES, "tests"):
        for package in [ROOT / tree, *(p for p in (ROOT / tree).rglob("*") if p.is_dir())]:
            names = sorted(p.stem for p in package.glob("*.py"))
            found += [f"{package.relative_to(ROOT)}: {a} / {b}" for a, b in near_twins(names)]
    assert not found, found


def test_near_twins_are_found():
    assert near_twins(["client", "clientip", "bff", "bffab", "reader", "redisreader"]) == [
        ("client", "clientip"), ("bff", "bffab")]

"""The layering rule (docs/architecture.md), checked on every import of the package.

Floors, bottom up; a module may import from its own subpackage or from a lower floor, never
from a higher one nor from a sibling subpackage on its own floor, and no two modules may
import each other (directly or round a cycle). Imports inside functions count: a deferred
import is still a dependency. A subpackage or top-level module without a floor fails the
test: place new ones deliberately.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "micronet_jax"

FLOORS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("backend", "distributed", "data"),
    ("models",),
    ("quant",),
    ("train", "scoring"),
    ("evaluation",),
    ("config",),
    ("recipe",),
    ("deploy",),
    ("main", "export", "score", "report"),
)
FLOOR = {unit: rank for rank, units in enumerate(FLOORS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if module_name(p)}


def unit_of(module: str) -> str:
    """The subpackage (or top-level module) a module belongs to: its floor's unit."""
    return module.split(".")[0]


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Package modules `path` imports anywhere in its body (`from a.b import c` counts as
    a.b.c when that is a module, else a.b)."""
    prefix = "micronet_jax."
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(prefix):
            base = node.module.removeprefix(prefix)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix(prefix) for a in node.names)
    return found & known


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {name: imports_of(path, known) - {name} for name, path in modules.items()}


def breaks_the_rule(module: str, dep: str) -> bool:
    """Whether `module` importing `dep` runs up a floor or sideways into a sibling."""
    mine, theirs = unit_of(module), unit_of(dep)
    return mine != theirs and FLOOR[theirs] >= FLOOR[mine]


def test_every_subpackage_has_a_floor():
    missing = sorted({unit_of(m) for m in package_modules()} - set(FLOOR))
    assert not missing, f"give these a floor in tests/test_imports.py: {missing}"


def test_the_top_holds_only_entry_points_errors_and_backend():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert top == sorted(["main", "export", "score", "report", "errors", "backend"])


def test_no_import_runs_back_up_or_sideways():
    broken = [
        f"{module} (floor {FLOOR[unit_of(module)]}) imports {dep} (floor {FLOOR[unit_of(dep)]})"
        for module, deps in sorted(import_graph().items())
        for dep in sorted(deps)
        if breaks_the_rule(module, dep)
    ]
    assert not broken, "\n".join(broken)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize(
    "graph,expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
    ],
)
def test_cycle_finder(graph, expected):
    assert find_cycle(graph) == expected


def test_the_checker_sees_an_upward_import(tmp_path):
    """A function-level import of a higher floor is found, and so is a sibling's."""
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from micronet_jax.recipe.pipeline import run_pipeline\n")
    assert imports_of(source, {"recipe.pipeline", "recipe"}) == {"recipe.pipeline"}
    assert breaks_the_rule("evaluation.plots", "recipe.pipeline")
    assert breaks_the_rule("train.loop", "scoring.counter")  # same floor, other subpackage
    assert not breaks_the_rule("train.loop", "train.steps")
    assert not breaks_the_rule("recipe.pipeline", "evaluation.plots")
    source.write_text("from micronet_jax.train import loop\n")
    assert imports_of(source, {"train.loop", "train"}) == {"train.loop"}

"""Imports run one way: config → data → model → steps → loop → pipeline → report → CLI.

Every module of the package has a layer; a module may import from its own layer or below,
never above, and no two modules may import each other (directly or round a cycle).
Imports inside functions count: a deferred import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "micronet_jax"

# Lowest first. A module not listed here fails the test: place new modules deliberately.
LAYERS: dict[str, tuple[str, ...]] = {
    "base": ("errors", "runtime"),
    "data": ("data.download", "data.cifar", "data.autoaugment", "data.policy", "data.augment"),
    "model": (
        "models.architecture",
        "models.conv",
        "models.layers",
        "models.early_exit",
        "models.efficientnet",
        "models.microbatch",
        "models.fold",
        "pruning",
        "bitwidths",
        "quantization",
        "ptq",
        "scoring",
        "torch_pickle",
        "convert",
        "score",
        "defaults",
        "builders",
    ),
    "steps": (
        "train.state",
        "train.optim",
        "train.losses",
        "train.steps",
        "train.qat",
        "train.guard",
        "train.metrics",
        "train.progress",
        "train.checkpoint",
        "train.sharding",
        "train.watchdog",
        "train.preemption",
        "inference",
        "onnx_export",
        "scorecard",
    ),
    "loop": ("train.loop", "stages", "workdir"),
    "pipeline": ("describe", "pipeline", "validate", "launch"),
    "report": ("plots", "report"),
    "cli": ("main", "export"),
}
RANK = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}
LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}


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


def test_every_module_has_a_layer():
    missing = sorted(set(package_modules()) - set(RANK))
    assert not missing, f"place these modules in a layer of tests/test_imports.py: {missing}"


def test_no_import_runs_back_up():
    upward = [
        f"{module} ({LAYER_OF[module]}) imports {dep} ({LAYER_OF[dep]})"
        for module, deps in sorted(import_graph().items())
        for dep in sorted(deps)
        if module in RANK and dep in RANK and RANK[dep] > RANK[module]
    ]
    assert not upward, "\n".join(upward)


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
    """A function-level import of a higher layer is found (the old pipeline <-> report pair)."""
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from micronet_jax.recipe.pipeline import run_pipeline\n")
    assert imports_of(source, {"pipeline", "report"}) == {"pipeline"}
    source.write_text("from micronet_jax.train import loop\n")
    assert imports_of(source, {"train.loop", "train"}) == {"train.loop"}

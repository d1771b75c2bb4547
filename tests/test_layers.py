"""The layers of the code hold: no module imports one of a higher layer, and no imports form a cycle.

Every import counts, those inside functions too (parsed with `ast`, nothing is imported). The layers, bottom
to top, are declared once, here; README's "Layout" section draws them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO_ROOT

# Bottom to top: a module may import modules of its own layer or of layers below it. The first prefix that
# matches a module name (longest first) gives its layer.
LAYERS: list[tuple[str, ...]] = [
    ("data", "models"),  # images and networks: no Optuna, no search
    ("search.errors", "search.environment", "search.registry", "search.space", "search.families",
     "search.sampling"),  # light definitions the command line reads without torch
    ("search.pipeline",),  # from a data configuration to batches on the device
    ("search.training",),  # optimizer, schedule, loss, one epoch, one evaluation
    ("search.features", "search.family", "search.families."),  # frozen-backbone features; model families
    ("search.trial", "search.predict", "search.pack"),  # the one trial runner, trial packs; predictions
    ("search.optuna_private",),  # the Optuna internals the storage layer needs, in one place
    ("search.storage", "search.rdb_reads", "search.studies", "search.records", "search.progress", "search.warmstart", "search.artifacts",
     "search.provenance", "search.trackers"),  # Optuna: storage, studies, records; trackers, which read records
    ("search.worker", "search.best", "search.launcher", "search.bundle"),  # running trials, retraining the best
    ("search.report", "search.dashboard"),  # what users read
    ("search.services", "search.api"),  # what each command does, for the command line and the Python API
    ("search.commands", "search.cli"),  # the command line
    ("bench",),  # benchmarks, on top of everything
]


def layer_of(module: str) -> int | None:
    if module == "search":  # the package's own __init__: a docstring
        return 1
    matches = [(len(prefix), index) for index, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix.rstrip(".") or module.startswith(prefix if prefix.endswith(".") else prefix + ".")]
    return max(matches)[1] if matches else None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for top in ("data", "models", "search", "bench")
            for path in sorted((REPO_ROOT / top).rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in it (a `from package import name` counts as the package's
    module `name` when there is one)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known}
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, name, set(modules)) for name, path in modules.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, imported in graph.items():
        for target in imported:
            if layer_of(target) is not None and layer_of(module) is not None and layer_of(target) > layer_of(module):
                problems.append(f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})")
    return sorted(problems)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle once, found by depth-first search (package __init__ re-exports included)."""
    found, state = [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_every_module_has_a_layer() -> None:
    assert [m for m in project_modules() if layer_of(m) is None] == []


def test_no_module_imports_a_higher_layer() -> None:
    assert upward_imports(import_graph()) == []


def test_no_imports_form_a_cycle() -> None:
    assert cycles(import_graph()) == []


def test_no_command_module_imports_another() -> None:
    graph = import_graph()
    commands = {m for m in graph if m.startswith("search.commands.") and m != "search.commands.options"}
    assert {m: sorted(graph[m] & commands) for m in commands if graph[m] & commands} == {}


@pytest.mark.parametrize("planted, target", [
    ("from search.training import train_epoch\n", "search.training"),
    ("import search.cli\n", "search.cli"),
])
def test_a_planted_upward_import_is_caught(planted: str, target: str) -> None:
    graph = import_graph()
    path = REPO_ROOT / "search" / "pipeline.py"
    graph["search.pipeline"] = imports_of_text(planted + path.read_text(), "search.pipeline", set(graph))
    expected = (f"search.pipeline (layer {layer_of('search.pipeline')}) imports {target} "
                f"(layer {layer_of(target)})")
    assert expected in upward_imports(graph)


def test_a_planted_cycle_is_caught() -> None:
    graph = import_graph()
    graph["search.space"] = graph["search.space"] | {"search.family"}  # family imports space
    assert ["search.family", "search.space", "search.family"] in cycles(graph)


def imports_of_text(text: str, name: str, known: set[str]) -> set[str]:
    path = REPO_ROOT / ".planted.py"
    try:
        path.write_text(text)
        return imports_of(path, name, known)
    finally:
        path.unlink()

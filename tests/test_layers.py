"""The layer rule of ``docs/architecture.md``, written as code: every import memfit makes (at the
top of a module or inside a function) goes down the layers or stays within one, and the modules
import each other without a cycle. ``planning/`` imports no torch."""

from __future__ import annotations

import ast
import importlib
import pathlib
import sys
from collections.abc import Iterator

import pytest

SRC = pathlib.Path(importlib.import_module("memfit").__file__ or "").parent

# bottom to top; a module belongs to the first entry its dotted name starts with
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("memfit.errors", "memfit.units")),
    ("planning", ("memfit.planning",)),
    ("measuring", ("memfit.measuring",)),
    ("runtime", ("memfit.runtime",)),
    ("verbs", ("memfit.verbs",)),
    (
        "interfaces",
        (
            "memfit.cli",
            "memfit.report",
            "memfit.integrations",
            "memfit.models",
            "memfit.targets",
        ),
    ),
)
ROOT = "memfit"  # the package's __init__: the list of public names, with the interfaces


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    if module == ROOT:
        return len(LAYERS) - 1
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def _imports(module: str) -> Iterator[tuple[str, int]]:
    """The memfit modules ``module`` imports, with the line of each import."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            # `from memfit.planning import baselines` imports the submodule, not the package
            subs = [f"{source}.{alias.name}" for alias in node.names]
            targets = [s for s in subs if s in MODULES] or [source]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "memfit" and target != module:
                while target not in MODULES:
                    target = target.rpartition(".")[0]
                yield target, node.lineno


def test_every_module_is_in_a_layer() -> None:
    assert len(MODULES) > 50
    for module in MODULES:
        _layer(module)


def test_imports_go_down_the_layers() -> None:
    upward = [
        f"{module}:{line} imports {target} "
        f"({LAYERS[_layer(target)][0]}, above {LAYERS[_layer(module)][0]})"
        for module in MODULES
        for target, line in _imports(module)
        if _layer(target) > _layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle() -> None:
    graph = {module: sorted({t for t, _ in _imports(module)}) for module in MODULES}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in graph[module]:
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)) is not None:
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_planning_imports_no_torch() -> None:
    """planning/ imports only the standard library, numpy, scipy and memfit's torch-free base."""
    allowed = {"numpy", "scipy", "memfit"}
    paths = sorted((SRC / "planning").glob("*.py"))
    assert len(paths) >= 10
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in allowed or top in sys.stdlib_module_names, (path.name, name)


def test_the_layers_are_ordered() -> None:
    """runtime/ sits below the verbs, planning/ below measuring/, the package root with the CLI."""
    assert _layer("memfit.runtime.apply") < _layer("memfit.verbs.api")
    assert _layer("memfit.planning.plan") < _layer("memfit.measuring.profile")
    assert _layer(ROOT) == _layer("memfit.cli")


DRAWING = pathlib.Path(__file__).parent.parent / "docs" / "imports.md"


def _unit(module: str) -> str:
    """A module's node in the drawing: its subpackage (``memfit.runtime.rebuild.ops`` ->
    ``runtime``), a verb's own module (``memfit.verbs.api`` -> ``api``: the verbs import each
    other, and the drawing shows between which), or a top-level module itself."""
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "verbs":
        return parts[2]
    return "memfit" if len(parts) == 1 else parts[1]


def drawing() -> str:
    """``docs/imports.md``: memfit's imports between its packages and top-level modules as a
    Mermaid graph, one box per layer, bottom to top; an arrow is one or more imports."""
    units: dict[str, int] = {}
    for module in MODULES:
        units.setdefault(_unit(module), _layer(module))
    edges: dict[tuple[str, str], int] = {}
    for module in MODULES:
        for target, _line in _imports(module):
            pair = (_unit(module), _unit(target))
            if pair[0] != pair[1]:
                edges[pair] = edges.get(pair, 0) + 1
    lines = [
        "# memfit's imports",
        "",
        "Generated by `python -m tests.test_layers > docs/imports.md` from the code;",
        "`tests/test_layers.py` fails when it is out of date. One box per layer of",
        "[architecture.md](architecture.md#layers), bottom to top; an arrow `a --> b` means",
        "a imports b (the number: how many imports). Every arrow points down or stays in its",
        "layer, and there is no cycle (the tests in `tests/test_layers.py` check both).",
        "",
        "```mermaid",
        "flowchart BT",
    ]
    for rank, (name, _prefixes) in enumerate(LAYERS):
        lines.append(f"  subgraph layer_{name} [{name} layer]")
        lines += [f"    {unit}" for unit, layer in sorted(units.items()) if layer == rank]
        lines.append("  end")
    lines += [f"  {a} -->|{n}| {b}" for (a, b), n in sorted(edges.items())]
    lines.append("```")
    return "\n".join(lines) + "\n"


def test_the_drawing_is_current() -> None:
    assert DRAWING.read_text() == drawing(), (
        "docs/imports.md is out of date: python -m tests.test_layers > docs/imports.md"
    )


def test_the_drawing_has_no_upward_arrow_and_no_cycle() -> None:
    """What the drawing shows, checked on its own boxes: a package's modules import each
    other freely, but no two boxes import each other, even through others."""
    ranks = {_unit(m): _layer(m) for m in MODULES}
    reach: dict[str, set[str]] = {unit: set() for unit in ranks}
    for module in MODULES:
        for target, _line in _imports(module):
            assert ranks[_unit(target)] <= ranks[_unit(module)], (module, target)
            if _unit(target) != _unit(module):
                reach[_unit(module)].add(_unit(target))
    for _ in ranks:  # transitive closure, a few dozen boxes
        for unit in reach:
            reach[unit] |= set().union(*(reach[t] for t in reach[unit]))
    assert not [unit for unit in reach if unit in reach[unit]]


if __name__ == "__main__":
    print(drawing(), end="")

"""Imports inside fastsel point one way, counting every import (module level, inside functions and in
``if TYPE_CHECKING:`` blocks: a type-only import is an edge too): no cycles, and no package imports a package
above it in LAYERS."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fastsel"

# The flow, bottom to top: a module may import its own package and the packages below it, never one above.
LAYERS = ["utils", "ops", "hf", "data", "capture", "scores", "pipeline", "plans", "tuners", "train", "cli"]
# top-level modules outside the packages: the root re-exports lazily; __main__ runs the CLI
OUTSIDE = {"fastsel", "fastsel.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The fastsel modules ``path`` imports anywhere in its body (resolved to the deepest existing module)."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py", modules)


def imports_in(source: str, here: str, is_package: bool, modules: set[str]) -> set[str]:
    """The fastsel modules the source of module ``here`` imports anywhere, ``if TYPE_CHECKING:`` blocks included."""
    tree = ast.parse(source)
    package = here if is_package else here.rpartition(".")[0]
    found: set[str] = set()

    def resolve(name: str) -> None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != "fastsel":  # the root package only re-exports
            found.add(name)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                resolve(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(here)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) for p in paths}


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: set[frozenset[str]] = set()
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.add(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        out.add(frozenset(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return out


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}
    assert cycles({"a": {"b"}, "b": set()}) == set()


def test_type_only_imports_are_edges():
    source = ("from typing import TYPE_CHECKING\n"
              "if TYPE_CHECKING:\n    from fastsel.pipeline.config import ScoreConfig\n"
              "    import fastsel.pipeline.context\n"
              "def f():\n    from .checks import NonFiniteError\n")
    modules = {"fastsel.pipeline.registry", "fastsel.pipeline.config", "fastsel.pipeline.context", "fastsel.pipeline.checks"}
    assert imports_in(source, "fastsel.pipeline.registry", False, modules) == {
        "fastsel.pipeline.config", "fastsel.pipeline.context", "fastsel.pipeline.checks"}


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"import cycle(s): {[sorted(c) for c in found]}"


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_sits_in_a_layer():
    stray = [m for m in import_graph() if m not in OUTSIDE and layer_of(m) is None]
    assert not stray, f"modules outside the layered packages {LAYERS}: {stray}"


def test_imports_point_down_the_layers():
    upward = []
    for module, deps in import_graph().items():
        here = layer_of(module)
        if here is None:
            continue
        upward += [f"{module} -> {d}" for d in deps if (layer_of(d) or -1) > here]
    assert not upward, "imports that point up the layers " + " > ".join(LAYERS) + ":\n" + "\n".join(sorted(upward))


def test_the_layer_check_catches_an_upward_import():
    assert layer_of("fastsel.scores.fisher") > layer_of("fastsel.capture.per_example")
    assert layer_of("fastsel.pipeline.drivers.fisher") == LAYERS.index("pipeline")

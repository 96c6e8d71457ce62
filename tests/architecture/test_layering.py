"""The package's layers point one way, and no module imports itself through others.

`LAYERS` is the architecture in one list (ARCHITECTURE.md draws the same): a package may import
from its own package and from packages listed before it, never from one listed after it.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from tests.architecture.imports import Import, all_imports, module_name, source_files

# Bottom to top. The foundation modules come first; the CLI, which only parses and prints, last.
LAYERS = (
    "errors",
    "progress",
    "runtime",
    "tensors",
    "arch",
    "methods",
    "hub",
    "lora",
    "zoo",
    "recipe",
    "sources",
    "lm",
    "engine",
    "align",
    "routing",
    "analysis",
    "pipeline",
    "api",
    "cli",
)
# The package root only re-exports the public API lazily; `__main__` runs the CLI.
ENTRY_POINTS = frozenset({"hfmerge", "hfmerge.__main__"})


def layer_of(module: str) -> str:
    """ "hfmerge.engine.stream" -> "engine"; "hfmerge.errors" -> "errors"."""
    return module.split(".")[1]


def upward(edge: Import) -> bool:
    if edge.importer in ENTRY_POINTS:
        return False
    if edge.imported == "hfmerge":
        return True  # reaching back into the package root from inside it
    return LAYERS.index(layer_of(edge.imported)) > LAYERS.index(layer_of(edge.importer))


def import_graph(edges: list[Import]) -> dict[str, set[str]]:
    """Each importing module's imported modules, self-imports left out."""
    graph: dict[str, set[str]] = defaultdict(set)
    for edge in edges:
        if edge.importer != edge.imported:
            graph[edge.importer].add(edge.imported)
    return graph


class _Tarjan:
    """Tarjan's strongly connected components over one graph: `visit` every node once."""

    def __init__(self, graph: dict[str, set[str]]) -> None:
        self.graph = graph
        self.index: dict[str, int] = {}
        self.low: dict[str, int] = {}
        self.stack: list[str] = []
        self.components: list[list[str]] = []

    def visit(self, node: str) -> None:
        self.index[node] = self.low[node] = len(self.index)
        self.stack.append(node)
        for nxt in self.graph.get(node, ()):
            if nxt not in self.index:
                self.visit(nxt)
                self.low[node] = min(self.low[node], self.low[nxt])
            elif nxt in self.stack:
                self.low[node] = min(self.low[node], self.index[nxt])
        if self.low[node] == self.index[node]:
            self.components.append(self._pop_component(node))

    def _pop_component(self, root: str) -> list[str]:
        """The stack's nodes down to `root`, popped: one strongly connected component."""
        component: list[str] = []
        while True:
            member = self.stack.pop()
            component.append(member)
            if member == root:
                return component


def cycles(edges: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    graph = import_graph(edges)
    tarjan = _Tarjan(graph)
    for node in list(graph):
        if node not in tarjan.index:
            tarjan.visit(node)
    return [sorted(component) for component in tarjan.components if len(component) > 1]


def test_every_package_has_a_layer() -> None:
    modules = {module_name(path) for path in source_files()} - ENTRY_POINTS
    assert {layer_of(module) for module in modules} - set(LAYERS) == set()


def test_imports_point_down_the_layers() -> None:
    wrong = [f"{e.importer}:{e.line} imports {e.imported}" for e in all_imports() if upward(e)]
    assert wrong == []


def test_no_import_cycles() -> None:
    assert cycles(all_imports()) == []


@pytest.mark.parametrize(
    ("importer", "imported", "expected"),
    [
        ("hfmerge.engine.stream", "hfmerge.tensors.writer", False),
        ("hfmerge.tensors.writer", "hfmerge.engine.stream", True),
        ("hfmerge.routing.model", "hfmerge.lm.load", False),
        ("hfmerge.sources.refs", "hfmerge", True),
        ("hfmerge", "hfmerge.pipeline.run", False),
    ],
)
def test_the_rule_itself(importer: str, imported: str, expected: bool) -> None:
    assert upward(Import(importer, imported, 1)) is expected


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    edges = [Import("a", "b", 1), Import("b", "c", 1), Import("c", "a", 1), Import("c", "d", 1)]
    assert cycles(edges) == [["a", "b", "c"]]

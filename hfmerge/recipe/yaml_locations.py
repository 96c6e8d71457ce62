"""Map locations inside a parsed YAML document (key paths) to their line and column."""

from __future__ import annotations

import yaml

from hfmerge.errors import RecipeProblem

Location = tuple[str | int, ...]


def node_positions(root: yaml.Node | None) -> dict[Location, tuple[int, int]]:
    """Every key path in the document -> (line, column), both 1-based.

    A mapping key's position is the key itself, so `unknown key` errors point at the typo.
    """
    positions: dict[Location, tuple[int, int]] = {}
    if root is not None:
        _walk(root, (), positions)
    return positions


def _walk(node: yaml.Node, path: Location, out: dict[Location, tuple[int, int]]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*path, str(key_node.value))
            out[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _walk(value_node, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, index)
            out[child] = (item.start_mark.line + 1, item.start_mark.column + 1)
            _walk(item, child, out)


def locate(
    loc: Location, message: str, positions: dict[Location, tuple[int, int]]
) -> RecipeProblem:
    """A problem at `loc`, placed at the deepest part of that path present in the file."""
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in positions:
            line, column = positions[loc[:depth]]
            return RecipeProblem(_dotted(loc), message, line, column)
    return RecipeProblem(_dotted(loc), message)


def _dotted(loc: Location) -> str:
    return ".".join(str(part) for part in loc)

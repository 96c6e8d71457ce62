"""Reading a recipe's YAML safely, and mapping key paths in it to their line and column.

YAML aliases let a ten-line file stand for billions of values (each alias re-uses a node, and
nine aliases of nine aliases multiply): walking or validating that expansion never ends. So the
document is walked once with a budget of values before anything else looks at it, and a
duplicate key (which YAML silently resolves to its last value) is an error naming both lines.
"""

from __future__ import annotations

from typing import Any

import yaml

from hfmerge.errors import RecipeError, RecipeProblem

Location = tuple[str | int, ...]
Positions = dict[Location, tuple[int, int]]

MAX_VALUES = 100_000  # values in the document with aliases expanded; real recipes have hundreds


def read_yaml(text: str, *, source: str) -> tuple[Any, Positions]:
    """The document in `text` as Python data, and the position of every key path in it.

    Raises:
        RecipeError: not YAML, nested too deeply, expanding past `MAX_VALUES` values through
            aliases, or holding a key twice in one mapping (every duplicate listed).
    """
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # checks the characters already: inside the try
        root = loader.get_single_node()
        walk = _Walk()
        if root is not None:
            walk.visit(root, ())
        if walk.duplicates:
            raise RecipeError(source, walk.duplicates)
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise RecipeError(source, [RecipeProblem("", f"not valid YAML: {exc}", line)]) from None
    except _TooManyValuesError:
        problem = RecipeProblem(
            "",
            f"expands to more than {MAX_VALUES:,} values through YAML aliases (*name); "
            "a recipe needs a few hundred, so this is an alias bomb or a mistake",
        )
        raise RecipeError(source, [problem]) from None
    except RecursionError:
        problem = RecipeProblem("", "nested too deeply to be a recipe")
        raise RecipeError(source, [problem]) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, walk.positions


class _TooManyValuesError(Exception):
    """The walk ran past `MAX_VALUES`; `read_yaml` turns it into a located RecipeError."""


class _Walk:
    """One pass over the composed document: positions, duplicates, and the expansion budget."""

    def __init__(self) -> None:
        self.positions: Positions = {}
        self.duplicates: list[RecipeProblem] = []
        self.values = 0

    def visit(self, node: yaml.Node, path: Location) -> None:
        self.values += 1
        if self.values > MAX_VALUES:
            raise _TooManyValuesError
        if isinstance(node, yaml.MappingNode):
            self._visit_mapping(node, path)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                child = (*path, index)
                self.positions[child] = _position(item)
                self.visit(item, child)

    def _visit_mapping(self, node: yaml.MappingNode, path: Location) -> None:
        seen: dict[str, tuple[int, int]] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = (*path, key)
            where = _position(key_node)
            if key in seen:
                self.duplicates.append(
                    RecipeProblem(
                        _dotted(child),
                        f"duplicate key {key!r}: also at line {seen[key][0]}; YAML would keep "
                        "only the last one, so remove one of them",
                        *where,
                    )
                )
            seen.setdefault(key, where)
            self.positions.setdefault(child, where)
            self.visit(value_node, child)


def _position(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def locate(loc: Location, message: str, positions: Positions) -> RecipeProblem:
    """A problem at `loc`, placed at the deepest part of that path present in the file."""
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in positions:
            line, column = positions[loc[:depth]]
            return RecipeProblem(_dotted(loc), message, line, column)
    return RecipeProblem(_dotted(loc), message)


def _dotted(loc: Location) -> str:
    return ".".join(str(part) for part in loc)

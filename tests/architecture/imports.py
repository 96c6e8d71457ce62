"""The package's import graph, read from the source with `ast` (nothing is imported or run)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support import REPO_ROOT

PACKAGE_ROOT = REPO_ROOT / "hfmerge"


@dataclass(frozen=True)
class Import:
    """One import statement of one module: who imports what, and where."""

    importer: str  # dotted module name, e.g. "hfmerge.engine.stream"
    imported: str  # the dotted module it reads, e.g. "hfmerge.tensors.writer"
    line: int


def module_name(path: Path) -> str:
    """`hfmerge/engine/stream.py` -> "hfmerge.engine.stream"; an `__init__` is its package."""
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    return sorted(PACKAGE_ROOT.rglob("*.py"))


def _known_modules() -> set[str]:
    return {module_name(path) for path in source_files()}


def imports_of(path: Path, known: set[str] | None = None) -> Iterator[Import]:
    """Every hfmerge module that `path` imports, in function bodies and TYPE_CHECKING too."""
    known = _known_modules() if known is None else known
    importer = module_name(path)
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hfmerge":
                    yield Import(importer, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            if base.split(".")[0] != "hfmerge":
                continue
            for alias in node.names:
                # `from hfmerge import hub` reads the module hfmerge.hub, not the package root
                candidate = f"{base}.{alias.name}"
                yield Import(importer, candidate if candidate in known else base, node.lineno)


def all_imports() -> list[Import]:
    known = _known_modules()
    return [edge for path in source_files() for edge in imports_of(path, known)]

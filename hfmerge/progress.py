"""Progress bars on stderr (data goes to stdout), shared by every long-running step."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

stderr_console = Console(stderr=True)


def track(
    items: Iterable[T], *, description: str, total: int | None = None, enabled: bool = True
) -> Iterator[T]:
    """Yield `items`, drawing a progress bar on stderr when `enabled`."""
    if not enabled:
        yield from items
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr_console, transient=False) as bar:
        yield from bar.track(items, total=total, description=description)

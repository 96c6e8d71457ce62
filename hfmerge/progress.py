"""Progress bars on stderr (data goes to stdout), shared by every long-running step."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
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


def _bar() -> Progress:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=stderr_console, transient=False)


def track(
    items: Iterable[T], *, description: str, total: int | None = None, enabled: bool = True
) -> Iterator[T]:
    """Yield `items`, drawing a progress bar on stderr when `enabled`."""
    if not enabled:
        yield from items
        return
    with _bar() as bar:
        yield from bar.track(items, total=total, description=description)


@contextlib.contextmanager
def counter(
    *, description: str, total: int, enabled: bool = True
) -> Iterator[Callable[[int], None]]:
    """A progress bar of `total` steps on stderr when `enabled`, advanced by calling the
    yielded function with a step count, from any thread."""
    if not enabled:
        yield lambda steps: None
        return
    with _bar() as bar:
        task = bar.add_task(description, total=total)
        yield lambda steps: bar.advance(task, steps)

"""Progress bars and messages on stderr (data goes to stdout), shared by every step.

Everything is printed as plain text, never as rich markup: a model path or an error message may
hold `[/]` or `[bold]`, which markup would swallow, restyle or fail on.
"""

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
from rich.text import Text

T = TypeVar("T")

stderr_console = Console(stderr=True)


def format_duration(seconds: float) -> str:
    """`42 s`, `3.5 min` or `1.2 h`: an estimate's length, as a person reads it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def say(message: str, *, prefix: str = "", prefix_style: str = "") -> None:
    """Print `message` to stderr as plain text, after an optional styled `prefix`."""
    line = Text(prefix, style=prefix_style) + Text(message) if prefix else Text(message)
    stderr_console.print(line, highlight=False, soft_wrap=True)


def _bar() -> Progress:
    columns = (
        TextColumn("{task.description}", markup=False),
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

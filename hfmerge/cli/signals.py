"""Signals that end a command become an exception, so staged output is removed on the way out.

Python turns only SIGINT into an exception (KeyboardInterrupt), and typer swallows that into a
plain exit status; SIGTERM and SIGHUP kill the process outright, skipping every clean-up. While a
command runs, all three raise `Interrupted` instead: it unwinds through the output's staging
(`tensors/output.py` removes the folder) to `main`, which prints one line and exits 128 + signal.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from hfmerge.errors import Interrupted

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise `Interrupted` in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be set from the main thread; leave the defaults
        return
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in HANDLED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

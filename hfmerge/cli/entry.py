"""The `hfmerge` console script: the command line, with Python's cyclic GC kept off torch.

Importing torch creates hundreds of thousands of objects that live until the process exits.
With the GC running they are traversed again and again while importing, and once more by the
collection at interpreter exit: a fixed cost on every command, large next to a short merge
(measured in benchmarks/NOTES.md). So torch is imported with the GC paused, and what exists after
the imports, and again after the command, is moved to the permanent generation (`gc.freeze`),
which no collection scans. The GC runs as usual during the command. Only the console script does
this: it owns its process, where tests calling `cli.main` in-process must keep their garbage
collectable.

For the same reason the script ends without the interpreter's teardown: freeing torch's modules
and native state one by one is slow, and by then it serves nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import threading
from typing import NoReturn

# Arguments that only print help: they need neither torch nor its import cost.
_HELP_ONLY = frozenset({"--help", "-h"})


def console_main() -> None:
    """Run the command line on `sys.argv` and exit with its status."""
    args = sys.argv[1:]
    gc.disable()
    try:
        from hfmerge.cli.app import main

        if args and not _HELP_ONLY.intersection(args):
            import torch  # noqa: F401  # every command uses it; imported here, it is frozen
    finally:
        gc.freeze()
        gc.enable()
    exit_without_teardown(main())


def exit_without_teardown(status: int) -> NoReturn:
    """End the process with `status` as `sys.exit` would, minus the teardown of modules.

    What an exit must still do is done: other (non-daemon) threads are joined, exit handlers run
    (`atexit`, weakref finalizers among them) and the standard streams are flushed. Then
    `os._exit` skips freeing every module's objects and torch's native state.
    """
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # what the interpreter runs at exit; no public name exists for it
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing to flush
            stream.flush()
    os._exit(status)

"""The `hfmerge` console script: the command line, with Python's cyclic GC kept off torch.

Importing torch creates about a million objects that live until the process exits. With the GC
running they are traversed again and again while importing, and once more by the collection at
interpreter exit: 0.6 s of a 1.1B-parameter linear merge that takes about five. So torch is
imported with the GC paused, and what exists after the imports, and again after the command, is
moved to the permanent generation (`gc.freeze`), which no collection scans. The GC runs as usual
during the command. Only the console script does this: it owns its process, where tests calling
`cli.main` in-process must keep their garbage collectable.
"""

from __future__ import annotations

import gc
import sys

# Arguments that only print help: they need neither torch nor its import cost.
_HELP_ONLY = frozenset({"--help", "-h"})


def console_main() -> None:
    """Run the command line on `sys.argv` and exit with its status."""
    args = sys.argv[1:]
    gc.disable()
    try:
        from hfmerge.cli import main

        if args and not _HELP_ONLY.intersection(args):
            import torch  # noqa: F401  # every command uses it; imported here, it is frozen
    finally:
        gc.freeze()
        gc.enable()
    status = main()
    gc.freeze()  # the command's objects live until exit too: the last collection skips them
    sys.exit(status)

"""Shared by the benchmarks: run a snippet in a fresh process; report wall time and peak RSS."""

from __future__ import annotations

import subprocess
import sys

# Runs the snippet given as argv[1] with the remaining arguments as its argv, then prints its wall
# time and the process's own peak RSS (so each approach is measured alone, in a fresh process).
_WRAPPER = """
import resource, sys, time
code = sys.argv[1]; sys.argv = sys.argv[1:]
start = time.perf_counter()
exec(compile(code, "<bench>", "exec"), {"__name__": "__main__"})
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def measure(code: str, *args: object) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of `code` run with `args` as its argv in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", _WRAPPER, code, *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
    )
    wall, rss = done.stdout.split()[-2:]
    return float(wall), float(rss)

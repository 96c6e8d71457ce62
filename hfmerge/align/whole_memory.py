"""The memory of the alignment methods that hold both models whole, known before any weight is read.

`weight`, `activation` and the orthogonal methods stream within `--max-memory`
(`matching_memory.py`, `activation_run.py`, `orthogonal.py`). `canonical` reads each model's
tensors whole as float64 to sort them, and `learned` trains through both models held whole beside
A's loaded model and the interpolated one. So their peak grows with the models: about
`BYTES_PER_PARAMETER[method]` per parameter of one model, above what the process already holds. A
budget (or a machine) too small for that is refused before the work starts, with the streaming
methods as the fix.
"""

from __future__ import annotations

import os

from hfmerge.engine.budget import current_rss
from hfmerge.errors import HfMergeError, OptionError
from hfmerge.tensors import format_size

# Peak bytes above the process's own per parameter of one model, measured with `hfmerge align` on a
# 61M-parameter bf16 Llama pair and rounded up: canonical holds one model as float64 at a time;
# learned both, their folded copies, A's loaded model and the interpolated one it trains through.
BYTES_PER_PARAMETER = {"canonical": 10, "learned": 50}
STREAMING_FIX = "use --method weight, activation or weight+orthogonal, which stream within a budget"


def whole_peak_bytes(method: str, parameters: int) -> int:
    """The peak `method` adds to the process for two models of `parameters` each."""
    return BYTES_PER_PARAMETER[method] * parameters


def check_whole_memory(
    method: str, parameters: int, *, max_memory_bytes: int | None, progress: bool
) -> None:
    """Refuse `method` on models of `parameters` each when its peak exceeds `max_memory_bytes` or
    the machine's memory; else say the peak when `progress`. Nothing for the streaming methods.

    Raises:
        OptionError: the peak is over `max_memory_bytes`.
        HfMergeError: the peak is over the machine's physical memory.
    """
    if method not in BYTES_PER_PARAMETER:
        return
    peak = current_rss() + whole_peak_bytes(method, parameters)
    why = (
        f"`{method}` holds both models whole in float64 (not streamed): about "
        f"{format_size(peak)} at peak for two models of {_count(parameters)} parameters each"
    )
    if max_memory_bytes is not None and peak > max_memory_bytes:
        raise OptionError(
            "--max-memory",
            format_size(max_memory_bytes),
            f"is below what `{method}` needs",
            why=why,
            fix=f"{STREAMING_FIX}, or raise --max-memory to at least {format_size(peak)}",
        )
    machine = physical_memory()
    if machine is not None and peak > machine:
        raise HfMergeError(
            f"`{method}` alignment needs more memory than this machine has "
            f"({format_size(machine)})",
            why=why,
            fix=f"{STREAMING_FIX}, or run it on a machine with {format_size(peak)} or more",
        )
    if progress:
        from hfmerge.progress import say

        say(f"{method}: about {format_size(peak)} at peak (both models whole in float64)")


def _count(parameters: int) -> str:
    if parameters >= 10**9:
        return f"{parameters / 1e9:.2g}B"
    if parameters >= 10**6:
        return f"{parameters / 1e6:.3g}M"
    return f"{parameters:,}"


def physical_memory() -> int | None:
    """The machine's physical memory in bytes, where the system says."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


__all__ = ["BYTES_PER_PARAMETER", "check_whole_memory", "physical_memory", "whole_peak_bytes"]

"""The memory of the alignment methods that streaming does not bound, known before any weight is
read: `canonical` and `learned`.

`weight`, `activation` and the orthogonal methods stream within `--max-memory`
(`matching_memory.py`, `activation_run.py`, `orthogonal.py`). `canonical` streams its reads but
holds one group's sort keys at a time, whose size the shapes give (`canonical_peak_bytes`; at LLM
sizes the residual group's: the embedding's and head's columns). `learned` trains through both
models held whole in float64, beside A's loaded model and the interpolated one, so its peak grows
with the models: about `LEARNED_BYTES_PER_PARAMETER` per parameter of one model. Each peak counts
above what the process already holds; a budget (or a machine) too small for it is refused before
the work starts, with the streaming methods as the fix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from hfmerge.align.canonical import canonical_peak_bytes
from hfmerge.arch.spec import ArchSpec
from hfmerge.engine.budget import current_rss
from hfmerge.errors import HfMergeError, OptionError
from hfmerge.tensors import format_size

# Peak bytes above the process's own per parameter of one model, measured with `hfmerge align` on a
# 61M-parameter bf16 Llama pair and rounded up: both models and their folded copies in float64, A's
# loaded model and the interpolated one it trains through.
LEARNED_BYTES_PER_PARAMETER = 50
STREAMING_FIX = "use --method weight, activation or weight+orthogonal, which stream within a budget"


def check_method_memory(
    method: str,
    spec: ArchSpec,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    max_memory_bytes: int | None,
    progress: bool,
) -> None:
    """The peak of `canonical` (one group's sort keys at a time) or `learned` (both models
    whole) for models of these tensor `shapes`, checked and said (`check_peak`); nothing for the
    methods that stream within `--max-memory`."""
    if method == "canonical":
        added, held = canonical_peak_bytes(spec, shapes), "one group's float64 sort keys at a time"
    elif method == "learned":
        parameters = sum(math.prod(shape) for shape in shapes.values())
        added = LEARNED_BYTES_PER_PARAMETER * parameters
        held = f"both models whole in float64 ({_count(parameters)} parameters each)"
    else:
        return
    check_peak(method, added, held=held, max_memory_bytes=max_memory_bytes, progress=progress)


def check_peak(
    method: str, added: int, *, held: str, max_memory_bytes: int | None, progress: bool
) -> None:
    """Refuse `method`, which adds `added` bytes to the process holding `held`, when that is over
    `max_memory_bytes` or the machine's memory; else say the peak when `progress`.

    Raises:
        OptionError: the peak is over `max_memory_bytes`.
        HfMergeError: the peak is over the machine's physical memory.
    """
    peak = current_rss() + added
    why = f"`{method}` holds {held}: about {format_size(peak)} at peak"
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

        say(f"{method}: about {format_size(peak)} at peak ({held})")


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


__all__ = ["LEARNED_BYTES_PER_PARAMETER", "check_method_memory", "check_peak", "physical_memory"]

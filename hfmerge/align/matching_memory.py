"""What weight matching holds at once, known from the shapes before any weight is read.

At any moment weight matching holds: the cached static similarities (`cached_groups`), one group's
similarity being built and solved, with a copy beside it (scipy's LAP negates a maximisation into
a new matrix; an attention group sums its cached and fresh blocks into new ones), a touched tensor
of each model in its stored dtype and B's gathered copy of it, and a few float64 column blocks.
`plan_memory` adds these up and, under a budget, first drops the caches (their similarities are
then summed again at every solve) and then refuses, before the work starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from hfmerge.align.matching_problem import Touch
from hfmerge.align.weights import CHUNK_ELEMENTS, F64, Weights
from hfmerge.arch.spec import ArchSpec, PermGroup
from hfmerge.engine.budget import current_rss
from hfmerge.errors import OptionError
from hfmerge.tensors import format_size

WORKING_COPIES = 3  # a similarity being solved, its copy, and room for the solver's temporaries
TENSOR_COPIES = 3  # A's tensor, B's, and B's gathered copy, all in their stored dtype
CHUNK_COPIES = 4  # a float64 block of each side, and the paired-unit (gate|up) copies of both


def similarity_bytes(group: PermGroup) -> int:
    """Bytes of one group's float64 similarity (an attention group's: its parts' Gram matrices)."""
    if group.kind == "attention":
        queries = (group.num_heads * group.head_dim) ** 2  # q and o parts
        keys = (group.num_kv_heads * group.head_dim) ** 2  # k and v parts
        return F64 * (2 * queries + 2 * keys)
    return F64 * group.size**2


def worth_caching(group: PermGroup, touches: list[Touch], weights: Weights) -> bool:
    """Whether a group's static similarity is kept between solves: it has static touches, and
    they hold more elements than the similarity (summing them again would read more than the
    cache holds; a bias is re-read, an embedding matrix is not)."""
    elements = sum(math.prod(weights.shape(t.tensor)) for t in touches if t.static)
    return elements > similarity_bytes(group) // F64


@dataclass(frozen=True)
class MemoryPlan:
    """Which groups keep their static similarity cached, and the peak bytes matching holds beside
    what the process held before it started."""

    cached_groups: frozenset[str]
    peak_bytes: int

    def announce(self, *, max_memory_bytes: int | None) -> None:
        """Say the plan before the work starts: the memory matching adds to the process's."""
        from hfmerge.progress import say

        within = ""
        if max_memory_bytes is not None:
            within = f", within --max-memory {format_size(max_memory_bytes)}"
        say(
            f"weight matching: about {format_size(current_rss() + self.peak_bytes)} at peak "
            f"({format_size(self.peak_bytes)} of similarities and tensors{within}); "
            "sweeps repeat until one changes no permutation"
        )


def _peak_bytes(
    spec: ArchSpec,
    touches: Mapping[str, list[Touch]],
    a: Weights,
    b: Weights,
    cached: frozenset[str],
) -> int:
    working = max(similarity_bytes(spec.groups[g]) for g, ts in touches.items() if ts)
    names = {t.tensor for ts in touches.values() for t in ts}
    largest = max(max(a.nbytes(n), b.nbytes(n)) for n in names)
    return (
        sum(similarity_bytes(spec.groups[g]) for g in cached)
        + WORKING_COPIES * working
        + TENSOR_COPIES * largest
        + CHUNK_COPIES * CHUNK_ELEMENTS * F64
    )


def plan_memory(
    spec: ArchSpec,
    touches: Mapping[str, list[Touch]],
    a: Weights,
    b: Weights,
    *,
    max_memory_bytes: int | None,
) -> MemoryPlan:
    """The caches to keep and the peak they lead to, within `max_memory_bytes` when given.

    Raises:
        OptionError: the budget, less the process's current resident memory, is below what
            matching needs even without caches.
    """
    worth = frozenset(g for g, ts in touches.items() if worth_caching(spec.groups[g], ts, a))
    plan = MemoryPlan(worth, _peak_bytes(spec, touches, a, b, worth))
    if max_memory_bytes is None:
        return plan
    held = current_rss()
    if held + plan.peak_bytes <= max_memory_bytes:
        return plan
    bare = MemoryPlan(frozenset(), _peak_bytes(spec, touches, a, b, frozenset()))
    if held + bare.peak_bytes <= max_memory_bytes:
        return bare
    largest = max(
        (g for g, ts in touches.items() if ts), key=lambda g: similarity_bytes(spec.groups[g])
    )
    raise OptionError(
        "--max-memory",
        format_size(max_memory_bytes),
        "is below what weight matching needs",
        why=f"weight matching holds about {format_size(bare.peak_bytes)} (group {largest}'s "
        f"float64 similarity, {format_size(similarity_bytes(spec.groups[largest]))}, with its "
        "solver's copies, and the largest tensor of each model) beside the "
        f"{format_size(held)} the process already uses",
        fix=f"raise --max-memory to at least {format_size(held + bare.peak_bytes)}, "
        "or leave it out",
    )

"""How long weight matching's first sweep takes, estimated before any weight is read.

Nearly all of a sweep is two kinds of work, both known from the shapes: the float64 products summed
into each group's similarity (`Problem.add_plain`, `add_heads`), and the assignment solved on it.
The first sweep solves every group once, so its work is fixed; later sweeps re-solve only groups
whose neighbours changed, so their number and length depend on the models and are not predicted.

The machine's speed at both is measured on the spot rather than assumed: one product shaped like
the matching's own blocks (`weights.CHUNK_ELEMENTS` columns against the widest group), and one
assignment on a random similarity, scaled to each group's width by `LAP_EXPONENT`. A random
similarity is about the hardest case for the solver, so the assignments' share errs long.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from hfmerge.align.attention import head_slices
from hfmerge.align.lap import solve_dense_lap
from hfmerge.align.matching_problem import Touch
from hfmerge.align.weights import CHUNK_ELEMENTS, Weights
from hfmerge.arch.spec import ArchSpec, PermGroup
from hfmerge.runtime import fastest_seconds

CALIBRATION_UNITS = 1024  # width of the timed assignment
# Dense assignment time grows about as width^2.2 on random similarities (1024 to 5632 units on the
# 2-core development VM, `benchmarks/bench_lap.py` measures the solvers).
LAP_EXPONENT = 2.2
WIDEST_TIMED_PRODUCT = 4096  # the timed product's width, at most (a few tenths of a second)
WORTH_ESTIMATING_FLOP = 5e10  # below this the first sweep takes about a second: nothing to say


@dataclass(frozen=True)
class SweepWork:
    """The work of one sweep that solves every group once."""

    flop: float  # of the float64 products summed into the similarities
    assignments: tuple[int, ...]  # width of each plain group's assignment

    @classmethod
    def of(cls, spec: ArchSpec, touches: Mapping[str, list[Touch]], weights: Weights) -> SweepWork:
        """The first sweep's work, from the shapes of `weights` (A's or B's: they agree)."""
        flop = 0.0
        widths = []
        for name, group_touches in touches.items():
            if not group_touches:
                continue
            group = spec.groups[name]
            flop += sum(_touch_flop(group, t, weights.shape(t.tensor)) for t in group_touches)
            if group.kind != "attention":  # head-aware solves are many tiny assignments
                widths.append(group.size)
        return cls(flop, tuple(widths))


def _touch_flop(group: PermGroup, touch: Touch, shape: tuple[int, ...]) -> float:
    """FLOP of one touch's product: units x units x the columns per unit, twice (multiply, add)."""
    numel = math.prod(shape)
    if group.kind != "attention":
        return 2.0 * group.size * numel
    rest = numel // shape[touch.axis]  # columns of each row on the touched axis
    parts = head_slices(group, touch.role.layout).values()
    return sum(2.0 * index.numel() ** 2 * rest for index in parts)


@dataclass(frozen=True)
class MachineSpeed:
    """This machine's float64 product rate and dense assignment time, measured just now."""

    flop_per_second: float
    assignment_seconds: float  # one dense assignment of CALIBRATION_UNITS units

    @classmethod
    def measure(cls, widest: int) -> MachineSpeed:
        """Time one product shaped like matching's blocks (`fastest_seconds`) and one
        assignment; about half a second in all."""
        units = max(1, min(widest, WIDEST_TIMED_PRODUCT))
        cols = max(1, CHUNK_ELEMENTS // units)
        generator = torch.Generator().manual_seed(0)
        left = torch.randn(units, cols, generator=generator, dtype=torch.float64)
        right = torch.randn(units, cols, generator=generator, dtype=torch.float64)
        total = torch.zeros(units, units, dtype=torch.float64)
        rate = 2.0 * units * units * cols / fastest_seconds(lambda: total.addmm_(left, right.T))
        similarity = torch.randn(
            CALIBRATION_UNITS, CALIBRATION_UNITS, generator=generator, dtype=torch.float64
        ).numpy()
        return cls(rate, fastest_seconds(lambda: solve_dense_lap(similarity), tries=1))


@dataclass(frozen=True)
class SweepEstimate:
    """The first sweep's predicted time, and what it was predicted from."""

    seconds: float
    work: SweepWork
    speed: MachineSpeed

    @classmethod
    def of(cls, work: SweepWork, speed: MachineSpeed) -> SweepEstimate:
        """Products at the measured rate, plus each assignment scaled from the timed one."""
        products = work.flop / speed.flop_per_second
        assignments = sum(
            speed.assignment_seconds * (width / CALIBRATION_UNITS) ** LAP_EXPONENT
            for width in work.assignments
        )
        return cls(products + assignments, work, speed)

    def announce(self) -> None:
        """Say the estimate before the work starts."""
        from hfmerge.progress import format_duration, say

        widest = max(self.work.assignments, default=0)
        length = format_duration(self.seconds)
        say(
            f"weight matching: the first sweep should take about {length} here "
            f"({self.work.flop / 1e12:.2g} TFLOP of float64 products at the "
            f"{self.speed.flop_per_second / 1e9:.0f} GFLOP/s measured just now, and "
            f"{len(self.work.assignments)} assignments of up to {widest} units); later sweeps "
            "re-solve only the groups whose neighbours changed"
        )


def first_sweep_estimate(
    spec: ArchSpec, touches: Mapping[str, list[Touch]], weights: Weights
) -> SweepEstimate | None:
    """The first sweep's time on this machine, or None when it is too short to be worth saying
    (the measurement itself takes about half a second)."""
    work = SweepWork.of(spec, touches, weights)
    if work.flop < WORTH_ESTIMATING_FLOP:
        return None
    widest = max((spec.groups[g].size for g, ts in touches.items() if ts), default=1)
    return SweepEstimate.of(work, MachineSpeed.measure(widest))


__all__ = ["MachineSpeed", "SweepEstimate", "SweepWork", "first_sweep_estimate"]

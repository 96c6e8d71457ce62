"""Git Re-Basin weight matching (Ainsworth et al. 2023, Algorithm 1) driven by an ArchSpec.

Coordinate ascent on <W_A, P(W_B)>: one group at a time, in a seeded random order per sweep, with
every other group's current permutation applied to B; attention groups use the head-aware solver.
A mixture of experts' expert order is one more assignment step (`align/expert_order.py`); each FF
group of an expert is then matched against A's expert in the slot its B expert lands in.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from hfmerge.align.attention import attention_objective, solve_attention
from hfmerge.align.expert_order import ExpertProfiles, expert_profiles
from hfmerge.align.lap import assignment_value, improves, solve_lap
from hfmerge.align.matching_memory import plan_memory
from hfmerge.align.matching_problem import (
    HeadGrams,
    Problem,
    Touch,
    grams_to_blocks,
    group_touches,
    plain_zeros,
)
from hfmerge.align.matching_time import first_sweep_estimate
from hfmerge.align.weights import Weights
from hfmerge.arch.common import RESIDUAL
from hfmerge.arch.head_maps import HeadMaps
from hfmerge.arch.permute import identity_permutations
from hfmerge.arch.residual import BasisMap
from hfmerge.arch.spec import ArchSpec, AttentionPerm, PermGroup, Permutations
from hfmerge.errors import AlignmentError
from hfmerge.progress import track


@dataclass(frozen=True)
class MatchResult:
    """Permutations that bring B into A's basis: `permute_state_dict(params_b, spec, perms)`.

    Attributes:
        perms: one permutation per group of the spec.
        iterations: sweeps over all groups (weight matching); 1 for activation matching.
        objective: weight matching: <W_A, P(W_B)> after each sweep; activation matching: one
            entry, the sum over groups of the mean matched correlation.
        converged: the last sweep changed no group (weight matching stops there).
        correlation: activation matching only: mean correlation of matched units per group.
        rotation: orthogonal alignment only: [hidden, hidden] Q on B's folded residual stream,
            applied after `perms` (whose residual permutation is then the identity).
        head_maps: orthogonal alignment with head maps only: B's within-head maps of attention
            per KV slot after `perms` (`arch/head_maps.py`).
        seconds: weight matching only: the wall time of each sweep (the first, which solves
            every group, is what `align/matching_time.py` predicts).
    """

    perms: Permutations
    iterations: int
    objective: list[float]
    converged: bool = True
    correlation: dict[str, float] = field(default_factory=dict)
    rotation: torch.Tensor | None = None
    head_maps: HeadMaps | None = None
    seconds: list[float] = field(default_factory=list)

    @property
    def basis(self) -> BasisMap:
        """How B is read into A's basis: the permutations, the fold and rotation and the
        within-head maps if any."""
        return BasisMap(
            self.perms,
            fold=self.rotation is not None,
            rotation=self.rotation,
            head_maps=self.head_maps,
        )


class _GroupStep:
    """One group's coordinate step; the part of its similarity that never changes is cached when
    the memory plan says so (`align/matching_memory.py`), else summed again at each solve."""

    def __init__(
        self, problem: Problem, group: PermGroup, touches: list[Touch], *, cache: bool
    ) -> None:
        self.problem = problem
        self.group = group
        self.dynamic = [t for t in touches if not t.static]
        self.static = [t for t in touches if t.static]
        # Groups on the other axes of the dynamic tensors (itself too where it is on two axes):
        # the similarity depends on their permutations and on nothing else.
        tensors = problem.spec.tensors
        self.neighbours = sorted(
            {
                r.group
                for t in self.dynamic
                for i, r in enumerate(tensors[t.tensor].axes)
                if r is not None and i != t.axis
            }
            # An expert's tensors are compared with the slot their expert lands in.
            | {slot.group for t in self.dynamic if (slot := tensors[t.tensor].expert)}
        )
        self.solved_at: dict[str, int] | None = None  # neighbours' versions at the last solve
        # The static part, summed once and kept when `cache`, else summed again at every solve:
        # the same additions in the same order either way, so the similarity is the same.
        self.cached_plain: torch.Tensor | None = None
        self.cached_grams: HeadGrams | None = None
        if cache and self.static:
            if group.kind == "attention":
                self.cached_grams = self._static_grams()
            else:
                self.cached_plain = self._static_plain()
        self.profiles: ExpertProfiles | None = None
        if group.kind == "experts":
            self.profiles = expert_profiles(problem.spec, group, problem.a, problem.b)
            self.neighbours = sorted({*self.neighbours, RESIDUAL})

    def _static_plain(self) -> torch.Tensor:
        total = plain_zeros(self.group.size)
        # static touches ignore the permutations
        self.problem.add_plain(total, self.static, identity_permutations(self.problem.spec))
        return total

    def _static_grams(self) -> HeadGrams:
        grams: HeadGrams = {}
        identity = identity_permutations(self.problem.spec)  # static touches ignore it
        self.problem.add_heads(grams, self.group, self.static, identity)
        return grams

    def run(self, perms: Permutations, versions: dict[str, int]) -> bool:
        """Re-solve this group against the others' current permutations; True if it changed.

        `versions` counts each group's changes. If no neighbour changed since the last solve, the
        similarity (and so the deterministic LAP) is the same, and solving again cannot change
        anything: skipping is exact, not a heuristic.
        """
        now = {name: versions[name] for name in self.neighbours}
        if self.solved_at == now:
            return False
        changed = self._attention(perms) if self.group.kind == "attention" else self._plain(perms)
        if changed:
            versions[self.group.name] += 1
        # Versions before this step's own change: a group on two axes of one tensor depends on
        # its own permutation, so its change must trigger a new solve.
        self.solved_at = now
        return changed

    def _plain(self, perms: Permutations) -> bool:
        if self.cached_plain is not None:
            similarity = self.cached_plain.clone()
        else:
            similarity = self._static_plain()
        self.problem.add_plain(similarity, self.dynamic, perms)
        if self.profiles is not None:
            residual = perms[RESIDUAL]
            assert isinstance(residual, torch.Tensor)
            similarity = similarity + self.profiles.similarity(residual)
        old = perms[self.group.name]
        assert isinstance(old, torch.Tensor)
        new = solve_lap(similarity)
        if not improves(assignment_value(similarity, new), assignment_value(similarity, old)):
            return False
        perms[self.group.name] = new
        return True

    def _attention(self, perms: Permutations) -> bool:
        if self.cached_grams is not None:
            grams = {part: gram.clone() for part, gram in self.cached_grams.items()}
        else:
            grams = self._static_grams()
        self.problem.add_heads(grams, self.group, self.dynamic, perms)
        blocks = grams_to_blocks(self.group, grams)
        old = perms[self.group.name]
        assert isinstance(old, AttentionPerm)
        new = solve_attention(self.group, blocks)
        if not improves(
            attention_objective(self.group, blocks, new),
            attention_objective(self.group, blocks, old),
        ):
            return False
        perms[self.group.name] = new
        return True


def _checked_names(spec: ArchSpec, a: Weights, b: Weights) -> list[str]:
    """Shared tensor names of A and B, refusing any difference in names or shapes (from the
    shapes alone: nothing is read)."""
    if a.keys() != b.keys():
        only = sorted(set(a) ^ set(b))
        raise AlignmentError(
            f"the two models hold different tensors ({', '.join(only[:5])})",
            fix="align only models of one architecture and size",
        )
    unknown = sorted(n for n in a if n not in spec.tensors)
    if unknown:
        raise AlignmentError(
            f"tensors not in the {spec.family} spec: {', '.join(unknown[:5])}",
            fix="build the spec from the same checkpoint as the tensors",
        )
    # Spec order keeps runs deterministic; buffers (position ids, masks) are never matched.
    names = [n for n, t in spec.tensors.items() if n in a and not t.buffer]
    for name in names:
        if a.shape(name) != b.shape(name):
            raise AlignmentError(
                f"tensor {name} has shape {a.shape(name)} in A and {b.shape(name)} in B",
                fix="align only models of one architecture and size",
            )
    return names


def weight_matching(
    spec: ArchSpec,
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    *,
    seed: int = 0,
    max_iter: int = 100,
    progress: bool = False,
    max_memory_bytes: int | None = None,
    start: Permutations | None = None,
    fixed: frozenset[str] = frozenset(),
) -> MatchResult:
    """Permutations of B's units that maximise <W_A, P(W_B)> (Git Re-Basin weight matching).

    `params_a` and `params_b` are state dicts, or `Weights` read from checkpoints on disk: either
    way the tensors are read one at a time in their stored dtype, and multiplied in float64
    blocks (`align/weights.py`), never held whole as float64. The similarity of a group sums
    every (tensor, axis) the spec says it acts on, vectors such as norm weights and biases
    included (buffers skipped). Memory is about the largest similarity and the largest tensor
    (`align/matching_memory.py`), checked against `max_memory_bytes` before any weight is read.
    Stops after the first sweep that changes no group, or after `max_iter` sweeps. `start`: the
    permutations to start from (default: the identity); `fixed`: groups kept at their start.

    Raises:
        AlignmentError: the models differ in tensors or shapes, or no tensor carries a group.
        OptionError: `max_memory_bytes` is below what the matching needs.
    """
    if max_iter < 1:
        raise ValueError("max_iter must be at least 1")
    a, b = Weights.of(params_a), Weights.of(params_b)
    names = _checked_names(spec, a, b)
    touches = group_touches(spec, names)
    if not any(touches.values()):
        raise AlignmentError(
            "no tensor carries a permutation group",
            fix="pass the models' parameters, not only their buffers",
        )
    memory = plan_memory(spec, touches, a, b, max_memory_bytes=max_memory_bytes)
    solved = {name: ts for name, ts in touches.items() if ts and name not in fixed}
    if progress:
        memory.announce(max_memory_bytes=max_memory_bytes)
        estimate = first_sweep_estimate(spec, solved, a)
        if estimate is not None:
            estimate.announce()
    problem = Problem(spec, a, b, names)
    started = time.perf_counter()  # the first sweep's time includes summing the static caches
    steps = {
        name: _GroupStep(problem, spec.groups[name], ts, cache=name in memory.cached_groups)
        for name, ts in solved.items()
    }
    perms = dict(identity_permutations(spec) if start is None else start)
    # Visit order is a seeded shuffle of the group NAMES, sorted first, so that it depends on the
    # seed alone and not on the order a family module declares its groups: coordinate ascent
    # ends in a different local optimum for each order (the zoo seeds' aligned barrier spans
    # about ±0.07 across orders), and a spec refactor must not move users' results.
    order = sorted(steps)
    generator = torch.Generator().manual_seed(seed)
    versions = dict.fromkeys(spec.groups, 0)
    objective: list[float] = []
    seconds: list[float] = []
    converged = False
    while len(objective) < max_iter and not converged:
        sweep = [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
        description = f"weight matching, sweep {len(objective) + 1}"
        changed = [
            steps[name].run(perms, versions)
            for name in track(sweep, description=description, enabled=progress)
        ]
        objective.append(problem.objective(perms))
        seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        converged = not any(changed)
    return MatchResult(
        perms=perms,
        iterations=len(objective),
        objective=objective,
        converged=converged,
        seconds=seconds,
    )

"""Git Re-Basin weight matching (Ainsworth et al. 2023, Algorithm 1) driven by an ArchSpec.

Coordinate ascent on <W_A, P(W_B)>: one group at a time, in a seeded random order per sweep, with
every other group's current permutation applied to B; attention groups use the head-aware solver.
A mixture of experts' expert order is one more assignment step (`align/expert_order.py`); each FF
group of an expert is then matched against A's expert in the slot its B expert lands in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from hfmerge.align.attention import (
    HeadBlocks,
    add_blocks,
    attention_objective,
    head_blocks,
    head_slices,
    solve_attention,
)
from hfmerge.align.expert_order import ExpertProfiles, expert_profiles, slot_name
from hfmerge.align.lap import assignment_value, improves, solve_lap
from hfmerge.arch.common import RESIDUAL
from hfmerge.arch.permute import identity_permutations, permute_tensor, read_permuted, unit_rows
from hfmerge.arch.spec import (
    ArchSpec,
    AttentionPerm,
    AxisRole,
    PermGroup,
    Permutations,
)
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
    """

    perms: Permutations
    iterations: int
    objective: list[float]
    converged: bool = True
    correlation: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Touch:
    """One axis of one of B's tensors that a group acts on."""

    tensor: str
    axis: int
    role: AxisRole
    static: bool  # no other axis is permuted, nor is it an expert's: its contribution never changes


def _touches(spec: ArchSpec, names: list[str]) -> dict[str, list[_Touch]]:
    """Every (tensor, axis) that each group acts on, by group name."""
    out: dict[str, list[_Touch]] = {name: [] for name in spec.groups}
    for name in names:
        tensor = spec.tensors[name]
        for axis, role in enumerate(tensor.axes):
            if role is None:
                continue
            others = [r for i, r in enumerate(tensor.axes) if i != axis and r is not None]
            static = not others and tensor.expert is None
            out[role.group].append(_Touch(name, axis, role, static=static))
    return out


def _rows(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    """The tensor with `axis` first, flattened behind it: [axis_len, rest]."""
    moved = tensor.movedim(axis, 0)  # [..., axis_len, ...] -> [axis_len, ...]
    return moved.reshape(tensor.shape[axis], -1)  # [axis_len, ...] -> [axis_len, rest]


@dataclass
class _Problem:
    """Both models' float64 tensors and the spec; B is permuted on demand, never in place."""

    spec: ArchSpec
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]

    def a_rows(self, touch: _Touch, perms: Permutations) -> torch.Tensor:
        """A's tensor that B's touched one meets (an expert's: its slot's), as [axis_len, rest]."""
        return _rows(self.a[slot_name(touch.tensor, self.spec, perms)], touch.axis)

    def b_rows(self, touch: _Touch, perms: Permutations) -> torch.Tensor:
        """B's tensor with every axis but the touched one permuted: [axis_len, rest]."""
        tensor_spec = self.spec.tensors[touch.tensor]
        others = tuple(None if i == touch.axis else r for i, r in enumerate(tensor_spec.axes))
        moved = permute_tensor(
            self.b[touch.tensor], replace(tensor_spec, axes=others), self.spec, perms
        )
        return _rows(moved, touch.axis)

    def plain(self, size: int, touches: list[_Touch], perms: Permutations) -> torch.Tensor:
        """[size, size] similarity of A's units (rows) to B's units (columns)."""
        total = torch.zeros(size, size, dtype=torch.float64)
        for touch in touches:
            rows_a = unit_rows(self.a_rows(touch, perms), touch.role.layout)
            rows_b = unit_rows(self.b_rows(touch, perms), touch.role.layout)
            total += rows_a @ rows_b.T
        return total

    def heads(self, group: PermGroup, touches: list[_Touch], perms: Permutations) -> HeadBlocks:
        """Per-part head blocks of one attention group, slices taken from each axis' layout."""
        total: HeadBlocks = {}
        for touch in touches:
            rows_a, rows_b = self.a_rows(touch, perms), self.b_rows(touch, perms)
            for part, where in head_slices(group, touch.role.layout).items():
                index = where.reshape(-1)  # [heads, head_dim] -> [heads*head_dim]
                gram = rows_a[index] @ rows_b[index].T  # [heads*head_dim, heads*head_dim]
                add_blocks(
                    total, part, head_blocks(gram, heads=where.shape[0], head_dim=group.head_dim)
                )
        return total

    def objective(self, perms: Permutations) -> float:
        """<W_A, P(W_B)> over every matched tensor."""
        return sum(
            float((self.a[n] * read_permuted(n, self.b.__getitem__, self.spec, perms)).sum())
            for n in self.a
        )


class _GroupStep:
    """One group's coordinate step; the part of its similarity that never changes is cached."""

    def __init__(self, problem: _Problem, group: PermGroup, touches: list[_Touch]) -> None:
        self.problem = problem
        self.group = group
        self.dynamic = [t for t in touches if not t.static]
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
        static = [t for t in touches if t.static]
        identity = identity_permutations(problem.spec)  # static touches ignore it
        if group.kind == "attention":
            self.static_blocks = problem.heads(group, static, identity)
        else:
            self.static_plain = problem.plain(group.size, static, identity)
        self.profiles: ExpertProfiles | None = None
        if group.kind == "experts":
            self.profiles = expert_profiles(problem.spec, group, problem.a, problem.b)
            self.neighbours = sorted({*self.neighbours, RESIDUAL})

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
        similarity = self.static_plain + self.problem.plain(self.group.size, self.dynamic, perms)
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
        blocks = dict(self.static_blocks)
        for part, value in self.problem.heads(self.group, self.dynamic, perms).items():
            add_blocks(blocks, part, value)
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


def _checked_names(
    spec: ArchSpec, params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor]
) -> list[str]:
    """Shared tensor names of A and B, refusing any difference in names or shapes."""
    if params_a.keys() != params_b.keys():
        only = sorted(set(params_a) ^ set(params_b))
        raise AlignmentError(
            f"the two models hold different tensors ({', '.join(only[:5])})",
            fix="align only models of one architecture and size",
        )
    unknown = sorted(n for n in params_a if n not in spec.tensors)
    if unknown:
        raise AlignmentError(
            f"tensors not in the {spec.family} spec: {', '.join(unknown[:5])}",
            fix="build the spec from the same checkpoint as the tensors",
        )
    # Spec order keeps runs deterministic; buffers (position ids, masks) are never matched.
    names = [n for n, t in spec.tensors.items() if n in params_a and not t.buffer]
    for name in names:
        if params_a[name].shape != params_b[name].shape:
            raise AlignmentError(
                f"tensor {name} has shape {tuple(params_a[name].shape)} in A and "
                f"{tuple(params_b[name].shape)} in B",
                fix="align only models of one architecture and size",
            )
    return names


def _float64(params: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """CPU float64 copies: similarities and LAPs run in float64 on the CPU."""
    return {n: params[n].detach().to(device="cpu", dtype=torch.float64) for n in names}


def weight_matching(
    spec: ArchSpec,
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    *,
    seed: int = 0,
    max_iter: int = 100,
    progress: bool = False,
) -> MatchResult:
    """Permutations of B's units that maximise <W_A, P(W_B)> (Git Re-Basin weight matching).

    Holds both models as float64 copies (buffers skipped); the similarity of a group sums every
    (tensor, axis) the spec says it acts on, vectors such as norm weights and biases included.
    Stops after the first sweep that changes no group, or after `max_iter` sweeps.
    """
    if max_iter < 1:
        raise ValueError("max_iter must be at least 1")
    names = _checked_names(spec, params_a, params_b)
    problem = _Problem(spec, _float64(params_a, names), _float64(params_b, names))
    touches = _touches(spec, names)
    steps = {
        name: _GroupStep(problem, spec.groups[name], touches[name])
        for name in spec.groups
        if touches[name]
    }
    if not steps:
        raise AlignmentError(
            "no tensor carries a permutation group",
            fix="pass the models' parameters, not only their buffers",
        )
    perms = identity_permutations(spec)
    # Visit order is a seeded shuffle of the group NAMES, sorted first, so that it depends on the
    # seed alone and not on the order a family module declares its groups: coordinate ascent
    # ends in a different local optimum for each order (the zoo seeds' aligned barrier spans
    # about ±0.07 across orders), and a spec refactor must not move users' results.
    order = sorted(steps)
    generator = torch.Generator().manual_seed(seed)
    versions = dict.fromkeys(spec.groups, 0)
    objective: list[float] = []
    converged = False
    while len(objective) < max_iter and not converged:
        sweep = [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
        description = f"weight matching, sweep {len(objective) + 1}"
        changed = [
            steps[name].run(perms, versions)
            for name in track(sweep, description=description, enabled=progress)
        ]
        objective.append(problem.objective(perms))
        converged = not any(changed)
    return MatchResult(
        perms=perms, iterations=len(objective), objective=objective, converged=converged
    )

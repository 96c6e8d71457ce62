"""Orthogonal residual alignment (weight mode): one orthogonal map of B's residual stream, found by
Procrustes, alternated with weight matching of the FF and attention groups.

Both models are folded first (`arch/residual.py`: every norm gain moved into its readers, and a
LayerNorm's bias into its readers' biases), so an orthogonal Q on B's residual stream keeps B's
function (with LayerNorms, a Q that fixes the all-ones direction: `residual_factor`). Q maximises
Σ_t ⟨A_t, Q·B_t⟩ over every tensor t with a residual axis (that axis' rows multiplied by Q):
with C = Σ_t rows_A · rows_Bᵀ ([hidden, hidden]) and C = U S Vᵀ, Q = U Vᵀ. A residual permutation
is a special Q, so the residual group of weight matching is redundant here: its answer is only the
starting Q. Then Procrustes (given the FF / attention permutations) and weight matching (given Q,
residual group fixed) take turns, each from the other's last answer, until the objective stops
improving. Permutations act on other axes than Q, so the two commute on every tensor.

Neither model is held: both are read one tensor at a time, folded (and B rotated) on read
(`mapped_weights`), by every pass that needs them: Procrustes' cross sum, the objective, and the
streamed weight matching, which `max_memory_bytes` bounds as it bounds plain weight matching.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from hfmerge.align.weight_matching import MatchResult, weight_matching
from hfmerge.align.weights import F64, Weights, axis_rows
from hfmerge.arch.common import RESIDUAL
from hfmerge.arch.head_maps import HeadMaps
from hfmerge.arch.permute import identity_permutations
from hfmerge.arch.residual import (
    FOLDED,
    BasisMap,
    lift_rotation,
    mapped_names,
    read_in_basis,
    residual_axes,
    rotation_space,
)
from hfmerge.arch.spec import ArchSpec, AxisRole, Permutations
from hfmerge.progress import track

MAX_ROUNDS = 20
TOLERANCE = 1e-9  # relative objective gain below which the alternation has converged


def mapped_weights(spec: ArchSpec, params: Mapping[str, torch.Tensor], basis: BasisMap) -> Weights:
    """`params` read through `basis` in float64, one tensor at a time when asked for (a folded
    tied head added untied): what `map_state_dict` holds, without holding it."""
    source = Weights.of(params)
    names = mapped_names(spec, list(source), basis)
    shapes = {name: source.shape(spec.tied.get(name, name)) for name in names}

    def read(name: str) -> torch.Tensor:
        return read_in_basis(name, lambda n: source[n].double(), spec, basis)

    return Weights(read, shapes, {name: F64 * math.prod(s) for name, s in shapes.items()})


def residual_rows(tensor: torch.Tensor, axes: tuple[AxisRole | None, ...]) -> torch.Tensor | None:
    """The tensor's residual axis first, the rest flattened: [hidden, rest]; None without one."""
    found = residual_axes(axes)
    if len(found) != 1:
        return None  # no residual axis (q/k/v biases, per-head norms); none has two
    return axis_rows(tensor, found[0])  # [hidden, rest]


def axes_of(spec: ArchSpec, name: str) -> tuple[AxisRole | None, ...]:
    """A tensor's axis roles; an untied head takes those of the tensor it was tied to."""
    return spec.tensors[spec.tied.get(name, name)].axes


def procrustes(
    spec: ArchSpec,
    folded_a: Mapping[str, torch.Tensor],
    folded_b: Mapping[str, torch.Tensor],
    perms: Permutations,
    head_maps: HeadMaps | None = None,
) -> torch.Tensor:
    """[hidden, hidden] orthogonal Q maximising Σ ⟨A_t, Q·π(B)_t⟩ over the residual axes.

    Both models folded (norm gains 1, skipped: they are the same in both). `perms`' residual
    permutation should be the identity, Q takes its place; B's within-head maps, if given, are
    applied after `perms` (they act on other axes than Q).
    """
    hidden = spec.groups[RESIDUAL].size
    cross = torch.zeros(hidden, hidden, dtype=torch.float64)
    moved = BasisMap(perms, head_maps=head_maps)
    for name, tensor_a in folded_a.items():
        if name in spec.norm_readers:
            continue
        rows_a = residual_rows(tensor_a, axes_of(spec, name))
        if rows_a is None:
            continue
        tensor_b = read_in_basis(name, folded_b.__getitem__, spec, moved)
        rows_b = residual_rows(tensor_b, axes_of(spec, name))
        assert rows_b is not None
        cross += rows_a @ rows_b.T  # [hidden, rest] @ [rest, hidden]
    return residual_factor(spec, cross)


def residual_factor(spec: ArchSpec, cross: torch.Tensor) -> torch.Tensor:
    """The residual Q maximising tr(Qᵀ C) among those keeping `spec`'s function: any orthogonal
    Q, or with centred norms one fixing the all-ones direction (`rotation_space`).

    With U the [hidden, hidden − 1] basis of 1⊥, such a Q is U·R·Uᵀ + 11ᵀ/d for an orthogonal R,
    and tr(Qᵀ C) = tr(Rᵀ·Uᵀ C U) + 1ᵀ C 1/d: R is the Procrustes answer for Uᵀ C U, lifted.
    """
    space = rotation_space(spec)
    if space is None:
        return orthogonal_factor(cross)
    inner = space.T @ cross.to(space.dtype) @ space  # [hidden − 1, hidden − 1]
    return lift_rotation(space, orthogonal_factor(inner))


def orthogonal_factor(cross: torch.Tensor) -> torch.Tensor:
    """The orthogonal Q maximising tr(Qᵀ C) for C = Σ a bᵀ [hidden, hidden]: U Vᵀ of C's SVD.

    So Q maximises Σ ⟨a, Q b⟩: it reads B's vectors b into A's basis.
    """
    u, _, vh = torch.linalg.svd(cross)
    rotation: torch.Tensor = u @ vh  # [hidden, hidden], orthogonal
    return rotation


def basis_objective(
    spec: ArchSpec,
    folded_a: Mapping[str, torch.Tensor],
    folded_b: Mapping[str, torch.Tensor],
    basis: BasisMap,
) -> float:
    """⟨A, B read through `basis`⟩ over every folded tensor."""
    return sum(
        float((a * read_in_basis(name, folded_b.__getitem__, spec, basis)).sum())
        for name, a in folded_a.items()
    )


def _permutation_matrix(perm: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix P of a gather index: (P h)[i] = h[perm[i]]."""
    return torch.eye(perm.numel(), dtype=torch.float64)[perm.long()]  # [hidden, hidden]


def orthogonal_matching(
    spec: ArchSpec,
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    *,
    seed: int = 0,
    max_rounds: int = MAX_ROUNDS,
    progress: bool = False,
    start: MatchResult | None = None,
    max_memory_bytes: int | None = None,
) -> MatchResult:
    """B's permutations and residual rotation into A's basis (`MatchResult.rotation` set).

    `params_*`: every non-buffer tensor of the checkpoint (a tied head absent, as saved), as
    state dicts or `Weights` read from disk. `start`: permutations (residual identity) and
    rotation to alternate from, instead of a first weight matching. `max_memory_bytes`: weight
    matching's budget (`align/matching_memory.py`).
    """
    folded_a, folded_b = (
        mapped_weights(spec, params_a, FOLDED),
        mapped_weights(spec, params_b, FOLDED),
    )
    saved = [n for n in folded_a if n in spec.tensors]  # weight matching: the spec's own names
    if start is not None and start.rotation is not None:
        perms, rotation = start.perms, start.rotation
    else:
        first = weight_matching(
            spec,
            folded_a.subset(saved),
            folded_b.subset(saved),
            seed=seed,
            progress=progress,
            max_memory_bytes=max_memory_bytes,
        )
        residual = first.perms[RESIDUAL]
        assert isinstance(residual, torch.Tensor)
        perms = {**first.perms, RESIDUAL: identity_permutations(spec)[RESIDUAL]}
        rotation = _permutation_matrix(residual)
    objective = [basis_objective(spec, folded_a, folded_b, BasisMap(perms, True, rotation))]
    converged = False
    for _ in track(range(max_rounds), description="orthogonal alignment", enabled=progress):
        rotation = procrustes(spec, folded_a, folded_b, perms)
        turned = BasisMap(fold=True, rotation=rotation)
        perms = weight_matching(
            spec,
            folded_a.subset(saved),
            mapped_weights(spec, folded_b, turned).subset(saved),
            seed=seed,
            start=perms,
            fixed=frozenset({RESIDUAL}),
            max_memory_bytes=max_memory_bytes,
        ).perms
        objective.append(basis_objective(spec, folded_a, folded_b, BasisMap(perms, True, rotation)))
        if objective[-1] - objective[-2] <= TOLERANCE * abs(objective[-2]):
            converged = True
            break
    return MatchResult(
        perms=perms,
        iterations=len(objective) - 1,
        objective=objective,
        converged=converged,
        rotation=rotation,
    )


__all__ = [
    "basis_objective",
    "mapped_weights",
    "orthogonal_factor",
    "orthogonal_matching",
    "procrustes",
    "residual_factor",
    "residual_rows",
]

"""Solving B's within-head maps (`arch/head_maps.py`) so that its heads' weights come close to A's.

Both models are read as the orthogonal alignment leaves them (B permuted, folded and rotated, A
folded). Per attention group and KV slot, each part's rows are laid out head dim first
([head_dim, rest]: the rows of q, k and v and their biases, and the transposed input columns of
o_proj), and two Procrustes problems are solved:

- Q/K, per RoPE pair (dims i, j of the head): the 2-D rotation R maximising Σ ⟨a, R b⟩ over the
  pair's rows of every query head of the slot and of its key head: with C = Σ a bᵀ (2x2), R's
  angle is atan2(C₁₀ - C₀₁, C₀₀ + C₁₁). Without RoPE (GPT-2), the orthogonal U Vᵀ of the whole
  head's C. The identity where Q/K maps are not exact (q/k norms, partial RoPE).
- V/O: the orthogonal M = U Vᵀ of C = Σ v_A v_Bᵀ + Σ o_A o_Bᵀ = U S Vᵀ (M⁻ᵀ = M, so o_proj's
  columns take M as the values do).

The maps could be any invertible M and any scaled pair rotation (`arch/head_maps.py` applies and
the tests check those too); on the zoo's Llama seeds the least-squares invertible M (fitted
numerically, condition numbers 2-2.6) lowered the barrier no further than the orthogonal one,
so the solver keeps to Procrustes, which is closed-form and cannot be ill-conditioned.

`head_map_matching` (`weight+orthogonal`) runs after `orthogonal_matching` (its permutations
kept) and alternates the head maps with the residual Procrustes, each given the other, while the
objective improves. Within-head maps blur the head scores of the weight matching that ran before
them, so the whole is swept again on B mapped within its own heads, up to `MAX_SWEEPS` times:
with one sweep, permutations, a rotation and head maps planted together came back only to 0.86
in the weights of a tiny Llama; with six, to 3e-5. `activation+orthogonal` adds the head maps once
to its activation-matched permutations and rotation (`with_head_maps`).

Neither model is held: both are read one tensor at a time through their maps
(`orthogonal.mapped_weights`), and the head maps are solved one attention group at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch

from hfmerge.align.orthogonal import (
    MAX_ROUNDS,
    TOLERANCE,
    basis_objective,
    mapped_weights,
    orthogonal_factor,
    orthogonal_matching,
    procrustes,
)
from hfmerge.align.weight_matching import MatchResult
from hfmerge.align.weights import axis_rows
from hfmerge.arch.head_maps import (
    HeadMap,
    HeadMaps,
    compose_head_maps,
    head_parts,
    pair_map,
    permuted_head_maps,
    qk_maps_exact,
    rotary_pairs,
)
from hfmerge.arch.permute import invert
from hfmerge.arch.residual import FOLDED, BasisMap, read_in_basis
from hfmerge.arch.spec import ArchSpec, Layout, PermGroup

MAX_SWEEPS = 5  # most sweeps of weight matching on B mapped within its own heads
_PARTS = {Layout.Q: "q", Layout.K: "k", Layout.V: "v", Layout.O: "o"}
PartRows = dict[str, list[torch.Tensor]]  # part -> one [heads, head_dim, rest] block per tensor
Rows = dict[str, PartRows]  # attention group -> its parts' rows


def head_rows(spec: ArchSpec, get: Callable[[str], torch.Tensor], only: str | None = None) -> Rows:
    """Every attention tensor's head-major axis as [heads, head_dim, rest] float64 blocks; of
    attention group `only`'s tensors alone when given (one layer's, not the model's)."""
    rows: Rows = {}
    for name, tensor_spec in spec.tensors.items():
        for axis, role in enumerate(tensor_spec.axes):
            if role is None or spec.groups[role.group].kind != "attention":
                continue
            if only is not None and role.group != only:
                continue
            group = spec.groups[role.group]
            flat = axis_rows(get(name).double(), axis)  # [axis_len, rest]
            for layout, index in head_parts(group, role.layout):  # a fused axis: q, k and v
                blocks = flat[index].reshape(-1, group.head_dim, flat.shape[1])  # [heads, d, rest]
                rows.setdefault(role.group, {}).setdefault(_PARTS[layout], []).append(blocks)
    return rows


def _slot_rows(group: PermGroup, parts: PartRows, part: str, slot: int) -> list[torch.Tensor]:
    """The [head_dim, rest] blocks of one KV slot in one part: its query heads for q and o."""
    per_kv = group.queries_per_kv
    heads = range(slot * per_kv, (slot + 1) * per_kv) if part in ("q", "o") else (slot,)
    return [blocks[h] for blocks in parts.get(part, []) for h in heads]


def _cross(a: list[torch.Tensor], b: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Σ a bᵀ over matching [head_dim, rest] blocks: [head_dim, head_dim]."""
    total = torch.zeros(dim, dim, dtype=torch.float64)
    for block_a, block_b in zip(a, b, strict=True):
        total += block_a @ block_b.T  # [d, rest] @ [rest, d]
    return total


def pair_rotations(pairs: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """[head_dim, head_dim]: per RoPE pair ([pairs, 2] dims) the rotation maximising tr(Rᵀ C)."""
    first, second = pairs[:, 0], pairs[:, 1]
    c00, c01 = cross[first, first], cross[first, second]  # [pairs] each
    c10, c11 = cross[second, first], cross[second, second]
    angle = torch.atan2(c10 - c01, c00 + c11)  # [pairs]
    cos, sin = torch.cos(angle), torch.sin(angle)
    rows = (torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1))  # [pairs, 2] each
    return pair_map(pairs, torch.stack(rows, -2))  # blocks [pairs, 2, 2]


def _qk_map(
    group: PermGroup, pairs: torch.Tensor | None, a: PartRows, b: PartRows, slot: int
) -> torch.Tensor:
    """Slot `slot`'s Q/K map, from its query heads' and key head's rows: a rotation of each RoPE
    pair, or with `pairs` None (no RoPE) the orthogonal Procrustes map of the whole head."""
    rows_a = _slot_rows(group, a, "q", slot) + _slot_rows(group, a, "k", slot)
    rows_b = _slot_rows(group, b, "q", slot) + _slot_rows(group, b, "k", slot)
    cross = _cross(rows_a, rows_b, group.head_dim)
    return orthogonal_factor(cross) if pairs is None else pair_rotations(pairs, cross)


def _vo_map(group: PermGroup, a: PartRows, b: PartRows, slot: int) -> torch.Tensor:
    """Slot `slot`'s orthogonal V/O map: Procrustes on its value rows and o_proj columns."""
    dim = group.head_dim
    v_a, v_b = _slot_rows(group, a, "v", slot), _slot_rows(group, b, "v", slot)
    o_a, o_b = _slot_rows(group, a, "o", slot), _slot_rows(group, b, "o", slot)
    return orthogonal_factor(_cross(v_a, v_b, dim) + _cross(o_a, o_b, dim))


def solve_head_maps(
    spec: ArchSpec,
    folded_a: Mapping[str, torch.Tensor],
    folded_b: Mapping[str, torch.Tensor],
    basis: BasisMap,
) -> HeadMaps:
    """B's within-head maps after `basis` (its permutations, fold and rotation; its own head
    maps are ignored). Q/K maps are the identity where they would not be exact."""
    moved = BasisMap(basis.perms, basis.fold, basis.rotation)
    with_qk = qk_maps_exact(spec)
    maps: HeadMaps = {}
    # One attention group (one layer) at a time: its rows only are held, never the model's.
    for name in (g for g, group in spec.groups.items() if group.kind == "attention"):
        a = head_rows(spec, folded_a.__getitem__, only=name).get(name)
        if a is None:
            continue  # a group no tensor of this checkpoint carries
        b = head_rows(
            spec, lambda n: read_in_basis(n, folded_b.__getitem__, spec, moved), only=name
        )[name]
        group = spec.groups[name]
        pairs = rotary_pairs(spec, group.head_dim) if spec.rotary else None
        eye = torch.eye(group.head_dim, dtype=torch.float64)
        slots = range(group.num_kv_heads)
        qk = [_qk_map(group, pairs, a, b, g) if with_qk else eye for g in slots]
        vo = [_vo_map(group, a, b, g) for g in slots]
        maps[name] = HeadMap(qk=torch.stack(qk), vo=torch.stack(vo))  # [kv, d, d] each
    return maps


def head_map_matching(
    spec: ArchSpec,
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    *,
    seed: int = 0,
    sweeps: int = MAX_SWEEPS,
    progress: bool = False,
    max_memory_bytes: int | None = None,
) -> MatchResult:
    """`weight+orthogonal`: `orthogonal_matching`, then B's within-head maps alternated with the
    residual Procrustes (`with_head_maps`); then again on B mapped within its own heads, so that
    weight matching sees heads already turned towards A's, for up to `sweeps` sweeps while the
    objective improves (each sweep after the first starts from the last one's answer). Both
    models are read one tensor at a time (state dicts or `Weights` from disk); weight matching
    within `max_memory_bytes` when given."""
    own: HeadMaps = {}  # B's head maps so far, on its own KV heads (before any permutation)
    best: MatchResult | None = None
    for _ in range(sweeps):
        mapped_b = mapped_weights(spec, params_b, BasisMap(head_maps=own)) if own else params_b
        # Later sweeps start from the last permutations and rotation, which read the mapped B
        # as they read B with the last head maps.
        found = orthogonal_matching(
            spec,
            params_a,
            mapped_b,
            seed=seed,
            progress=progress,
            start=best,
            max_memory_bytes=max_memory_bytes,
        )
        result = with_head_maps(spec, params_a, mapped_b, found, rounds=MAX_ROUNDS)
        assert result.head_maps is not None
        total = compose_head_maps(permuted_head_maps(spec, result.perms, own), result.head_maps)
        result = dataclasses.replace(result, head_maps=total)
        if best is not None and not result.objective[-1] > best.objective[-1] * (1 + TOLERANCE):
            break
        best = result
        own = permuted_head_maps(spec, invert(spec, result.perms), total)
    assert best is not None
    return best


def with_head_maps(
    spec: ArchSpec,
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    found: MatchResult,
    *,
    rounds: int = 0,
) -> MatchResult:
    """`found` (permutations and residual rotation) with B's within-head maps added; then, for
    up to `rounds` rounds while the objective improves, Procrustes given the head maps and the
    head maps given the new rotation (the permutations kept). `rounds=0` keeps `found`'s
    rotation (an activation-matched one)."""
    assert found.rotation is not None
    folded_a, folded_b = (
        mapped_weights(spec, params_a, FOLDED),
        mapped_weights(spec, params_b, FOLDED),
    )
    perms, rotation = found.perms, found.rotation
    maps = solve_head_maps(spec, folded_a, folded_b, BasisMap(perms, True, rotation))
    objective = [basis_objective(spec, folded_a, folded_b, BasisMap(perms, True, rotation, maps))]
    converged = rounds == 0
    for _ in range(rounds):
        turned = procrustes(spec, folded_a, folded_b, perms, maps)
        solved = solve_head_maps(spec, folded_a, folded_b, BasisMap(perms, True, turned))
        value = basis_objective(spec, folded_a, folded_b, BasisMap(perms, True, turned, solved))
        if value - objective[-1] <= TOLERANCE * abs(objective[-1]):
            converged = True
            break
        rotation, maps = turned, solved
        objective.append(value)
    return dataclasses.replace(
        found,
        iterations=found.iterations + len(objective),
        objective=found.objective + objective,
        converged=found.converged and converged,
        rotation=rotation,
        head_maps=maps,
    )


__all__ = [
    "head_map_matching",
    "head_rows",
    "pair_rotations",
    "solve_head_maps",
    "with_head_maps",
]

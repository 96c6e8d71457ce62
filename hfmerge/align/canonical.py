"""Canonical unit order: every permutation group of a spec put into a normal form by its weights.

Two checkpoints that differ only by a valid permutation of their spec's groups get the same
canonical permutations' result, tensor for tensor and bit for bit, so canonical order is also an
alignment method (`align: {method: canonical}`): each model goes to its own normal form, and B
into A's basis is B's canonical order followed by the inverse of A's.

Groups are fixed in the order residual, FF, experts, attention (spec order inside a kind). A
unit's key is built only from tensor slices whose other axes are unpermuted or belong to groups
already fixed, so it does not depend on any permutation still free: the residual units are keyed
by the embedding's columns (and every other residual-only slice), FF units by their rows and
columns in the now fixed residual basis (an expert's FF group by that expert's own tensors,
wherever it sits). Experts are keyed by their whole normal form: the router row and every tensor
of the expert in the fixed residual and FF orders. Units sort by their key's squared norm,
largest first; equal norms fall back to the key itself, compared lexicographically.

Attention is fixed bottom-up inside each KV head, then across KV heads: V/O dims (key: the V row
and the multiset of the O columns of the head's queries), free Q/K dims likewise (K row, Q rows;
rotary dims stay pinned), then query heads (their Q and O slices in the fixed dims), then KV
heads by the whole head's normal form, which is invariant to every order inside it.
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterator, Mapping
from dataclasses import dataclass, replace

import torch

from hfmerge.align.attention import PARTS, head_slices
from hfmerge.align.weights import F64
from hfmerge.arch.permute import permute_tensor, unit_rows
from hfmerge.arch.spec import ArchSpec, AttentionPerm, AxisRole, PermGroup, Permutations
from hfmerge.errors import AlignmentError

# Each kind's keys need the ones before: expert keys read every expert in its fixed FF order.
_KIND_ORDER = {"residual": 0, "ff": 1, "experts": 2, "attention": 3}
KEY_COPIES = 3  # a group's float64 keys as slices, joined, and squared for their norms


def canonical_order(keys: torch.Tensor) -> torch.Tensor:
    """[n, m] unit keys -> [n] gather index: squared norm descending, ties lexicographic.

    The norm is a float64 sum over each row in the same order whatever the rows' order, so it is
    bit-identical for the same key wherever the unit sits; only exactly equal keys stay in input
    order (and then the units they order read the same on every axis the key covers).
    """
    keys64 = keys.to(torch.float64)
    norms = (keys64 * keys64).sum(dim=1)  # [n]
    order = torch.argsort(-norms, stable=True).tolist()
    sorted_norms = norms[order].tolist()
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and sorted_norms[end] == sorted_norms[start]:
            end += 1
        if end - start > 1:  # a run of equal norms: order it by the keys themselves
            order[start:end] = sorted(order[start:end], key=lambda unit: keys64[unit].tolist())
        start = end
    return torch.tensor(order, dtype=torch.long)


def _multisets(rows: torch.Tensor) -> torch.Tensor:
    """[n, p, m] -> [n, p*m]: each of the n sets of p rows in canonical order, flattened.

    Invariant to the order of the p rows: what a key needs from units that are not yet fixed.
    """
    if rows.shape[1] == 1:
        return rows.reshape(rows.shape[0], -1)  # [n, 1, m] -> [n, m]
    return torch.stack([item[canonical_order(item)].reshape(-1) for item in rows])


@dataclass(frozen=True)
class _Slice:
    """One tensor axis that a group acts on, read where every other axis is already fixed."""

    rows: torch.Tensor  # [axis_len, rest]: the axis first, the other axes flattened behind it
    role: AxisRole


def _key_axes(
    spec: ArchSpec, names: Container[str], group: str, fixed: Container[str]
) -> Iterator[tuple[str, int, AxisRole]]:
    """(tensor, axis, role) of every axis of `group` whose other axes are unpermuted or in
    `fixed`: the slices that key its units."""
    for name, tensor_spec in spec.tensors.items():
        if name not in names:
            continue
        for axis, role in enumerate(tensor_spec.axes):
            others = [r for i, r in enumerate(tensor_spec.axes) if i != axis and r is not None]
            if role is None or role.group != group:
                continue
            if any(r.group not in fixed for r in others):
                continue  # a free group on another axis would leak its order into the key
            yield name, axis, role


def _fixed_slices(
    spec: ArchSpec, params: Mapping[str, torch.Tensor], group: str, perms: Permutations
) -> list[_Slice]:
    """Every axis of `group` whose other axes are unpermuted or in `perms`, in the fixed basis."""
    out = []
    for name, axis, role in _key_axes(spec, params, group, perms):
        tensor_spec = spec.tensors[name]
        kept = tuple(None if i == axis else r for i, r in enumerate(tensor_spec.axes))
        moved = permute_tensor(params[name], replace(tensor_spec, axes=kept), spec, perms)
        rows = moved.movedim(axis, 0)  # [..., axis_len, ...] -> [axis_len, ...]
        out.append(_Slice(rows.reshape(moved.shape[axis], -1).to(torch.float64), role))
    if not out:
        raise AlignmentError(
            f"cannot put group {group!r} of this {spec.family} model into canonical order",
            why="no tensor reads or writes its units with every other axis already fixed",
            fix="use weight or activation matching for this architecture",
        )
    return out


def _plain_order(slices: list[_Slice]) -> torch.Tensor:
    """[size] gather index of a residual or FF group."""
    rows = [unit_rows(s.rows, s.role.layout) for s in slices]  # [size, rest] each
    return canonical_order(torch.cat(rows, dim=1))  # [size, sum of rests]


def _head_parts(group: PermGroup, slices: list[_Slice]) -> dict[str, torch.Tensor]:
    """Part -> [heads of the part, head_dim, m]: every slice's rows, split by head and dim."""
    pieces: dict[str, list[torch.Tensor]] = {part: [] for part in PARTS}
    for piece in slices:
        for part, where in head_slices(group, piece.role.layout).items():
            pieces[part].append(piece.rows[where])  # [heads, head_dim] -> [heads, head_dim, rest]
    out = {}
    for part, found in pieces.items():
        heads = group.num_heads if part in ("q", "o") else group.num_kv_heads
        empty = torch.zeros(heads, group.head_dim, 0, dtype=torch.float64)
        out[part] = torch.cat(found, dim=2) if found else empty
    return out


def _dim_order(
    own: torch.Tensor, queries: torch.Tensor, free: tuple[int, int], head_dim: int
) -> torch.Tensor:
    """[head_dim] order of one KV head's dims: identity outside `free`, canonical inside.

    `own` [head_dim, m] are the KV head's rows (K or V); `queries` [per_kv, head_dim, m'] the
    matching rows of its query heads (Q or O), taken as a multiset since their order is free.
    """
    order = torch.arange(head_dim)
    start, end = free
    if end - start < 2:
        return order
    per_dim = queries[:, start:end].transpose(0, 1)  # [per_kv, n, m'] -> [n, per_kv, m']
    keys = torch.cat([own[start:end], _multisets(per_dim)], dim=1)  # [n, m + per_kv*m']
    order[start:end] = start + canonical_order(keys)
    return order


@dataclass(frozen=True)
class _KvHead:
    """One KV head's inner orders and its normal form (invariant to every order inside it)."""

    queries: torch.Tensor  # [per_kv]
    qk_dims: torch.Tensor  # [head_dim]
    vo_dims: torch.Tensor  # [head_dim]
    form: torch.Tensor  # [m]: K, V, Q and O slices in those orders, flattened


def _kv_head(group: PermGroup, parts: dict[str, torch.Tensor], g: int) -> _KvHead:
    per_kv, dim = group.queries_per_kv, group.head_dim
    k, v = parts["k"][g], parts["v"][g]  # [head_dim, m]
    rows = slice(g * per_kv, (g + 1) * per_kv)
    q, o = parts["q"][rows], parts["o"][rows]  # [per_kv, head_dim, m]
    qk = _dim_order(k, q, group.qk_free_dims, dim)
    vo = _dim_order(v, o, (0, dim), dim)
    q, o = q[:, qk], o[:, vo]  # [per_kv, head_dim, m]: dims in canonical order
    queries = canonical_order(torch.cat([q.flatten(1), o.flatten(1)], dim=1))  # [per_kv]
    form = torch.cat([k[qk].flatten(), v[vo].flatten(), q[queries].flatten(), o[queries].flatten()])
    return _KvHead(queries, qk, vo, form)


def _attention_order(group: PermGroup, slices: list[_Slice]) -> AttentionPerm:
    """The canonical AttentionPerm of one attention group."""
    parts = _head_parts(group, slices)
    heads = [_kv_head(group, parts, g) for g in range(group.num_kv_heads)]
    kv_order = canonical_order(torch.stack([h.form for h in heads]))  # [kv]
    chosen = [heads[g] for g in kv_order.tolist()]  # new slot -> its old head's inner orders
    return AttentionPerm(
        kv_heads=kv_order,
        q_in_group=torch.stack([h.queries for h in chosen]),  # [kv, per_kv]
        qk_dims=torch.stack([h.qk_dims for h in chosen]),  # [kv, head_dim]
        vo_dims=torch.stack([h.vo_dims for h in chosen]),  # [kv, head_dim]
    )


def _expert_order(
    spec: ArchSpec,
    params: Mapping[str, torch.Tensor],
    group: PermGroup,
    router: list[_Slice],
    perms: Permutations,
) -> torch.Tensor:
    """[experts] gather index of one experts group, every expert's FF order already in `perms`.

    An expert's key is its router rows (`router`: the group's slices) followed by each of its
    tensors moved into the fixed orders, flattened; expert tensors sort by name, which differs
    between experts only by the index, so every expert lists its tensors in one order.
    """
    keys: list[list[torch.Tensor]] = [
        [piece.rows[e] for piece in router] for e in range(group.size)
    ]
    for name in sorted(spec.tensors):
        tensor_spec = spec.tensors[name]
        slot = tensor_spec.expert
        if slot is None or slot.group != group.name or name not in params:
            continue
        moved = permute_tensor(params[name], tensor_spec, spec, perms)
        keys[slot.index].append(moved.reshape(-1).to(torch.float64))  # any shape -> [numel]
    return canonical_order(torch.stack([torch.cat(key) for key in keys]))  # [experts, m]


def refuse_experts(spec: ArchSpec, *, label: str, feature: str) -> None:
    """Refuse a mixture-of-experts spec for `feature` (REPAIR), which has no MoE support.

    Raises:
        AlignmentError: naming the model and the feature, with alignment alone as the fix.
    """
    if spec.has_experts:
        raise AlignmentError(
            f"{feature} does not support the mixture-of-experts model {label} ({spec.family})",
            why="transformers fuses each block's experts into 3-D tensors in memory, and "
            "REPAIR has no sites inside the fused experts (no module per expert to rescale)",
            fix="align without repair (`align: {method: weight}`, or activation or canonical)",
        )


def canonical_peak_bytes(spec: ArchSpec, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Bytes canonical order holds at most beside the process, from the tensors' `shapes`: the
    largest group's float64 keys `KEY_COPIES` times (the slices, the keys they are joined into,
    their squares summed into norms), and the largest tensor read and converted to float64."""
    fixed: set[str] = set()
    keys = 0
    for group in sorted(spec.groups.values(), key=lambda g: _KIND_ORDER[g.kind]):
        # Each key slice is one whole tensor with the group's axis first.
        elements = sum(
            math.prod(shapes[name]) for name, *_ in _key_axes(spec, shapes, group.name, fixed)
        )
        keys = max(keys, F64 * elements)
        fixed.add(group.name)
    largest = max((math.prod(shape) for shape in shapes.values()), default=0)
    return KEY_COPIES * keys + F64 * largest


def canonical_permutations(spec: ArchSpec, params: Mapping[str, torch.Tensor]) -> Permutations:
    """The permutations that put a checkpoint into canonical order (one per group of `spec`).

    `params` are the checkpoint's parameters (buffers may be left out); any valid permutation of
    them yields permutations that give bit-identical tensors, unless two units' keys are equal.

    Raises:
        AlignmentError: a group has no tensor slice that could key it (an unusual spec).
    """
    perms: Permutations = {}
    for group in sorted(spec.groups.values(), key=lambda g: _KIND_ORDER[g.kind]):
        slices = _fixed_slices(spec, params, group.name, perms)
        if group.kind == "attention":
            perms[group.name] = _attention_order(group, slices)
        elif group.kind == "experts":
            perms[group.name] = _expert_order(spec, params, group, slices, perms)
        else:
            perms[group.name] = _plain_order(slices)
    return perms

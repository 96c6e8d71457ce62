"""Permutations on an ArchSpec: per-axis gather index, apply, identity, random, invert, compose.

Convention (spec.py): a permutation is a gather index, `new[i] = old[perm[i]]`. Applying `first` and
then `second` equals applying `compose(spec, first, second)`. Output tensor `name` is its source
tensor (`source_name`: another expert's, when experts are reordered) moved by `permute_tensor`;
`read_permuted` does both, and every caller that permutes a checkpoint goes through it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from hfmerge.arch.experts import compose_expert_ffs, expert_tensor_name, invert_expert_ffs, plain
from hfmerge.arch.spec import (
    ArchSpec,
    AttentionPerm,
    AxisRole,
    GroupPerm,
    Layout,
    PermGroup,
    Permutations,
    TensorSpec,
)

_UNIT_LAYOUTS = frozenset({Layout.UNITS, Layout.UNITS_PAIR})
_ATTENTION_LAYOUTS = frozenset(Layout) - _UNIT_LAYOUTS


def axis_length(group: PermGroup, layout: Layout) -> int:
    """Length of an axis of `layout` over `group` (what the checkpoint's shape must say)."""
    heads, kv, dim = group.num_heads, group.num_kv_heads, group.head_dim
    lengths = {
        Layout.UNITS: group.size,
        Layout.UNITS_PAIR: 2 * group.size,
        Layout.Q: heads * dim,
        Layout.O: heads * dim,
        Layout.K: kv * dim,
        Layout.V: kv * dim,
        Layout.QKV_CONCAT: (heads + 2 * kv) * dim,
        Layout.QKV_PER_HEAD: 3 * heads * dim,
    }
    return lengths[layout]


def unit_rows(rows: torch.Tensor, layout: Layout) -> torch.Tensor:
    """An axis' rows [axis_len, rest] as one row per unit of a plain group: [units, rest'].

    A `UNITS_PAIR` axis holds each unit twice (gate and up halves): its two rows go side by side,
    so whatever reads a unit's row sees both halves, which always move together.
    """
    if layout is not Layout.UNITS_PAIR:
        return rows
    halves = rows.reshape(2, rows.shape[0] // 2, -1)  # [2*size, rest] -> [2, size, rest]
    paired = halves.permute(1, 0, 2)  # [2, size, rest] -> [size, 2, rest]
    return paired.reshape(paired.shape[0], -1)  # [size, 2, rest] -> [size, 2*rest]


def axis_index(group: PermGroup, perm: GroupPerm, layout: Layout) -> torch.Tensor:
    """The gather index (LongTensor of `axis_length` entries) for one axis of `layout`."""
    if group.kind != "attention":
        if layout not in _UNIT_LAYOUTS or isinstance(perm, AttentionPerm):
            raise ValueError(
                f"group {group.name!r} ({group.kind}) takes a plain index on a "
                f"'units' axis, got layout {layout.value!r}"
            )
        if layout is Layout.UNITS_PAIR:
            # Both halves follow one order: unit u's gate row and up row stay a pair.
            return torch.cat([perm.long(), perm.long() + group.size])  # [2 * size]
        return perm.long()
    if layout not in _ATTENTION_LAYOUTS or not isinstance(perm, AttentionPerm):
        raise ValueError(
            f"attention group {group.name!r} takes an AttentionPerm on a head-major "
            f"axis, got layout {layout.value!r}"
        )
    return _attention_index(group, perm, layout)


def _head_rows(heads: torch.Tensor, dims: torch.Tensor, *, head_dim: int) -> torch.Tensor:
    """New slot n holds old head `heads[n]` with its dims in order `dims[n]`: [n, head_dim]."""
    return heads[:, None] * head_dim + dims  # [n, 1] + [n, head_dim] -> [n, head_dim]


def _attention_index(group: PermGroup, perm: AttentionPerm, layout: Layout) -> torch.Tensor:
    per_kv, dim = group.queries_per_kv, group.head_dim
    kv_heads = perm.kv_heads.long()
    query_slots = kv_heads[:, None] * per_kv + perm.q_in_group.long()  # [kv, per_kv]: old head ids
    query_heads = query_slots.reshape(-1)  # [kv, per_kv] -> [heads]
    qk, vo = perm.qk_dims.long(), perm.vo_dims.long()
    qk_q = qk.repeat_interleave(per_kv, dim=0)  # [kv, head_dim] -> [heads, head_dim]
    vo_q = vo.repeat_interleave(per_kv, dim=0)  # [kv, head_dim] -> [heads, head_dim]
    q = _head_rows(query_heads, qk_q, head_dim=dim).reshape(-1)  # -> [heads*head_dim]
    if layout is Layout.Q:
        return q
    if layout is Layout.O:
        return _head_rows(query_heads, vo_q, head_dim=dim).reshape(-1)  # -> [heads*head_dim]
    k = _head_rows(kv_heads, qk, head_dim=dim).reshape(-1)  # [kv, head_dim] -> [kv*head_dim]
    v = _head_rows(kv_heads, vo, head_dim=dim).reshape(-1)  # [kv, head_dim] -> [kv*head_dim]
    if layout is Layout.K:
        return k
    if layout is Layout.V:
        return v
    if layout is Layout.QKV_CONCAT:
        q_len, k_len = q.numel(), k.numel()
        return torch.cat([q, k + q_len, v + q_len + k_len])  # [(heads + 2*kv) * head_dim]
    return _per_head_qkv_index(group, kv_heads, qk, vo)


def _per_head_qkv_index(
    group: PermGroup, heads: torch.Tensor, qk: torch.Tensor, vo: torch.Tensor
) -> torch.Tensor:
    """GPT-NeoX rows `[head][q | k | v][head_dim]`: whole 3*head_dim blocks move with their head."""
    if group.queries_per_kv != 1:
        raise ValueError(
            f"group {group.name!r}: a per-head fused QKV axis needs num_kv_heads == num_heads"
        )
    dim = group.head_dim
    base = heads[:, None] * (3 * dim)  # [heads, 1]: first row of each old head's block
    blocks = torch.cat([base + qk, base + dim + qk, base + 2 * dim + vo], dim=1)  # [heads, 3*dim]
    return blocks.reshape(-1)  # [heads, 3*head_dim] -> [3*heads*head_dim]


IndexFor = Callable[[AxisRole], torch.Tensor | None]


def _apply(tensor: torch.Tensor, tensor_spec: TensorSpec, index_for: IndexFor) -> torch.Tensor:
    if tensor.dim() != len(tensor_spec.axes):
        raise ValueError(
            f"{tensor_spec.name}: tensor has {tensor.dim()} axes, the spec {len(tensor_spec.axes)}"
        )
    out = tensor
    for axis, role in enumerate(tensor_spec.axes):
        index = None if role is None else index_for(role)
        if role is None or index is None:
            continue
        if index.numel() != out.shape[axis]:
            raise ValueError(
                f"{tensor_spec.name}: axis {axis} has {out.shape[axis]} entries, the "
                f"permutation of {role.group!r} {index.numel()}"
            )
        out = out.index_select(axis, index.to(out.device))
    return out


def permute_tensor(
    tensor: torch.Tensor, tensor_spec: TensorSpec, spec: ArchSpec, perms: Permutations
) -> torch.Tensor:
    """One tensor moved into the permuted basis; axes whose group is not in `perms` stay as is."""

    def index_for(role: AxisRole) -> torch.Tensor | None:
        if role.group not in perms:
            return None
        return axis_index(spec.groups[role.group], perms[role.group], role.layout)

    return _apply(tensor, tensor_spec, index_for)


def source_name(name: str, spec: ArchSpec, perms: Permutations) -> str:
    """The input tensor that output tensor `name` comes from under `perms`.

    Itself, except for a tensor of an expert: output slot e holds old expert `perm[e]` of its
    experts group, so it comes from the same tensor of that expert (`experts.{perm[e]}.`).
    """
    tensor = spec.tensors.get(name)
    slot = None if tensor is None else tensor.expert
    if slot is None or slot.group not in perms:
        return name
    order = plain(perms, slot.group, spec.groups[slot.group].size)
    return expert_tensor_name(name, slot, int(order[slot.index]))


def read_permuted(
    name: str, read: Callable[[str], torch.Tensor], spec: ArchSpec, perms: Permutations
) -> torch.Tensor:
    """Output tensor `name` in the permuted basis: its source tensor read by `read`, then moved."""
    source = source_name(name, spec, perms)
    return permute_tensor(read(source), spec.tensors[source], spec, perms)


def permute_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    spec: ArchSpec,
    perms: Permutations,
    *,
    check: bool = True,
) -> dict[str, torch.Tensor]:
    """Every tensor moved into the permuted basis (dtype kept); names outside the spec are errors.

    `check=False` skips `check_permutations`, which only tests that build invalid perms on purpose.
    """
    if check:
        check_permutations(spec, perms)
    unknown = sorted(set(state_dict) - spec.tensors.keys())
    if unknown:
        raise ValueError(f"tensors not in the {spec.family} spec: {', '.join(unknown[:10])}")
    cache: dict[tuple[str, Layout], torch.Tensor] = {}

    def index_for(role: AxisRole) -> torch.Tensor | None:
        if role.group not in perms:
            return None
        key = (role.group, role.layout)
        if key not in cache:
            cache[key] = axis_index(spec.groups[role.group], perms[role.group], role.layout)
        return cache[key]

    def moved(name: str) -> torch.Tensor:
        source = source_name(name, spec, perms)
        if source not in state_dict:
            raise ValueError(f"{name} comes from {source}, which the state dict lacks")
        return _apply(state_dict[source], spec.tensors[source], index_for)

    return {name: moved(name) for name in state_dict}


def _rows_of(values: torch.Tensor, rows: int) -> torch.Tensor:
    return values.unsqueeze(0).repeat(rows, 1)  # [n] -> [rows, n]


def _free_rows(
    rows: int, dim: int, free: tuple[int, int], generator: torch.Generator | None
) -> torch.Tensor:
    """[rows, dim] orders, identity outside [start, end) and shuffled inside when `generator`."""
    out = _rows_of(torch.arange(dim), rows)
    start, end = free
    if generator is not None and end - start > 1:
        for row in range(rows):
            out[row, start:end] = start + torch.randperm(end - start, generator=generator)
    return out


def _group_perm(group: PermGroup, generator: torch.Generator | None) -> GroupPerm:
    """Identity (no generator) or a uniformly random valid permutation of one group."""

    def order(n: int) -> torch.Tensor:
        return torch.arange(n) if generator is None else torch.randperm(n, generator=generator)

    if group.kind != "attention":
        return order(group.size)
    kv, per_kv, dim = group.num_kv_heads, group.queries_per_kv, group.head_dim
    return AttentionPerm(
        kv_heads=order(kv),
        q_in_group=torch.stack([order(per_kv) for _ in range(kv)]),  # [kv, per_kv]
        qk_dims=_free_rows(kv, dim, group.qk_free_dims, generator),
        vo_dims=_free_rows(kv, dim, (0, dim), generator),
    )


def identity_permutations(spec: ArchSpec) -> Permutations:
    """The identity permutation of every group."""
    return {name: _group_perm(group, None) for name, group in spec.groups.items()}


def random_permutations(spec: ArchSpec, generator: torch.Generator) -> Permutations:
    """A random valid permutation of every group (respects GQA and rotary-pinned Q/K dims)."""
    return {name: _group_perm(group, generator) for name, group in spec.groups.items()}


def _argsort_rows(rows: torch.Tensor) -> torch.Tensor:
    return torch.argsort(rows, dim=1)  # [n, m]: inverse of each row


def invert(spec: ArchSpec, perms: Permutations) -> Permutations:
    """The permutations that undo `perms` (same groups)."""
    out: Permutations = {}
    for name, perm in perms.items():
        if not isinstance(perm, AttentionPerm):
            out[name] = torch.argsort(perm)
            continue
        # Old KV head h sits in new slot inv_kv[h]; undo that slot's inner orders row by row.
        inv_kv = torch.argsort(perm.kv_heads.long())
        out[name] = AttentionPerm(
            kv_heads=inv_kv,
            q_in_group=_argsort_rows(perm.q_in_group[inv_kv]),
            qk_dims=_argsort_rows(perm.qk_dims[inv_kv]),
            vo_dims=_argsort_rows(perm.vo_dims[inv_kv]),
        )
    return out | invert_expert_ffs(spec, perms)


def compose(spec: ArchSpec, first: Permutations, second: Permutations) -> Permutations:
    """`first` then `second` as one permutation; a group missing from one side is identity there."""
    identity = identity_permutations(spec)
    out: Permutations = {}
    for name in [*first, *(n for n in second if n not in first)]:
        a, b = first.get(name, identity[name]), second.get(name, identity[name])
        if isinstance(a, AttentionPerm) and isinstance(b, AttentionPerm):
            # New slot g holds first's slot b.kv_heads[g], whose rows are re-gathered by b's rows.
            source = b.kv_heads.long()
            out[name] = AttentionPerm(
                kv_heads=a.kv_heads[source],
                q_in_group=a.q_in_group[source].gather(1, b.q_in_group.long()),  # [kv, per_kv]
                qk_dims=a.qk_dims[source].gather(1, b.qk_dims.long()),  # [kv, head_dim]
                vo_dims=a.vo_dims[source].gather(1, b.vo_dims.long()),  # [kv, head_dim]
            )
        elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            out[name] = a[b.long()]
        else:
            raise ValueError(f"group {name!r}: cannot compose a plain and an attention permutation")
    return out | compose_expert_ffs(spec, first, second)


def _check_rows(name: str, what: str, rows: torch.Tensor, shape: tuple[int, ...]) -> None:
    """`rows` has `shape` and every row (last axis) is a permutation of 0..n-1."""
    if tuple(rows.shape) != shape:
        raise ValueError(f"{name}: {what} has shape {tuple(rows.shape)}, expected {shape}")
    if rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
        raise ValueError(f"{name}: {what} has dtype {rows.dtype}, expected an integer dtype")
    expected = torch.arange(shape[-1]).expand(shape)  # [..., n]
    if not torch.equal(rows.sort(dim=-1).values.long().cpu(), expected):
        raise ValueError(f"{name}: {what} is not a permutation")


def _check_attention(group: PermGroup, perm: AttentionPerm) -> None:
    kv, per_kv, dim = group.num_kv_heads, group.queries_per_kv, group.head_dim
    _check_rows(group.name, "kv_heads", perm.kv_heads, (kv,))
    _check_rows(group.name, "q_in_group", perm.q_in_group, (kv, per_kv))
    _check_rows(group.name, "qk_dims", perm.qk_dims, (kv, dim))
    _check_rows(group.name, "vo_dims", perm.vo_dims, (kv, dim))
    start, end = group.qk_free_dims
    fixed = torch.ones(dim, dtype=torch.bool)
    fixed[start:end] = False
    pinned = perm.qk_dims.long().cpu()[:, fixed]  # [kv, dims outside qk_free_dims]
    if not torch.equal(pinned, _rows_of(torch.arange(dim)[fixed], kv)):
        raise ValueError(
            f"{group.name}: qk_dims moves dims outside {group.qk_free_dims} (rotary "
            "dims must stay in place)"
        )


def check_permutations(spec: ArchSpec, perms: Permutations) -> None:
    """Raise ValueError unless every entry of `perms` is a valid permutation of its spec group."""
    for name, perm in perms.items():
        group = spec.groups.get(name)
        if group is None:
            raise ValueError(f"{name!r} is not a permutation group of this {spec.family} spec")
        if group.kind == "attention":
            if not isinstance(perm, AttentionPerm):
                raise ValueError(f"{name}: an attention group needs an AttentionPerm")
            _check_attention(group, perm)
        elif isinstance(perm, AttentionPerm):
            raise ValueError(f"{name}: a {group.kind} group needs a plain index tensor")
        else:
            _check_rows(name, "permutation", perm, (group.size,))

"""Within-head maps of attention: linear maps of each KV head's dims that keep the function.

Attention reads queries and keys only through q·k, and values only through O·v, so per KV head
(with every query head that reads it, under GQA):

- Q/K: q ↦ G q and k ↦ G⁻ᵀ k keep every score (Gq)·(G⁻ᵀk) = q·k. RoPE rotates each frequency
  pair of dims by the position's angle before the product, so G must commute with those
  rotations: block-diagonal on the pairs, each block a 2-D rotation (SO(2) is abelian), here
  times a scale (q gets s, k gets 1/s). For an orthogonal G, G⁻ᵀ = G.
- V/O: v ↦ M v and the head's input columns of o_proj ↦ W_o·M⁻¹ keep O·v, for any invertible M.

The maps act on B after its permutations (`arch/residual.py` `read_in_basis`), per KV slot of
the permuted model; they touch only head-major axes, so they commute with the norm fold and the
residual rotation (which act on the residual axis).

Without RoPE (`ArchSpec.rotary` False: GPT-2's learned positions) nothing turns q and k between
the projection and the product, so G may be any orthogonal matrix of the head's dims.

Fused projections (GPT-2's c_attn [Q | K | V], GPT-NeoX's [head][q | k | v]) are split into their
q, k and v rows (`head_parts`), each mapped as a separate projection's would be.

A per-dim gain on q or k after the projection (Qwen3's per-head q/k norm, OLMo 2's norm over the
whole projection) does not commute with a rotation of a pair unless the pair's gains are equal, so
`qk_maps_exact` is False there and only V/O maps apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hfmerge.arch.spec import ArchSpec, AttentionPerm, AxisRole, Layout, PermGroup, Permutations

# RoPE pairs dim i with dim i + head_dim/2 (transformers' `rotate_half`), except in these model
# types, whose modeling code rotates interleaved pairs (2i, 2i + 1).
INTERLEAVED_ROPE = frozenset({"helium", "ernie4_5"})
# Families whose every Q/K dim is rotated by RoPE (no pass-through dims) in a known pairing.
ROPE_FAMILIES = frozenset({"llama", "qwen3"})
_HEAD_LAYOUTS = frozenset({Layout.Q, Layout.K, Layout.V, Layout.O})
_FUSED_PARTS = (Layout.Q, Layout.K, Layout.V)
_QK_NORMS = ("q_norm.weight", "k_norm.weight")


@dataclass(frozen=True)
class HeadMap:
    """The within-head maps of one attention group, per KV slot of the permuted model.

    Attributes:
        qk: [num_kv_heads, head_dim, head_dim] G: query rows of the slot's heads ↦ G·q,
            key rows ↦ G⁻ᵀ·k (block-diagonal on RoPE pairs; orthogonal when only rotations).
        vo: [num_kv_heads, head_dim, head_dim] invertible M: value rows ↦ M·v, the input
            columns of o_proj of the slot's query heads ↦ W_o·M⁻¹.
    """

    qk: torch.Tensor
    vo: torch.Tensor


HeadMaps = dict[str, HeadMap]  # attention group name -> its within-head maps


def identity_head_map(group: PermGroup) -> HeadMap:
    """G = M = I for every KV slot of `group`."""
    eye = torch.eye(group.head_dim, dtype=torch.float64)
    stack = eye.expand(group.num_kv_heads, -1, -1).clone()  # [kv, head_dim, head_dim]
    return HeadMap(qk=stack, vo=stack.clone())


def permuted_head_maps(spec: ArchSpec, perms: Permutations, maps: HeadMaps) -> HeadMaps:
    """Maps of B's own KV heads (applied before `perms`) as maps of the slots after `perms`.

    Slot g holds old KV head `kv_heads[g]` with its dims in order `qk_dims[g]` / `vo_dims[g]`:
    with P = I[dims] the gather matrix, a map M of the old rows acts on the new ones as P·M·Pᵀ.
    """
    out: HeadMaps = {}
    for name, head_map in maps.items():
        perm = perms.get(name)
        if not isinstance(perm, AttentionPerm):
            out[name] = head_map
            continue
        eye = torch.eye(spec.groups[name].head_dim, dtype=torch.float64)
        kv = perm.kv_heads.long()
        qk_gather, vo_gather = eye[perm.qk_dims.long()], eye[perm.vo_dims.long()]  # [kv, d, d]
        out[name] = HeadMap(
            qk=qk_gather @ head_map.qk[kv] @ qk_gather.mT,
            vo=vo_gather @ head_map.vo[kv] @ vo_gather.mT,
        )
    return out


def compose_head_maps(first: HeadMaps, then: HeadMaps) -> HeadMaps:
    """`first`, then `then`, on the same slots: one map per slot (a group in one only is kept)."""
    out = dict(first) | dict(then)
    for name in first.keys() & then.keys():
        out[name] = HeadMap(qk=then[name].qk @ first[name].qk, vo=then[name].vo @ first[name].vo)
    return out


def rotary_pairs(spec: ArchSpec, head_dim: int) -> torch.Tensor:
    """[head_dim / 2, 2] the dims RoPE rotates together, in the model type's convention."""
    half = head_dim // 2
    if spec.model_type in INTERLEAVED_ROPE:
        return torch.arange(head_dim).reshape(half, 2)  # (2i, 2i + 1)
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1)  # (i, i + d/2)


def pair_map(pairs: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """[head_dim, head_dim] map made of one 2x2 block per rotary pair ([pairs, 2, 2] `blocks`)."""
    head_dim = 2 * pairs.shape[0]
    out = torch.zeros(head_dim, head_dim, dtype=blocks.dtype)
    rows, cols = pairs[:, :, None], pairs[:, None, :]  # [pairs, 2, 1], [pairs, 1, 2]
    out[rows, cols] = blocks  # block p sits on rows and columns `pairs[p]`
    return out


def qk_maps_exact(spec: ArchSpec) -> bool:
    """Whether Q/K maps keep the function: no RoPE (any orthogonal map), or RoPE over the whole
    head in a known pairing (the llama family: pair rotations); and no per-dim gain on q or k
    (q/k norms)."""
    normed = any(name.endswith(_QK_NORMS) for name in spec.tensors)
    return (not spec.rotary or spec.family in ROPE_FAMILIES) and not normed


def head_parts(group: PermGroup, layout: Layout) -> list[tuple[Layout, torch.Tensor]]:
    """An attention axis as separate projections' axes: (q, k, v or o layout, the index of its
    rows on the axis), one part for a separate projection, q, k and v for a fused one."""
    heads, kv, dim = group.num_heads, group.num_kv_heads, group.head_dim
    if layout in _HEAD_LAYOUTS:
        size = heads * dim if layout in (Layout.Q, Layout.O) else kv * dim
        return [(layout, torch.arange(size))]
    if layout is Layout.QKV_CONCAT:  # [Q (heads*d) | K (kv*d) | V (kv*d)]
        starts = (0, heads * dim, (heads + kv) * dim)
        sizes = (heads * dim, kv * dim, kv * dim)
        return [
            (part, start + torch.arange(size))
            for part, start, size in zip((Layout.Q, Layout.K, Layout.V), starts, sizes, strict=True)
        ]
    if layout is Layout.QKV_PER_HEAD:  # [head][q | k | v][d], heads == kv
        block = torch.arange(heads)[:, None] * (3 * dim) + torch.arange(dim)  # [heads, d]
        return [(part, (block + k * dim).reshape(-1)) for k, part in enumerate(_FUSED_PARTS)]
    raise ValueError(f"{group.name}: no within-head parts on a {layout} axis")


def _axis_maps(group: PermGroup, head_map: HeadMap, layout: Layout) -> torch.Tensor:
    """[heads on the axis, head_dim, head_dim]: the map each head's rows (axis first) take."""
    per_kv = group.queries_per_kv
    if layout is Layout.Q:
        return head_map.qk.repeat_interleave(per_kv, dim=0)  # [kv, d, d] -> [heads, d, d]
    if layout is Layout.K:
        return _inverse_transpose(head_map.qk)  # G⁻ᵀ, [kv, d, d]
    if layout is Layout.V:
        return head_map.vo
    # o_proj's input columns W_o[:, head] ↦ W_o[:, head]·M⁻¹: as rows (axis first), M⁻ᵀ·rows.
    return _inverse_transpose(head_map.vo).repeat_interleave(per_kv, dim=0)  # [heads, d, d]


def _inverse_transpose(maps: torch.Tensor) -> torch.Tensor:
    """M⁻ᵀ of each [d, d] map in a [n, d, d] stack."""
    inverse: torch.Tensor = torch.linalg.inv(maps)
    return inverse.mT


def map_heads(
    tensor: torch.Tensor,
    axes: tuple[AxisRole | None, ...],
    spec: ArchSpec,
    head_maps: HeadMaps,
) -> torch.Tensor:
    """Every head-major axis of `tensor` whose group has maps, mapped head by head.

    `tensor` is in a floating dtype wide enough for the maps (the caller casts back).
    """
    for axis, role in enumerate(axes):
        if role is None or role.group not in head_maps:
            continue
        group = spec.groups[role.group]
        moved = tensor.movedim(axis, 0)  # [..., axis_len, ...] -> [axis_len, ...]
        mapped = torch.empty_like(moved)
        for layout, index in head_parts(group, role.layout):
            maps = _axis_maps(group, head_maps[role.group], layout).to(tensor.dtype)
            rows = moved[index].reshape(maps.shape[0], group.head_dim, -1)  # [heads, d, rest]
            mapped[index] = (maps @ rows).reshape(moved[index].shape)  # -> [heads*d, ...]
        tensor = mapped.movedim(0, axis)  # [axis_len, ...] -> [..., axis_len, ...]
    return tensor


__all__ = [
    "INTERLEAVED_ROPE",
    "ROPE_FAMILIES",
    "HeadMap",
    "HeadMaps",
    "compose_head_maps",
    "head_parts",
    "identity_head_map",
    "map_heads",
    "pair_map",
    "permuted_head_maps",
    "qk_maps_exact",
    "rotary_pairs",
]

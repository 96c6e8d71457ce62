"""Random within-head maps of attention (`arch/head_maps.py`) for the exactness and recovery tests:
rotations (optionally scaled) of each RoPE pair for Q/K, orthogonal or invertible maps for V/O."""

from __future__ import annotations

import torch

from hfmerge.arch.head_maps import HeadMap, HeadMaps, pair_map, rotary_pairs
from hfmerge.arch.spec import ArchSpec, PermGroup
from tests.support.rotation import random_orthogonal


def pair_blocks(pairs: int, generator: torch.Generator, *, scaled: bool = False) -> torch.Tensor:
    """[pairs, 2, 2] random 2-D rotations, each times a scale in [0.5, 2] when `scaled`."""
    angle = (torch.rand(pairs, generator=generator, dtype=torch.float64) * 2 - 1) * torch.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    blocks = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    if scaled:
        scale = 2 ** (torch.rand(pairs, generator=generator, dtype=torch.float64) * 2 - 1)
        blocks = blocks * scale[:, None, None]
    return blocks


def random_invertible(dim: int, generator: torch.Generator) -> torch.Tensor:
    """[dim, dim] U·diag(s)·Vᵀ with orthogonal U, V and singular values s in [0.5, 2]."""
    seeds = torch.randint(0, 2**31, (2,), generator=generator).tolist()
    scale = 2 ** (torch.rand(dim, generator=generator, dtype=torch.float64) * 2 - 1)
    left, right = random_orthogonal(dim, seed=seeds[0]), random_orthogonal(dim, seed=seeds[1])
    return left @ torch.diag(scale) @ right.T


def _vo(dim: int, generator: torch.Generator, *, invertible: bool) -> torch.Tensor:
    if invertible:
        return random_invertible(dim, generator)
    return random_orthogonal(dim, seed=int(torch.randint(0, 2**31, (1,), generator=generator)))


def random_head_maps(
    spec: ArchSpec,
    *,
    seed: int,
    scaled: bool = False,
    invertible: bool = False,
    qk: bool = True,
    vo: bool = True,
) -> HeadMaps:
    """Random exact maps of every attention group: per KV slot, a rotation (times a scale when
    `scaled`) of each RoPE pair (identity when not `qk`), and an orthogonal (or, when
    `invertible`, a general) V/O map (identity when not `vo`)."""
    generator = torch.Generator().manual_seed(seed)
    maps: HeadMaps = {}
    for name, group in spec.groups.items():
        if group.kind != "attention":
            continue
        pairs = rotary_pairs(spec, group.head_dim)
        eye = torch.eye(group.head_dim, dtype=torch.float64)
        slots = range(group.num_kv_heads)
        qk_maps = [
            pair_map(pairs, pair_blocks(len(pairs), generator, scaled=scaled)) if qk else eye
            for _ in slots
        ]
        vo_maps = [
            _vo(group.head_dim, generator, invertible=invertible) if vo else eye for _ in slots
        ]
        maps[name] = HeadMap(qk=torch.stack(qk_maps), vo=torch.stack(vo_maps))
    return maps


def mixing_head_maps(spec: ArchSpec, *, seed: int) -> HeadMaps:
    """Q/K maps by full random orthogonal matrices (mixing RoPE pairs), V/O the identity."""
    maps: HeadMaps = {}
    for name, group in spec.groups.items():
        if group.kind == "attention":
            maps[name] = HeadMap(qk=_full_orthogonal(group, seed), vo=_identity(group))
    return maps


def _full_orthogonal(group: PermGroup, seed: int) -> torch.Tensor:
    slots = [random_orthogonal(group.head_dim, seed=seed + g) for g in range(group.num_kv_heads)]
    return torch.stack(slots)  # [kv, head_dim, head_dim]


def _identity(group: PermGroup) -> torch.Tensor:
    eye = torch.eye(group.head_dim, dtype=torch.float64)
    return eye.expand(group.num_kv_heads, -1, -1).clone()  # [kv, head_dim, head_dim]

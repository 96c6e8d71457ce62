"""The files `hfmerge align` writes beside the aligned model: B's permutations
(`hfmerge_permutations.safetensors`, int64 tensors) and, for the orthogonal methods, its residual
rotation (`hfmerge_rotation.safetensors`, one tensor "rotation") and its within-head maps
(`hfmerge_head_maps.safetensors`: `GROUP.qk` and `GROUP.vo`, float64 [num_kv_heads, head_dim,
head_dim] each, per KV slot after the permutations)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hfmerge.arch.head_maps import HeadMap, HeadMaps
from hfmerge.arch.permute import check_permutations
from hfmerge.arch.spec import ArchSpec, AttentionPerm, Permutations
from hfmerge.errors import AlignmentError

PERMUTATIONS_FILE = "hfmerge_permutations.safetensors"
ROTATION_FILE = "hfmerge_rotation.safetensors"  # the orthogonal methods' residual map, "rotation"
HEAD_MAPS_FILE = "hfmerge_head_maps.safetensors"  # within-head maps, `GROUP.qk` / `GROUP.vo`
ATTENTION_FIELDS = ("kv_heads", "q_in_group", "qk_dims", "vo_dims")


def permutation_tensors(perms: Permutations) -> dict[str, torch.Tensor]:
    """One int64 tensor per plain group, and per field of an attention group (`NAME.kv_heads`)."""
    out: dict[str, torch.Tensor] = {}
    for name, perm in perms.items():
        if isinstance(perm, AttentionPerm):
            for field in ATTENTION_FIELDS:
                out[f"{name}.{field}"] = getattr(perm, field).to(torch.int64).contiguous()
        else:
            out[name] = perm.to(torch.int64).contiguous()
    return out


def save_permutations(
    path: Path, perms: Permutations, *, metadata: dict[str, str] | None = None
) -> None:
    """Write `perms` as a safetensors file (see `permutation_tensors` for the names)."""
    save_file(permutation_tensors(perms), str(path), metadata={"format": "pt", **(metadata or {})})


def load_permutations(path: Path, spec: ArchSpec) -> Permutations:
    """Read a permutations file written for `spec`'s architecture; every group must be in it."""
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise AlignmentError(
            f"cannot read permutations file {path}: {exc}",
            fix=f"point to the {PERMUTATIONS_FILE} written by `hfmerge align`",
        ) from None
    perms: Permutations = {}
    for name, group in spec.groups.items():
        keys = [f"{name}.{f}" for f in ATTENTION_FIELDS] if group.kind == "attention" else [name]
        if all(key in tensors for key in keys):
            values = [tensors.pop(key) for key in keys]
            perms[name] = AttentionPerm(*values) if group.kind == "attention" else values[0]
    problems = [f"unknown entries {', '.join(sorted(tensors)[:5])}"] if tensors else []
    missing = [name for name in spec.groups if name not in perms]
    if missing:
        problems.append(f"no permutation for {', '.join(missing[:5])}")
    try:
        check_permutations(spec, perms)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        raise AlignmentError(
            f"permutations file {path} does not fit this {spec.family} model",
            why="; ".join(problems),
            fix="use the file written when this model pair was aligned",
        )
    return perms


def save_head_maps(
    path: Path, head_maps: HeadMaps, *, metadata: dict[str, str] | None = None
) -> None:
    """Write within-head maps as float64 `GROUP.qk` and `GROUP.vo` tensors."""
    tensors = {
        f"{group}.{part}": getattr(head_map, part).to(torch.float64).contiguous()
        for group, head_map in head_maps.items()
        for part in ("qk", "vo")
    }
    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})


def load_head_maps(path: Path) -> HeadMaps:
    """Read within-head maps written by `save_head_maps`."""
    tensors = load_file(str(path))
    groups = sorted({key.rsplit(".", 1)[0] for key in tensors})
    return {g: HeadMap(qk=tensors[f"{g}.qk"], vo=tensors[f"{g}.vo"]) for g in groups}


__all__ = [
    "ATTENTION_FIELDS",
    "HEAD_MAPS_FILE",
    "PERMUTATIONS_FILE",
    "ROTATION_FILE",
    "load_head_maps",
    "load_permutations",
    "permutation_tensors",
    "save_head_maps",
    "save_permutations",
]

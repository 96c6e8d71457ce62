"""Expert order on mixture-of-experts specs: which tensor an expert slot reads, and how the FF
permutations keyed by expert (`arch/spec.py`) re-key when expert orders are inverted or composed.

Gather convention: the experts group's permutation `p` puts old expert `p[e]` in slot e; the FF
group of expert k holds the FF order applied to old expert k's tensors, wherever k lands.
"""

from __future__ import annotations

import torch

from hfmerge.arch.spec import ArchSpec, ExpertSlot, GroupPerm, Permutations


def expert_ffs(spec: ArchSpec) -> dict[str, list[str]]:
    """Each experts group's FF group names, by expert index."""
    out: dict[str, list[str]] = {g.name: [""] * g.size for g in spec.groups.values()}
    for group in spec.groups.values():
        if group.expert is not None:
            out[group.expert.group][group.expert.index] = group.name
    return {name: ffs for name, ffs in out.items() if spec.groups[name].kind == "experts"}


def expert_tensor_name(name: str, slot: ExpertSlot, index: int) -> str:
    """The same tensor of expert `index`: `name` with its `experts.{slot.index}.` part replaced."""
    marker = f"experts.{slot.index}."
    at = name.rfind(marker)
    if at < 0 or (at > 0 and name[at - 1] != "."):
        raise ValueError(f"{name}: an expert tensor's name must hold {marker!r}")
    return f"{name[:at]}experts.{index}.{name[at + len(marker) :]}"


def plain(perms: Permutations, name: str, size: int) -> torch.Tensor:
    """The plain permutation of group `name`, identity when `perms` leaves it out."""
    perm: GroupPerm | None = perms.get(name)
    if perm is None:
        return torch.arange(size)
    if not isinstance(perm, torch.Tensor):
        raise ValueError(f"group {name!r} takes a plain index tensor")
    return perm.long()


def _touched(perms: Permutations, experts: str, ffs: list[str]) -> bool:
    return experts in perms or any(ff in perms for ff in ffs)


def invert_expert_ffs(spec: ArchSpec, perms: Permutations) -> Permutations:
    """The expert FF groups of `invert(perms)`, for every MoE layer that `perms` touches.

    Slot j of the permuted model holds old expert p[j] moved by f[p[j]]; undoing it moves that
    expert (now keyed j) by the inverse order: g[j] = argsort(f[p[j]]).
    """
    out: Permutations = {}
    for experts, ffs in expert_ffs(spec).items():
        if not _touched(perms, experts, ffs):
            continue
        order = plain(perms, experts, len(ffs)).tolist()
        size = spec.groups[ffs[0]].size
        for j, ff in enumerate(ffs):
            out[ff] = torch.argsort(plain(perms, ffs[order[j]], size))
    return out


def compose_expert_ffs(spec: ArchSpec, first: Permutations, second: Permutations) -> Permutations:
    """The expert FF groups of `compose(first, second)`, for every MoE layer either touches.

    Old expert k lands in first's slot inv_p1[k], which second keys its FF order by:
    c[k] = f1[k][f2[inv_p1[k]]].
    """
    out: Permutations = {}
    for experts, ffs in expert_ffs(spec).items():
        if not (_touched(first, experts, ffs) or _touched(second, experts, ffs)):
            continue
        slot_of = torch.argsort(plain(first, experts, len(ffs))).tolist()  # old k -> first's slot
        size = spec.groups[ffs[0]].size
        for k, ff in enumerate(ffs):
            out[ff] = plain(first, ff, size)[plain(second, ffs[slot_of[k]], size)]
    return out

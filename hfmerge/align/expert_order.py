"""Expert order in weight matching: where B's expert tensors land, and the experts' similarity.

An experts group's permutation `p` puts B's expert `p[s]` in A's slot s (gather convention), and
the FF group keyed by B's expert k is matched against A's expert in slot `argsort(p)[k]`.

Which B expert goes to which slot is its own assignment step. Its similarity must not depend on the
experts' FF orders, which are only meaningful once the experts are paired: it sums the router rows'
similarity and, per expert tensor, that of a profile over the residual stream that no FF order can
change (the squared weights summed over every other axis), both given the residual permutation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from hfmerge.align.weights import square_sums
from hfmerge.arch.common import RESIDUAL
from hfmerge.arch.experts import expert_tensor_name, plain
from hfmerge.arch.spec import ArchSpec, PermGroup, Permutations


def slot_name(name: str, spec: ArchSpec, perms: Permutations) -> str:
    """A's tensor that B's tensor `name` is compared with: the same tensor of the slot its expert
    lands in under `perms` (itself for a tensor outside the experts)."""
    slot = spec.tensors[name].expert
    if slot is None or slot.group not in perms:
        return name
    order = plain(perms, slot.group, spec.groups[slot.group].size)
    landed = int(torch.argsort(order)[slot.index])  # B's expert index -> A's slot
    return expert_tensor_name(name, slot, landed)


@dataclass(frozen=True)
class ExpertProfiles:
    """Both models' residual profiles of one experts group's tensors: [experts, tensors, hidden]."""

    a: torch.Tensor
    b: torch.Tensor

    def similarity(self, residual: torch.Tensor) -> torch.Tensor:
        """[experts, experts]: A's slots (rows) against B's experts (columns), B's residual axis
        gathered by `residual` (A's order)."""
        b = self.b[:, :, residual.long()]  # [experts, tensors, hidden] in A's residual order
        return self.a.flatten(1) @ b.flatten(1).T  # [experts, tensors*hidden] -> [E, E]


def _residual_axis(spec: ArchSpec, name: str) -> int | None:
    found = [i for i, r in enumerate(spec.tensors[name].axes) if r and r.group == RESIDUAL]
    return found[0] if found else None


def expert_profiles(
    spec: ArchSpec,
    group: PermGroup,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
) -> ExpertProfiles | None:
    """The profiles of every tensor of the experts in `group`, or None when they have none."""
    # Expert e's tensors, in one order for every expert (their names differ only by the index).
    per_expert: list[list[str]] = [[] for _ in range(group.size)]
    for name in sorted(spec.tensors):
        slot = spec.tensors[name].expert
        ours = slot is not None and slot.group == group.name and name in a
        if ours and slot is not None and _residual_axis(spec, name) is not None:
            per_expert[slot.index].append(name)
    if not per_expert[0] or any(len(names) != len(per_expert[0]) for names in per_expert):
        return None

    def stacked(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(
            [
                torch.stack([square_sums(params[n], _residual_axis(spec, n) or 0) for n in names])
                for names in per_expert
            ]
        )  # [experts, tensors, hidden]

    return ExpertProfiles(stacked(a), stacked(b))

"""Which activations activation matching reads: the modules it hooks, and which axis of each.

FF groups: the input of the down-projection; attention: the input of the output projection (per
head), plus the Q/K projection outputs where within-head Q/K dims are free. From the spec and the
model's modules alone (a model on the meta device will do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from hfmerge.align.attention import head_slices
from hfmerge.arch.spec import ArchSpec, AxisRole, Layout, PermGroup
from hfmerge.errors import AlignmentError

Where = Literal["input", "output"]


@dataclass(frozen=True)
class Probe:
    """One captured feature set: a module's input or output, restricted to one group's part."""

    module: str
    where: Where
    group: str
    part: str  # "units" (FF), or an attention part: "o" (input of O), "q" or "k" (outputs)
    columns: torch.Tensor  # [features]: positions on the captured axis, head-major for parts


def _linear_axes(module: nn.Module) -> tuple[int, int] | None:
    """(output axis, input axis) of the module's weight; None if it is not a linear map."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return 0, 1  # [out, in]
    if isinstance(module, Conv1D):
        return 1, 0  # GPT-2 Conv1D stores [in, out]
    return None


def _input_probe(spec: ArchSpec, module: str, role: AxisRole | None) -> Probe | None:
    """A module reading an FF group's units, or the per-head outputs of attention (O input)."""
    if role is None:
        return None
    group = spec.groups[role.group]
    if group.kind == "ff":
        return Probe(module, "input", group.name, "units", torch.arange(group.size))
    if role.layout is Layout.O:
        where = head_slices(group, Layout.O)["o"].reshape(-1)  # -> [heads*head_dim]
        return Probe(module, "input", group.name, "o", where)
    return None


def _output_probes(spec: ArchSpec, module: str, role: AxisRole | None) -> list[Probe]:
    """A module writing queries and/or keys, when the group lets Q/K dims move at all."""
    if role is None or spec.groups[role.group].kind != "attention":
        return []
    group = spec.groups[role.group]
    start, end = group.qk_free_dims
    if end - start < 2:  # Q/K dims are pinned (RoPE): nothing to learn from them
        return []
    return [
        Probe(module, "output", group.name, part, where.reshape(-1))  # [heads*head_dim]
        for part, where in head_slices(group, role.layout).items()
        if part in ("q", "k")
    ]


def probes_of(spec: ArchSpec, modules: dict[str, nn.Module]) -> list[Probe]:
    """From the spec: FF inputs of down-projections, O inputs, and free Q/K projection outputs.

    A weight tensor's name minus `.weight` is its module; the module type says which weight axis
    is its input (nn.Linear [out, in], GPT-2 Conv1D [in, out]).
    """
    probes: list[Probe] = []
    for name, tensor in spec.tensors.items():
        module_name = name.removesuffix(".weight")
        module = modules.get(module_name) if name.endswith(".weight") else None
        axes = None if module is None or tensor.buffer else _linear_axes(module)
        if axes is None:
            continue
        out_role, in_role = tensor.axes[axes[0]], tensor.axes[axes[1]]
        probe = _input_probe(spec, module_name, in_role)
        probes += ([probe] if probe else []) + _output_probes(spec, module_name, out_role)
    return probes


def in_experts(group: PermGroup) -> bool:
    """An experts group or an expert's FF group: matched by `align/expert_activations.py`."""
    return group.kind == "experts" or group.expert is not None


def check_coverage(spec: ArchSpec, probes: list[Probe]) -> None:
    """Every FF and attention group is read by a probed module, else there is nothing to match."""
    seen = {p.group for p in probes if p.part in ("units", "o")}
    missing = [
        g.name
        for g in spec.groups.values()
        if g.kind != "residual" and not in_experts(g) and g.name not in seen
    ]
    if missing:
        raise AlignmentError(
            f"no linear module reads the units of {', '.join(missing[:5])}",
            why="activation matching captures the input of the projection after each group",
            fix="use weight matching for this model, or a model class whose module names match "
            "its checkpoint",
        )


__all__ = ["Probe", "Where", "check_coverage", "in_experts", "probes_of"]

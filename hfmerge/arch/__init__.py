"""Architecture registry: config.json's model_type -> family builder -> ArchSpec of one checkpoint.

Specs are built from config.json and the checkpoint's tensor names alone, before any weight is read.
A model_type without a family gets a generic spec (`arch/generic.py`): it merges, but every step
that needs permutation groups refuses it (`require_permutable`, `permutable_family`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hfmerge.arch import (
    bert,
    exaone4,
    gemma,
    generic,
    gpt2,
    gpt_neox,
    llama,
    mixtral,
    olmo2,
    phi3,
    qwen3,
    qwen3_moe,
)
from hfmerge.arch.permute import axis_length
from hfmerge.arch.spec import GENERIC_FAMILY, ArchSpec
from hfmerge.errors import ArchitectureError, NoPermutationSpecError


class Builder(Protocol):
    """A family module's `build` function."""

    def __call__(
        self, config: dict[str, Any], tensor_names: Collection[str], *, label: str = "model"
    ) -> ArchSpec: ...


@dataclass(frozen=True)
class FamilyInfo:
    """One supported family, as `hfmerge archs` lists it."""

    name: str
    model_types: tuple[str, ...]
    description: str


_REGISTRY: tuple[tuple[FamilyInfo, Builder], ...] = tuple(
    (FamilyInfo(module.NAME, module.MODEL_TYPES, module.DESCRIPTION), module.build)
    for module in (
        bert,
        gpt2,
        gpt_neox,
        llama,
        qwen3,
        gemma,
        phi3,
        olmo2,
        exaone4,
        mixtral,
        qwen3_moe,
    )
)
FAMILIES: dict[str, Builder] = {info.name: build for info, build in _REGISTRY}
MODEL_TYPES: dict[str, str] = {t: info.name for info, _ in _REGISTRY for t in info.model_types}


def list_families() -> list[FamilyInfo]:
    """Every supported family with its model types and a one-line description."""
    return [info for info, _ in _REGISTRY]


def model_type_of(config: Mapping[str, Any], *, label: str = "model") -> str:
    """config.json's `model_type`, which every checkpoint hfmerge reads must have."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ArchitectureError(
            label,
            "config.json has no `model_type`",
            fix="use the config.json saved with the model by transformers",
        )
    return model_type


def family_of(config: Mapping[str, Any], *, label: str = "model") -> str:
    """The family name for config.json's `model_type`; GENERIC_FAMILY when no family covers it."""
    return MODEL_TYPES.get(model_type_of(config, label=label), GENERIC_FAMILY)


def spec_for(
    config: dict[str, Any],
    tensor_names: Collection[str],
    *,
    label: str = "model",
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> ArchSpec:
    """The spec of one checkpoint: every tensor name in it, with the group acting on each axis.

    Args:
        config: parsed config.json (a dict, not a transformers config object).
        tensor_names: names in the safetensors checkpoint (or a state dict's keys).
        label: the model's name in error messages.
        shapes: every tensor's shape; a generic spec (a model_type without a family) takes each
            tensor's rank from it, and cannot be built without it.

    Raises:
        ArchitectureError: no model_type, the config lacks a size, or names are unknown to /
            missing from the family's spec.
        ValueError: a generic spec asked for without `shapes` (a caller's mistake).
    """
    family = family_of(config, label=label)
    if family != GENERIC_FAMILY:
        return FAMILIES[family](config, tensor_names, label=label)
    if shapes is None:
        raise ValueError(f"the generic spec of {label} needs the tensor shapes")
    return generic.build(config, {name: shapes[name] for name in tensor_names})


def permutable_family(config: Mapping[str, Any], *, label: str, feature: str) -> str:
    """The family of a model that `feature` permutes or probes block by block.

    Raises:
        NoPermutationSpecError: the model_type has no family, naming the ones that have.
    """
    family = family_of(config, label=label)
    if family == GENERIC_FAMILY:
        raise _no_spec(label, model_type_of(config, label=label), feature)
    return family


def require_permutable(spec: ArchSpec, *, label: str, feature: str) -> None:
    """Refuse a generic spec for `feature` (align, REPAIR, the CKA gate, a router backbone).

    Raises:
        NoPermutationSpecError: naming the model, its model_type and the families that have one.
    """
    if not spec.permutable:
        raise _no_spec(label, spec.model_type, feature)


def _no_spec(label: str, model_type: str, feature: str) -> NoPermutationSpecError:
    families = [f"{info.name} ({', '.join(info.model_types)})" for info, _ in _REGISTRY]
    return NoPermutationSpecError(label, model_type, feature, families)


def check_shapes(
    spec: ArchSpec, shapes: Mapping[str, Sequence[int]], *, label: str = "model"
) -> None:
    """Check every permuted axis against the checkpoint's header shapes; lists all mismatches."""
    problems = []
    for name, tensor in spec.tensors.items():
        shape = tuple(shapes[name]) if name in shapes else None
        if shape is None or len(shape) != len(tensor.axes):
            problems.append(f"{name} has shape {shape}, expected {len(tensor.axes)} axes")
            continue
        for axis, role in enumerate(tensor.axes):
            if role is None:
                continue
            expected = axis_length(spec.groups[role.group], role.layout)
            if shape[axis] != expected:
                problems.append(
                    f"{name} axis {axis} has {shape[axis]} entries, the config implies "
                    f"{expected} ({role.group}, {role.layout.value})"
                )
    if problems:
        shown = "; ".join(problems[:8]) + (
            f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
        )
        raise ArchitectureError(
            label,
            f"tensor shapes do not match config.json: {shown}",
            fix="use the config.json that was saved with these weights",
        )


__all__ = [
    "FAMILIES",
    "GENERIC_FAMILY",
    "MODEL_TYPES",
    "FamilyInfo",
    "check_shapes",
    "family_of",
    "list_families",
    "model_type_of",
    "permutable_family",
    "require_permutable",
    "spec_for",
]

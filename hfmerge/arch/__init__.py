"""Architecture registry: config.json's model_type -> family builder -> ArchSpec of one checkpoint.

Specs are built from config.json and the checkpoint's tensor names alone, before any weight is read.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hfmerge.arch import bert, exaone4, gemma, gpt2, gpt_neox, llama, olmo2, phi3, qwen3
from hfmerge.arch.permute import axis_length
from hfmerge.arch.spec import ArchSpec
from hfmerge.errors import ArchitectureError, UnknownNameError


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
    for module in (bert, gpt2, gpt_neox, llama, qwen3, gemma, phi3, olmo2, exaone4)
)
FAMILIES: dict[str, Builder] = {info.name: build for info, build in _REGISTRY}
MODEL_TYPES: dict[str, str] = {t: info.name for info, _ in _REGISTRY for t in info.model_types}


def list_families() -> list[FamilyInfo]:
    """Every supported family with its model types and a one-line description."""
    return [info for info, _ in _REGISTRY]


def family_of(config: Mapping[str, Any], *, label: str = "model") -> str:
    """The family name for config.json's `model_type`."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ArchitectureError(
            label,
            "config.json has no `model_type`",
            fix="use the config.json saved with the model by transformers",
        )
    if model_type not in MODEL_TYPES:
        raise UnknownNameError(
            "architecture (model_type)", model_type, list(MODEL_TYPES), owner=label
        )
    return MODEL_TYPES[model_type]


def spec_for(
    config: dict[str, Any], tensor_names: Collection[str], *, label: str = "model"
) -> ArchSpec:
    """The spec of one checkpoint: every tensor name in it, with the group acting on each axis.

    Args:
        config: parsed config.json (a dict, not a transformers config object).
        tensor_names: names in the safetensors checkpoint (or a state dict's keys).
        label: the model's name in error messages.

    Raises:
        UnknownNameError: the model_type is not supported.
        ArchitectureError: the config lacks a size, or names are unknown to / missing from the spec.
    """
    return FAMILIES[family_of(config, label=label)](config, tensor_names, label=label)


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
    "MODEL_TYPES",
    "FamilyInfo",
    "check_shapes",
    "family_of",
    "list_families",
    "spec_for",
]

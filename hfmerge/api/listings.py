"""`methods`, `archs` and `zoo`: what hfmerge offers, as data (see `hfmerge.api`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hfmerge.arch import FamilyInfo
    from hfmerge.methods import ParameterInfo


@dataclass(frozen=True)
class MethodInfo:
    """One merge method as `hfmerge methods` lists it."""

    name: str
    summary: str
    paper: str
    needs_base: bool
    min_models: int  # models other than the base, for methods that need one
    max_models: int | None  # None: any number
    parameters: list[ParameterInfo]  # global ones, then per-model ones
    optional_base: bool = False  # no base needed; with one, it merges the task vectors


def methods() -> list[MethodInfo]:
    """The merge methods, with their parameters and papers, simple to elaborate.

    Returns:
        One `MethodInfo` per method.
    """
    from hfmerge.methods import describe_parameters, list_methods

    return [
        MethodInfo(
            m.name,
            m.summary,
            m.paper,
            m.needs_base,
            m.min_models,
            m.max_models,
            describe_parameters(m),
            m.optional_base,
        )
        for m in list_methods()
    ]


def archs() -> list[FamilyInfo]:
    """The supported architecture families.

    Returns:
        Each family's name, the config `model_type`s it covers, and a one-line description.
    """
    from hfmerge.arch import list_families

    return list_families()


@dataclass(frozen=True)
class ZooMember:
    """One model of the offline zoo, built and cached."""

    name: str
    path: Path
    description: str

    @property
    def ref(self) -> str:
        """How to name it as a model: `zoo:NAME`."""
        return f"zoo:{self.name}"


def zoo(*, progress: bool = True) -> list[ZooMember]:
    """Build (or find cached) every member of the offline model zoo.

    Args:
        progress: draw training progress on stderr.

    Returns:
        Each member's name, model directory and description.

    Raises:
        OutputError: the zoo cache cannot be written.
    """
    from hfmerge.zoo import ZOO_MEMBERS, build_zoo

    built = build_zoo(progress=progress)
    return [ZooMember(name, path, ZOO_MEMBERS[name]) for name, path in built.items()]


__all__ = ["MethodInfo", "ZooMember", "archs", "methods", "zoo"]

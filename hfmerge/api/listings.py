"""`methods`, `archs` and `zoo`: what hfmerge offers, as data (see `hfmerge.api`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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


@dataclass(frozen=True)
class ArchSupport:
    """One row of `hfmerge archs`: a family, or every other model_type, and what runs on it."""

    name: str  # the family; `generic` for the last row
    model_types: tuple[str, ...]  # config.json model_types it covers; () for the generic row
    description: str
    merge: bool  # every merge method
    align: bool  # `align:`, `hfmerge align`, `barrier --align weight|activation`
    repair: bool  # `align.repair`, `barrier --align MODE+repair`
    cka: bool  # the recipe's CKA gate `check:`
    route: bool  # a `route:` recipe's router backbone

    @property
    def capabilities(self) -> dict[str, bool]:
        """Each feature column of the table, in order."""
        return {
            "merge": self.merge,
            "align": self.align,
            "repair": self.repair,
            "cka": self.cka,
            "route": self.route,
        }


def archs() -> list[ArchSupport]:
    """The architecture families with a permutation spec, then every other model_type.

    Returns:
        One row per family (its name, the config `model_type`s it covers, a one-line description
        and which features run on it), then the `generic` row: any other model_type a
        transformers checkpoint has merges, and nothing that needs a permutation spec runs.
    """
    from hfmerge.align.repair_sites import SITES
    from hfmerge.arch import GENERIC_FAMILY, list_families
    from hfmerge.arch.generic import DESCRIPTION

    rows = [
        ArchSupport(f.name, f.model_types, f.description, True, True, f.name in SITES, True, True)
        for f in list_families()
    ]
    generic = ArchSupport(GENERIC_FAMILY, (), DESCRIPTION, True, False, False, False, False)
    return [*rows, generic]


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


__all__ = ["ArchSupport", "MethodInfo", "ZooMember", "archs", "methods", "zoo"]

"""Checks on a `slices:` recipe: the slices' shape, their bases and their method parameters.

Like `recipe/checks.py`, they read the raw mapping, so every problem is reported at once.
Block ranges are checked against the models' depths later, from their configs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hfmerge.methods.base import MergeMethod
from hfmerge.recipe.entry_keys import SOURCE_KEYS
from hfmerge.recipe.yaml_locations import Location

# Steps that compare or permute whole models block by block, which a stack of ranges is not.
_WHOLE_MODEL_STEPS = {
    "align": "alignment maps each model onto the base block by block",
    "check": "the CKA gate compares whole models",
    "route": "routing sends each input to one whole model",
}


def slice_problems(
    data: Mapping[str, Any], method: MergeMethod | None
) -> list[tuple[Location, str]]:
    """Every problem of `slices:` (none when the recipe has none)."""
    slices = data.get("slices")
    if slices is None:
        return []
    problems: list[tuple[Location, str]] = []
    if data.get("models"):
        problems.append(
            (("slices",), "give `slices:` or `models:`, not both (slices name their models)")
        )
    problems += _whole_model_steps(data)
    if not isinstance(slices, list):
        return problems
    if method is not None:  # an optional base is the recipe's `base:`, as in `run_recipe`
        method = method.with_base(data.get("base") is not None)
    for index, one in enumerate(slices):
        if isinstance(one, Mapping):
            problems += _one_slice(data, index, one, method)
    return problems


def _whole_model_steps(data: Mapping[str, Any]) -> list[tuple[Location, str]]:
    problems: list[tuple[Location, str]] = []
    for key, why in _WHOLE_MODEL_STEPS.items():
        section = data.get(key)
        active = section is not None and not (
            key == "align"
            and isinstance(section, Mapping)
            and section.get("method", "none") == "none"
        )
        if key == "check" and isinstance(section, Mapping):
            active = section.get("cka_min") is not None
        if active:
            problems.append(
                ((key,), f"`{key}:` does not apply to a `slices:` recipe ({why}); remove it")
            )
    return problems


def _one_slice(
    data: Mapping[str, Any], index: int, one: Mapping[str, Any], method: MergeMethod | None
) -> list[tuple[Location, str]]:
    sources = [s for s in one.get("sources") or [] if isinstance(s, Mapping)]
    where: Location = ("slices", index)
    problems = _range_problems(where, sources)
    if method is None or not sources:
        return problems
    base = one.get("base", data.get("base"))
    names = [s.get("model") for s in sources]
    if method.optional_base and not method.needs_base and one.get("base") is not None:
        message = (
            f"{method.name} takes its base from the recipe's top-level `base:` (without one it "
            "merges the models themselves); move `base:` there"
        )
        return [*problems, ((*where, "base"), message)]
    if method.needs_base:
        if base is None:
            return [*problems, ((*where, "base"), f"{method.name} needs a base: set `base:`")]
        if base not in names:
            return [
                *problems,
                (
                    (*where, "base"),
                    f"the base {base!r} is not one of this slice's sources "
                    f"({', '.join(map(str, names))}); list its block range among the sources",
                ),
            ]
    positions = [i for i, name in enumerate(names) if not method.needs_base or name != base]
    return problems + _parameter_problems(data, where, one, sources, positions, method)


def _range_problems(
    where: Location, sources: Sequence[Mapping[str, Any]]
) -> list[tuple[Location, str]]:
    problems: list[tuple[Location, str]] = []
    lengths = set()
    for i, source in enumerate(sources):
        span = source.get("layer_range")
        if not (
            isinstance(span, list | tuple)
            and len(span) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
        ):
            continue  # the schema reports its type
        start, stop = span
        if not 0 <= start < stop:
            problems.append(
                (
                    (*where, "sources", i, "layer_range"),
                    f"[{start}, {stop}] is not a range of blocks: give [START, STOP) with "
                    "0 <= START < STOP",
                )
            )
        else:
            lengths.add(stop - start)
    if len(lengths) > 1:
        problems.append(
            (
                (*where, "sources"),
                f"the sources span different numbers of blocks ({sorted(lengths)}): a slice merges "
                "block by block, so every source needs a range of the same length",
            )
        )
    return problems


def _parameter_problems(
    data: Mapping[str, Any],
    where: Location,
    one: Mapping[str, Any],
    sources: Sequence[Mapping[str, Any]],
    positions: Sequence[int],
    method: MergeMethod,
) -> list[tuple[Location, str]]:
    from hfmerge.methods.schedule import schedule_for  # late: the method registry

    merge = data.get("merge")
    shared = merge.get("parameters") if isinstance(merge, Mapping) else None
    own = one.get("parameters")
    shared = shared if isinstance(shared, Mapping) else {}
    own = own if isinstance(own, Mapping) else {}
    per_model = [{k: v for k, v in sources[i].items() if k not in SOURCE_KEYS} for i in positions]
    problems = []
    for loc, message in schedule_for(method, {**shared, **own}, per_model).problems():
        if loc[:1] == ("parameters",):
            key = loc[1]
            loc = (*where, *loc) if key in own else ("merge", *loc)
        elif loc[:1] == ("models",) and len(loc) >= 2 and isinstance(loc[1], int):
            loc = (*where, "sources", positions[loc[1]], *loc[2:])
        elif loc == ("models",):
            loc = (*where, "sources")
        problems.append((loc, message))
    return problems

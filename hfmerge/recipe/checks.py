"""Checks on a recipe that the schema alone cannot make: method names, parameters, model counts.

They run on the raw mapping, so they still report their problems when the schema check fails
elsewhere: the user sees every problem of the recipe in one error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hfmerge.errors import did_you_mean
from hfmerge.methods import METHODS
from hfmerge.recipe.entry_keys import MODEL_KEYS
from hfmerge.recipe.slice_checks import slice_problems
from hfmerge.recipe.tokenizer_checks import tokenizer_problems
from hfmerge.recipe.yaml_locations import Location
from hfmerge.tensors import parse_size


def semantic_problems(data: Mapping[str, Any]) -> list[tuple[Location, str]]:
    """Every problem beyond the schema, as (location, message) pairs."""
    problems = _merge_xor_route(data)
    if data.get("models") is None and data.get("slices") is None:
        problems.append((("models",), "required key is missing"))
    problems += _merge_problems(data)
    problems += _route_problems(data)
    problems += _output_problems(data)
    problems += _repair_problems(data)
    problems += tokenizer_problems(data)
    return problems


def _named(entry: Mapping[str, Any]) -> Any:
    """How `base:` names a model entry: `BASE+ADAPTER` for one with `lora:`."""
    model, lora = entry.get("model"), entry.get("lora")
    return f"{model}+{lora}" if isinstance(model, str) and isinstance(lora, str) else model


def _repair_problems(data: Mapping[str, Any]) -> list[tuple[Location, str]]:
    align, merge = data.get("align"), data.get("merge")
    if not isinstance(align, Mapping) or align.get("repair") is not True:
        return []
    method = merge.get("method") if isinstance(merge, Mapping) else None
    if method == "linear":
        return _varying_weight_problems(data)
    return [
        (
            ("align", "repair"),
            "REPAIR rescales toward the merge-weighted blend of the inputs' "
            f"statistics, which only a `linear` merge defines (this recipe has "
            f"{'merge method ' + repr(method) if method else 'no merge'}): use `merge: {{method: "
            "linear}` or drop `repair`",
        )
    ]


def _varying_weight_problems(data: Mapping[str, Any]) -> list[tuple[Location, str]]:
    """REPAIR blends the inputs' statistics with one weight per model, for the whole network."""
    from hfmerge.methods.settings import varies

    merge = data.get("merge")
    shared = merge.get("parameters") if isinstance(merge, Mapping) else None
    places: list[tuple[Location, Any]] = []
    if isinstance(shared, Mapping):
        places.append((("merge", "parameters", "weight"), shared.get("weight")))
    places += [
        (("models", i, "weight"), e.get("weight")) for i, e in enumerate(_model_entries(data))
    ]
    return [
        (
            where,
            "REPAIR blends the inputs' statistics with one weight per model: a gradient or "
            "filter list cannot be used with `align: {repair: true}`; give one number",
        )
        for where, value in places
        if varies(value)
    ]


def _merge_xor_route(data: Mapping[str, Any]) -> list[tuple[Location, str]]:
    has_merge, has_route = data.get("merge") is not None, data.get("route") is not None
    if has_merge == has_route:
        return [
            (
                (),
                "give exactly one of `merge:` (average the models) or `route:` (send each "
                f"input to one model); this recipe has {'both' if has_merge else 'neither'}",
            )
        ]
    return []


def _model_entries(data: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    models = data.get("models")
    if not isinstance(models, list):
        return []
    return [m if isinstance(m, Mapping) else {"model": m} for m in models]


def _merge_problems(data: Mapping[str, Any]) -> list[tuple[Location, str]]:
    merge = data.get("merge")
    if not isinstance(merge, Mapping) or not isinstance(merge.get("method"), str):
        return slice_problems(data, None)
    name = merge["method"]
    method = METHODS.get(name)
    if method is None:
        return [(("merge", "method"), _unknown_method(name)), *slice_problems(data, None)]
    if data.get("slices") is not None:
        return slice_problems(data, method)
    entries = _model_entries(data)
    base = data.get("base")
    method = method.with_base(base is not None)
    # Task-vector methods merge the models other than the base; the rest merge every listed model.
    positions = [i for i, e in enumerate(entries) if not method.needs_base or _named(e) != base]
    per_model = [{k: v for k, v in entries[i].items() if k not in MODEL_KEYS} for i in positions]
    problems: list[tuple[Location, str]] = []
    if method.needs_base and not base:
        problems.append(
            (
                ("base",),
                f"method {name!r} builds on a base model: set `base:` to "
                "the model the others were fine-tuned from",
            )
        )
    params = merge.get("parameters") or {}
    if isinstance(params, Mapping) and (not method.needs_base or base):
        for loc, msg in _method_param_problems(method, params, per_model):
            problems.append((_relocate(loc, positions), msg))
    return problems


def _method_param_problems(
    method: Any, params: Mapping[str, Any], per_model: list[dict[str, Any]]
) -> list[tuple[Location, str]]:
    from hfmerge.methods.schedule import schedule_for

    problems = schedule_for(method, params, per_model).problems()
    return [(tuple(loc), msg) for loc, msg in problems]


def _relocate(loc: Location, positions: list[int]) -> Location:
    """Map ("models", i, key) over the method's inputs to the index in the recipe's list."""
    if loc[:1] == ("parameters",):
        return ("merge", *loc)
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int) and loc[1] < len(positions):
        return ("models", positions[loc[1]], *loc[2:])
    return loc


def _unknown_method(name: str) -> str:
    hint = did_you_mean(name, METHODS)
    valid = f"valid methods: {', '.join(sorted(METHODS))}"
    return f"unknown merge method {name!r}; " + (f"{hint} {valid}" if hint else valid)


def _route_problems(data: Mapping[str, Any]) -> list[tuple[Location, str]]:
    route = data.get("route")
    if not isinstance(route, Mapping):
        return []
    experts, models = route.get("experts"), data.get("models")
    if not isinstance(models, list):
        return []
    problems: list[tuple[Location, str]] = []
    if len(models) < 2:
        problems.append((("models",), "routing needs at least 2 models to choose between"))
    if not experts:
        problems.append(
            (
                ("route",),
                "no `experts:`: give one calibration entry per model "
                "(`- data: FILE`), in the order of `models:`",
            )
        )
    elif isinstance(experts, list) and len(experts) != len(models):
        problems.append(
            (
                ("route", "experts"),
                (
                    f"{len(experts)} experts for {len(models)} models: give one calibration entry "
                    "per model, in the order of `models:`"
                ),
            )
        )
    default = route.get("default_expert")
    if isinstance(default, int) and not isinstance(default, bool) and default >= len(models):
        problems.append(
            (
                ("route", "default_expert"),
                (
                    f"default_expert {default} is not a model index; use 0 to {len(models) - 1} "
                    "(the order of `models:`)"
                ),
            )
        )
    align = data.get("align")
    if isinstance(align, Mapping) and align.get("method", "none") != "none":
        problems.append(
            (
                ("align", "method"),
                (
                    "alignment has no effect on routing (each input runs one whole expert): remove "
                    "`align:` or use `merge:`"
                ),
            )
        )
    return problems


def _output_problems(data: Mapping[str, Any]) -> list[tuple[Location, str]]:
    output = data.get("output")
    if not isinstance(output, Mapping) or "max_shard_size" not in output:
        return []
    try:
        parse_size(output["max_shard_size"])
    except ValueError as exc:
        return [(("output", "max_shard_size"), str(exc))]
    return []

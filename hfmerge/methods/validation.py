"""Raw recipe mappings -> a method's typed parameters, with every problem located and explained.

A per-model parameter given under `parameters` is the default for every model (as in mergekit);
a value beside a model overrides it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from hfmerge.errors import MethodParameterError, did_you_mean
from hfmerge.methods.base import MergeMethod, count_problem
from hfmerge.methods.params import Location, MethodParams, ModelParams, Problem
from hfmerge.methods.registry import METHODS

Scope = Literal["method", "model"]

# Keys that mergekit recipes carry but hfmerge deliberately has no use for.
_MERGEKIT_ONLY = {
    "int8_mask": "a mergekit memory option; hfmerge never builds the stacked sign mask it "
    "shrinks, so delete the line",
}


@dataclass(frozen=True)
class ParameterInfo:
    """One parameter of a method, for help text and `hfmerge methods`."""

    name: str  # as written in a recipe (`lambda`, not `lambda_`)
    scope: Scope  # "method": under `parameters`; "model": per model, or a default under it
    type: str  # "bool", "float", "float in [0, 1]"
    required: bool
    default: Any  # None when required
    description: str


def param_problems(
    method: MergeMethod, params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]
) -> list[Problem]:
    """Every problem with these parameters, as (location, message); empty when they are valid.

    Locations are ("parameters", key), ("models", i, key) with `i` indexing `model_params`, or
    ("models",) for the model count and checks across models.
    """
    return check_params(method, params, model_params)[2]


def validate_params(
    method: MergeMethod, params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]
) -> tuple[MethodParams, list[ModelParams]]:
    """Typed global and per-model parameters; `MethodParameterError` listing every problem."""
    global_params, per_model, problems = check_params(method, params, model_params)
    if problems or global_params is None:
        listing = "; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in problems)
        raise MethodParameterError(method.name, listing, fix=f"{method.name} takes {usage(method)}")
    return global_params, [one for one in per_model if one is not None]


def describe_parameters(method: MergeMethod) -> list[ParameterInfo]:
    """The method's global parameters, then its per-model ones."""
    return [*_describe(method.params, "method"), *_describe(method.model_params, "model")]


def usage(method: MergeMethod) -> str:
    """`parameters: t (required); per model: nothing`, for error messages."""

    def listing(scope: Scope) -> str:
        infos = [info for info in describe_parameters(method) if info.scope == scope]
        return ", ".join(_short(info) for info in infos) or "nothing"

    return f"parameters: {listing('method')}; per model: {listing('model')}"


def _short(info: ParameterInfo) -> str:
    if info.required:
        return f"{info.name} (required)"
    default = str(info.default).lower() if isinstance(info.default, bool) else info.default
    return f"{info.name}={default}"


def _describe(cls: type[BaseModel], scope: Scope) -> list[ParameterInfo]:
    infos = []
    for name, field in cls.model_fields.items():
        kind = _kind(field.annotation, field.metadata)
        required = field.is_required()
        infos.append(
            ParameterInfo(
                field.alias or name,
                scope,
                kind,
                required,
                None if required else field.default,
                field.description or "",
            )
        )
    return infos


def _kind(annotation: Any, metadata: Sequence[Any]) -> str:
    """`float in [0, 1]`, `int >= 1`, `float in (0, 1]`; `... or none` for an optional value."""
    options = [arg for arg in get_args(annotation) if arg is not type(None)]
    if get_origin(annotation) in (Union, UnionType) and len(options) == 1:
        return f"{_kind(*_unwrap(options[0]))} or none"
    kind: str = getattr(annotation, "__name__", str(annotation))
    low = _bound(metadata, "ge")
    above = _bound(metadata, "gt")
    high = _bound(metadata, "le")
    if high is not None and low is not None:
        return f"{kind} in [{low:g}, {high:g}]"
    if high is not None and above is not None:
        return f"{kind} in ({above:g}, {high:g}]"
    if low is not None:
        return f"{kind} >= {low:g}"
    return kind


def _bound(metadata: Sequence[Any], name: str) -> float | None:
    """The constraint `name` (ge, gt, le) among a field's metadata, if any."""
    return next((getattr(m, name) for m in metadata if getattr(m, name, None) is not None), None)


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """(type, constraints) of an `Annotated[type, ...]` inside an optional annotation."""
    if get_origin(annotation) is Annotated:
        inner, *extras = get_args(annotation)
        return inner, [c for extra in extras for c in getattr(extra, "metadata", [extra])]
    return annotation, []


def param_keys(cls: type[BaseModel]) -> set[str]:
    """The parameters of a parameter class as a recipe spells them (`lambda`, not `lambda_`)."""
    return {field.alias or name for name, field in cls.model_fields.items()}


def check_params(
    method: MergeMethod,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    *,
    across_models: bool = True,
) -> tuple[MethodParams | None, list[ModelParams | None], list[Problem]]:
    """(typed global parameters, typed per-model ones, problems) of single values; a part that
    fails is None. `across_models=False` skips the method's checks across models (which a
    per-tensor setting can only fail for some tensors)."""
    model_keys = param_keys(method.model_params)
    shared = {key: value for key, value in params.items() if key in model_keys}
    own = {key: value for key, value in params.items() if key not in model_keys}
    problems: list[Problem] = []
    count = count_problem(method, len(model_params))
    if count:
        problems.append((("models",), count))
    global_params = _validate_global(method, own, problems)
    per_model = [
        _validate_model(method, index, _defaults_for(method, shared, one), dict(one), problems)
        for index, one in enumerate(model_params)
    ]
    checked = global_params is not None and None not in per_model
    if across_models and method.cross_check and checked:
        assert global_params is not None
        valid = [one for one in per_model if one is not None]
        problems.extend(method.cross_check(global_params, valid))
    return global_params, per_model, _unique(problems)


def _defaults_for(
    method: MergeMethod, shared: Mapping[str, Any], own: Mapping[str, Any]
) -> dict[str, Any]:
    """The shared per-model defaults that apply to a model with its `own` settings: those not
    replaced by an alternative the model gives itself (its `rank` replaces a shared `energy`)."""
    replaced = {
        key
        for group in method.model_params.alternatives
        if group & set(own)
        for key in group
        if key not in own
    }
    return {key: value for key, value in shared.items() if key not in replaced}


def _validate_global(
    method: MergeMethod, given: Mapping[str, Any], problems: list[Problem]
) -> MethodParams | None:
    try:
        return method.params.model_validate(given)
    except ValidationError as error:
        for detail in error.errors(include_url=False):
            problems.append((("parameters", *detail["loc"]), _message(method, detail, "method")))
        return None


def _validate_model(
    method: MergeMethod,
    index: int,
    shared: Mapping[str, Any],
    own: Mapping[str, Any],
    problems: list[Problem],
) -> ModelParams | None:
    cls = method.model_params
    try:
        return cls.model_validate({**shared, **own})
    except ValidationError as error:
        for detail in error.errors(include_url=False):
            loc = tuple(detail["loc"]) or ((cls.blame,) if cls.blame else ())
            problems.append((_origin(loc, index, shared, own), _message(method, detail, "model")))
        return None


def _origin(
    loc: Location, index: int, shared: Mapping[str, Any], own: Mapping[str, Any]
) -> Location:
    """Where the user wrote the faulty value: beside model `index`, or under `parameters`."""
    if loc and loc[0] not in own and loc[0] in shared:
        return ("parameters", *loc)
    return ("models", index, *loc)


def _message(method: MergeMethod, detail: ErrorDetails, scope: Scope) -> str:
    key = str(detail["loc"][-1]) if detail["loc"] else ""
    if detail["type"] == "extra_forbidden":
        return _unknown_key(method, key, scope)
    if detail["type"] == "missing":
        if scope == "model":
            return (
                f"{method.name} needs `{key}` for every model: set it beside each model, or "
                "once under `parameters` for all"
            )
        return f"{method.name} needs `{key}`"
    text = detail["msg"].removeprefix("Value error, ")
    return f"{text} (got {detail['input']!r})" if detail["loc"] else text


def _unknown_key(method: MergeMethod, key: str, scope: Scope) -> str:
    if scope == "model" and key in param_keys(method.params):
        return f"`{key}` applies to the whole merge: move it under `parameters`"
    accepted = sorted(param_keys(method.params) | param_keys(method.model_params))
    text = f"{method.name} has no parameter `{key}`"
    if key in _MERGEKIT_ONLY:
        return f"{text}: {_MERGEKIT_ONLY[key]}"
    hint = did_you_mean(key, accepted)
    if hint:
        return f"{text}; {hint}"
    owners = [
        m.name for m in METHODS.values() if key in param_keys(m.params) | param_keys(m.model_params)
    ]
    if owners:
        text += f" (it belongs to {', '.join(owners)})"
    return f"{text}; it takes {usage(method)}"


def _unique(problems: list[Problem]) -> list[Problem]:
    # A bad default under `parameters` fails for every model; report it once.
    return list(dict.fromkeys(problems))

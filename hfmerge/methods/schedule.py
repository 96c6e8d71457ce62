"""A method's parameters over the whole merge: one typed set per tensor, from varying settings.

`ParamSchedule` holds the recipe's raw settings (the method's `parameters` and each input's own)
and gives each tensor its typed `MergeParams`, resolving gradients and filters
(`methods/settings.py`) with mergekit's precedence: an input's own setting, then the recipe-wide
one under `parameters`, then the method's default. A setting that no filter entry matches for a
tensor falls through to the next source.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hfmerge.errors import MethodParameterError
from hfmerge.methods import settings
from hfmerge.methods.base import MergeMethod
from hfmerge.methods.params import Location, MergeParams, ModelParams, Problem
from hfmerge.methods.validation import check_params, param_keys, usage

Raw = Mapping[str, Any]


@dataclass(frozen=True)
class ParamSchedule:
    """The raw settings of one merge, resolved per tensor on demand.

    Attributes:
        method: the merge method.
        given: the recipe's `parameters` (method parameters, and per-model defaults).
        per_model: each input's own settings, in the order the method receives the inputs.
        fallback: settings that apply where `given` has none for a tensor (the merge's
            `parameters` under a slice's); checked where they are given, not here.
    """

    method: MergeMethod
    given: Raw
    per_model: tuple[Raw, ...]
    # Settings below `given` in precedence (a slice's `parameters` fall back to the merge's).
    fallback: Raw = field(default_factory=dict)
    _cache: dict[str, MergeParams] = field(default_factory=dict, compare=False, repr=False)

    @property
    def varies(self) -> bool:
        """Whether some setting is a gradient or a filter list."""
        return any(settings.varies(v) for raw in self._sources() for v in raw.values())

    def _sources(self) -> list[Raw]:
        return [self.given, *self.per_model]

    def problems(self) -> list[Problem]:
        """Every problem of the settings, each at its key (and entry) in the recipe.

        Each single value inside a gradient or filter list is checked as if given alone; a check
        across models (e.g. weights summing to zero) is left to `at`, which sees each tensor's
        combination.
        """
        problems: list[Problem] = []
        first: list[dict[str, Any]] = [{} for _ in self._sources()]  # each first single value
        varying: dict[Location, Any] = {}
        for source, raw in enumerate(self._sources()):
            for key, setting in raw.items():
                where = _key_location(source, key)
                shape = settings.shape_problems(setting)
                problems += [((*where, *path), message) for path, message in shape]
                if shape:
                    continue  # reported already; its values are checked once it is fixed
                leaf = next(settings.leaves(setting), None)
                if leaf is not None:
                    first[source][key] = leaf[1]
                if settings.varies(setting):
                    varying[where] = setting
        found = check_params(self.method, first[0], first[1:], across_models=not self.varies)[2]
        # A varying setting's values are checked one by one below, each at its own place.
        problems += [p for p in found if not any(_under(p[0], where) for where in varying)]
        for where, setting in varying.items():
            problems += self._leaf_problems(first, where, setting)
        return list(dict.fromkeys(problems))

    def at(self, tensor_name: str, t: float) -> MergeParams:
        """The typed parameters of the tensor `tensor_name` at relative depth `t`.

        Raises:
            MethodParameterError: the settings give this tensor values that do not work together
                (e.g. weights that sum to zero), naming the tensor.
        """
        resolved = [self._resolve(raw, tensor_name, t) for raw in self._sources()]
        resolved[0] = {**self._resolve(self.fallback, tensor_name, t), **resolved[0]}
        key = json.dumps(resolved, sort_keys=True, default=str)
        if key not in self._cache:
            self._cache[key] = self._typed(resolved, tensor_name)
        return self._cache[key]

    def card_values(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(method parameters, each input's parameters) for the card: typed values with their
        defaults, and a varying setting as it was given."""
        typed = self.at("", 0.0)
        method = typed.method.model_dump(by_alias=True)
        method.update({k: v for k, v in self.given.items() if k in method and settings.varies(v)})
        inputs = []
        for one, raw in zip(typed.models, self.per_model, strict=True):
            values = one.model_dump(by_alias=True)
            defaults = {k: v for k, v in self.given.items() if k in values and k not in raw}
            values.update({k: v for k, v in {**defaults, **raw}.items() if settings.varies(v)})
            inputs.append(values)
        return method, inputs

    def constant_models(self) -> list[ModelParams]:
        """Each input's parameters when none of them varies per tensor (REPAIR blends with one
        weight per model); a `MethodParameterError` otherwise."""
        per_model_keys = param_keys(self.method.model_params)
        varying = sorted(
            key
            for raw in self._sources()
            for key, value in raw.items()
            if key in per_model_keys and settings.varies(value)
        )
        if varying:
            raise MethodParameterError(
                self.method.name,
                f"`{varying[0]}` varies per tensor, and this step needs one value per model",
                fix=f"give `{varying[0]}` one number per model",
            )
        return list(self.at("", 0.0).models)

    @staticmethod
    def _resolve(raw: Raw, tensor_name: str, t: float) -> dict[str, Any]:
        resolved = {key: settings.resolve(value, tensor_name, t) for key, value in raw.items()}
        return {key: value for key, value in resolved.items() if value is not settings.UNSET}

    def _typed(self, resolved: list[dict[str, Any]], tensor_name: str) -> MergeParams:
        method_params, per_model, problems = check_params(self.method, resolved[0], resolved[1:])
        if problems or method_params is None or None in per_model:
            listing = "; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in problems)
            where = f" for tensor {tensor_name}" if tensor_name else ""
            raise MethodParameterError(
                self.method.name,
                f"the settings give{where} {listing}",
                fix=f"change the gradient or filter so every tensor gets valid values; "
                f"{self.method.name} takes {usage(self.method)}",
            )
        models = tuple(one for one in per_model if one is not None)
        return MergeParams(method=method_params, models=models)

    def _leaf_problems(
        self, first: list[dict[str, Any]], where: Location, setting: Any
    ) -> list[Problem]:
        """Problems of each single value of the varying setting at `where`, at its own place."""
        source = 0 if where[0] == "parameters" else int(where[1]) + 1
        key = str(where[-1])
        problems: list[Problem] = []
        for path, value in settings.leaves(setting):
            trial = [dict(one) for one in first]
            trial[source][key] = value
            found = check_params(self.method, trial[0], trial[1:], across_models=False)[2]
            for loc, message in found:
                if _under(loc, where):
                    problems.append(((*where, *path, *loc[len(where) :]), message))
        return problems


def _under(loc: Location, where: Location) -> bool:
    return tuple(loc[: len(where)]) == where


def _key_location(source: int, key: str) -> Location:
    """Where a source's setting sits in the recipe: source 0 is `parameters`, the rest models."""
    return ("parameters", key) if source == 0 else ("models", source - 1, key)


def schedule_for(
    method: MergeMethod, given: Raw, per_model: Sequence[Raw], *, fallback: Raw | None = None
) -> ParamSchedule:
    """The schedule of `method` with the recipe's `parameters` and each input's own settings
    (and, for a slice, its own `parameters` as `given` over the merge's as `fallback`)."""
    return ParamSchedule(
        method, dict(given), tuple(dict(one) for one in per_model), dict(fallback or {})
    )

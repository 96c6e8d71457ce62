"""The types of the merge-method contract: parameters, problems and the pure tensor function.

Kept apart from `base.py` so that the chunked forms (`chunks.py`) can name them without importing
the method record that names the chunked forms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar, Protocol, TypeVar

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

Location = tuple[str | int, ...]  # ("parameters", key), ("models", i, key) or ("models",)
Problem = tuple[Location, str]


def _reject_bool(value: object) -> object:
    # pydantic reads `density: yes` (a YAML bool) as 1.0; a boolean here is always a slip.
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


# Numeric strings stay accepted: PyYAML reads `1e-5` (no dot) as a string.
Number = Annotated[float, BeforeValidator(_reject_bool), Field(allow_inf_nan=False)]
Fraction = Annotated[
    float, BeforeValidator(_reject_bool), Field(ge=0.0, le=1.0, allow_inf_nan=False)
]
Flag = StrictBool
# An iteration count; a YAML integer (or a gradient value that lands on one), never a fraction.
Count = Annotated[int, BeforeValidator(_reject_bool), Field(ge=0)]


class MethodParams(BaseModel):
    """Parameters of a method that apply to the whole merge (slerp `t`, ties `normalize`, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelParams(BaseModel):
    """Parameters given per input model (weight, density, ...); empty for methods without any."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Field that a model-level (cross-field) check reports its error at.
    blame: ClassVar[str | None] = None


class WeightedModelParams(ModelParams):
    """Per-model weight. mergekit requires it; 1.0 (equal weights, as in the papers) is the
    default here, so `models: [a, b]` with `linear` is the uniform soup."""

    weight: Number = Field(1.0, description="how much this model contributes")


@dataclass(frozen=True)
class MergeParams:
    """The typed parameters one tensor is merged with: the method's, and each input's."""

    method: MethodParams
    models: tuple[ModelParams, ...]


class MergeFn(Protocol):
    """A pure tensor function: float32 inputs of one shape in, one float32 tensor of it out.

    For `needs_base` methods `tensors` holds every model except the base and `base` is the base;
    otherwise `tensors` holds every listed model and `base` may be None. `model_params[i]` belongs
    to `tensors[i]`. Random methods draw only from `generator` (torch's global one when None).
    """

    def __call__(
        self,
        tensors: Sequence[torch.Tensor],
        /,
        *,
        base: torch.Tensor | None,
        model_params: Sequence[ModelParams],
        params: MethodParams,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Merge `tensors` (with `base`) into one float32 tensor of their shape."""
        ...


CrossCheck = Callable[[MethodParams, Sequence[ModelParams]], list[Problem]]


P = TypeVar("P", bound=BaseModel)


def as_params(value: object, cls: type[P]) -> P:
    """`value` typed as `cls`; a TypeError when the engine passed another method's parameters."""
    if not isinstance(value, cls):
        raise TypeError(f"expected {cls.__name__}, got {type(value).__name__}")
    return value

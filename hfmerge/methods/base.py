"""The merge-method contract: typed parameters, the pure tensor-function protocol, the record.

A method never does I/O: the engine hands it float32 tensors of one shape and casts the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from hfmerge.methods.chunks import FunctionMerge, StreamFactory, TensorMerge
from hfmerge.methods.params import CrossCheck, MergeFn, MethodParams, ModelParams, as_params

ZERO_WEIGHT_SUM = 1e-8  # |sum of weights| below this cannot be divided by (mergekit's threshold)


@dataclass(frozen=True, kw_only=True)
class MergeMethod:
    """One merge method: what it is, what it needs, and its pure tensor function.

    `min_models` / `max_models` count the tensors passed in `tensors`: for `needs_base` methods
    that is the models other than the base. A method with `optional_base` merges every model
    without a base, and works relative to the base when a recipe names one (`with_base`).
    """

    name: str
    summary: str
    paper: str
    params: type[MethodParams]
    model_params: type[ModelParams]
    fn: MergeFn
    # Defaults describe the common case, a task-vector method over one or more fine-tunes.
    needs_base: bool = True
    optional_base: bool = False  # only with needs_base=False: a recipe's `base:` is then used
    min_models: int = 1
    max_models: int | None = None
    deterministic: bool = True
    cross_check: CrossCheck | None = None  # checks across models, e.g. linear's zero weight sum
    # The chunked form (methods/chunks.py); None: the engine hands `fn` whole tensors.
    stream: StreamFactory | None = None

    def with_base(self, has_base: bool) -> MergeMethod:
        """The form of this method a recipe runs: with an `optional_base` and a base named, the
        same method taking that base apart from the other models (`needs_base`)."""
        if self.optional_base and has_base and not self.needs_base:
            return replace(self, needs_base=True)
        return self

    def tensor_merge(
        self,
        shape: tuple[int, ...],
        *,
        model_params: Sequence[ModelParams],
        params: MethodParams,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> TensorMerge:
        """How the engine merges one tensor: chunk by chunk when the method can, else whole."""
        if self.stream is not None:
            return self.stream(
                shape, model_params=model_params, params=params, generator=generator, device=device
            )
        return FunctionMerge(
            self.fn, model_params=model_params, params=params, generator=generator, whole_only=True
        )

    def merge(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        base: torch.Tensor | None = None,
        model_params: Sequence[ModelParams],
        params: MethodParams,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Call `fn` after checking the call matches this method's contract (engine bugs only)."""
        self._check_call(tensors, base, model_params, params)
        return self.fn(
            tensors, base=base, model_params=model_params, params=params, generator=generator
        )

    def _check_call(
        self,
        tensors: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        model_params: Sequence[ModelParams],
        params: MethodParams,
    ) -> None:
        problem = count_problem(self, len(tensors))
        if problem:
            raise ValueError(f"{self.name}: {problem}")
        if len(model_params) != len(tensors):
            raise ValueError(f"{self.name}: {len(model_params)} model_params for {len(tensors)}")
        if self.needs_base and base is None:
            raise ValueError(f"{self.name} needs a base tensor")
        as_params(params, self.params)
        for one in model_params:
            as_params(one, self.model_params)
        inputs = [*tensors, *([base] if base is not None else [])]
        if any(t.shape != inputs[0].shape or t.dtype != torch.float32 for t in inputs):
            raise ValueError(f"{self.name}: inputs must be float32 of one shape")


def require_base(base: torch.Tensor | None, method: str) -> torch.Tensor:
    """The base tensor of a `needs_base` method."""
    if base is None:
        raise ValueError(f"{method} needs a base tensor")
    return base


def count_problem(method: MergeMethod, count: int) -> str | None:
    """Why `count` models (base excluded for `needs_base` methods) do not fit, or None."""
    low, high = method.min_models, method.max_models
    if low <= count and (high is None or count <= high):
        return None
    if high == low:
        wanted = f"exactly {low}"
    elif high is None:
        wanted = f"at least {low}"
    else:
        wanted = f"between {low} and {high}"
    noun = "model" if wanted.endswith(" 1") else "models"
    if method.needs_base:
        return f"needs a base model plus {wanted} other {noun}; got {count} besides the base"
    return f"needs {wanted} {noun}; got {count}"

"""How task-vector methods combine the sparsified task vectors: weight -> optional sign consensus
-> sum -> normalise -> lambda, the same rule whole (`methods/gta.py`) and chunk by chunk
(`methods/gta_stream.py`, `methods/random_stream.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hfmerge.methods.base import ZERO_WEIGHT_SUM
from hfmerge.methods.gta_stream import Prune


@dataclass(frozen=True)
class TaskVectorSum:
    """`base + lambda * combine(weight_i * prune(tensor_i - base))` for one merge's weights.

    With `consensus` (TIES), each entry takes the sign of the summed weighted task vectors and
    only the task vectors agreeing with it are summed, and normalised by their own weights.
    """

    weights: Sequence[float]
    consensus: bool
    normalize: bool
    lambda_: float

    def __call__(
        self, tensors: Sequence[torch.Tensor], base: torch.Tensor, prune: Prune | None
    ) -> torch.Tensor:
        """The merged tensor (or rows) of `tensors` over `base`; `prune(delta, i)` sparsifies
        model i's task vector (None keeps every entry)."""
        deltas = []
        for index, (tensor, weight) in enumerate(zip(tensors, self.weights, strict=True)):
            delta = tensor - base
            if prune is not None:
                delta = prune(delta, index)
            deltas.append(delta * weight)
        divisor: torch.Tensor | float
        if self.consensus:
            mixed, divisor = _elect(deltas, self.weights)
        else:
            mixed = sum_of(deltas)
            divisor = _weight_sum(self.weights)
        if self.normalize:
            mixed = mixed / divisor
        if self.lambda_ != 1:
            mixed = mixed * self.lambda_
        return base + mixed


def _weight_sum(weights: Sequence[float]) -> float:
    # float32 like mergekit; a vanishing sum leaves the task vectors unnormalised, as there.
    total = float(torch.tensor(list(weights), dtype=torch.float32).sum())
    return 1.0 if abs(total) < ZERO_WEIGHT_SUM else total


def _elect(
    deltas: Sequence[torch.Tensor], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES sign election: sum and weight total of the task-vector entries agreeing with the sign
    of their sum (zero sum counts as positive; zero entries never agree).

    Works one task vector at a time, so no [models, *shape] sign or mask stack is built, and in
    float arithmetic only: bool masks and mixed-dtype products are several times slower on CPU.
    """
    sign = sum_of(deltas).ge_(0).mul_(2).sub_(1)  # +1 where the sum is >= 0, else -1
    magnitude: torch.Tensor | None = None  # sum of |delta| over the agreeing entries
    divisor: torch.Tensor | None = None
    for delta, weight in zip(deltas, weights, strict=True):
        # |delta| where delta agrees with the sign (delta * sign > 0), else 0.
        agreeing = (delta * sign).clamp_(min=0)
        magnitude = agreeing.clone() if magnitude is None else magnitude.add_(agreeing)
        agrees = agreeing.sign_()  # 1 where it agrees, else 0
        divisor = agrees.mul_(weight) if divisor is None else divisor.add_(agrees, alpha=weight)
    assert magnitude is not None
    assert divisor is not None
    # The agreeing entries share the sign, so sign * sum|delta| is their sum, bit for bit.
    mixed = magnitude.mul_(sign)
    no_agreement = torch.eq(divisor, 0, out=torch.empty_like(divisor))
    return mixed, divisor.add_(no_agreement)  # 0 -> 1 (the entry's sum is 0 anyway)


def sum_of(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Elementwise sum, accumulated in place."""
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total += tensor
    return total

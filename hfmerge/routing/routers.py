"""Per-sequence routers: from one input's router features (or every expert's loss) to one expert.

Each router is a little data (tensors + settings) and a scoring function; the shared base turns
scores into probabilities (softmax at a temperature) and a choice (argmax, with an optional
fallback to a default expert when the router is unsure). `ROUTERS` lists them all explicitly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from hfmerge.errors import RoutingError, UnknownNameError
from hfmerge.runtime import fixed_threads

RouterInputs = Literal["features", "losses"]
_STD_FLOOR = 1e-6  # a feature that never varies is left unscaled instead of divided by ~0
_LOGISTIC_L2 = 1e-3  # keeps the weights finite on separable data (it always is, at these sizes)
_LOGISTIC_STEPS = 100


@dataclass(frozen=True)
class RouterSettings:
    """How scores become a choice: softmax temperature, and the low-confidence fallback."""

    temperature: float = 1.0
    min_confidence: float | None = None  # below this top probability, use `default_expert`
    default_expert: int | None = None

    def check(self, num_experts: int) -> None:
        """Raise RoutingError on a temperature <= 0, a bad threshold or a missing default."""
        if not self.temperature > 0:
            raise RoutingError(
                f"temperature {self.temperature} is not positive",
                fix="give a temperature above 0 (lower is more decisive)",
            )
        if self.min_confidence is not None and not 0 <= self.min_confidence <= 1:
            raise RoutingError(
                f"min_confidence {self.min_confidence} is not a probability",
                fix="give a value from 0 to 1",
            )
        if self.min_confidence is not None and self.default_expert is None:
            raise RoutingError(
                "min_confidence is set but no default_expert takes unsure inputs",
                fix="name a default_expert, or drop min_confidence",
            )
        if self.default_expert is not None and not 0 <= self.default_expert < num_experts:
            raise RoutingError(
                f"default expert {self.default_expert} is not one of the {num_experts} experts",
                fix="name one of the experts",
            )

    def to_json(self) -> dict[str, Any]:
        """`temperature`, `min_confidence`, `default_expert` (an index)."""
        return {
            "temperature": self.temperature,
            "min_confidence": self.min_confidence,
            "default_expert": self.default_expert,
        }

    @classmethod
    def from_json(cls, config: Mapping[str, Any]) -> RouterSettings:
        """The settings in a router's `config()`."""
        return cls(
            float(config.get("temperature", 1.0)),
            config.get("min_confidence"),
            config.get("default_expert"),
        )


class Router(ABC):
    """Scores [n, E] from router inputs [n, d] (features) or [n, E] (per-expert losses)."""

    name: ClassVar[str]
    inputs: ClassVar[RouterInputs] = "features"
    default_temperature: ClassVar[float] = 1.0

    def __init__(self, num_experts: int, settings: RouterSettings) -> None:
        if num_experts < 2:
            raise RoutingError(
                f"a router needs at least 2 experts, got {num_experts}",
                fix="route between two or more models",
            )
        settings.check(num_experts)
        self.num_experts = num_experts
        self.settings = settings

    @abstractmethod
    def scores(self, inputs: torch.Tensor) -> torch.Tensor:
        """[n, ...] -> [n, E] logits before the temperature."""

    @classmethod
    @abstractmethod
    def fit(
        cls,
        features: torch.Tensor,
        labels: torch.Tensor,
        *,
        num_experts: int,
        settings: RouterSettings,
        seed: int = 0,
    ) -> Router:
        """A router from calibration inputs [n, ...] and each one's expert index [n]."""

    @abstractmethod
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """What `router.safetensors` holds (may be empty)."""

    @classmethod
    @abstractmethod
    def from_saved(cls, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Router:
        """Rebuild from `config()` and `to_tensors()`; ValueError when they do not fit."""

    def config(self) -> dict[str, Any]:
        """JSON-ready: `type`, `num_experts` and the settings."""
        return {"type": self.name, "num_experts": self.num_experts, **self.settings.to_json()}

    def probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        """[n, E] float32: softmax(scores / temperature)."""
        scores = self.scores(inputs.float())
        return torch.softmax(scores / self.settings.temperature, dim=-1)

    def choose(self, inputs: torch.Tensor) -> torch.Tensor:
        """[n] long: the most probable expert, or the default one where it is below threshold."""
        probabilities = self.probabilities(inputs)  # [n, E]
        top, choice = probabilities.max(dim=-1)
        settings = self.settings
        if settings.min_confidence is not None and settings.default_expert is not None:
            choice = torch.where(
                top < settings.min_confidence,
                torch.full_like(choice, settings.default_expert),
                choice,
            )
        return choice


def _saved(
    tensors: Mapping[str, torch.Tensor], name: str, shape: tuple[int | None, ...]
) -> torch.Tensor:
    """Tensor `name` checked against `shape` (None: any size); ValueError otherwise."""
    if name not in tensors:
        raise ValueError(f"tensor {name!r} is missing")
    tensor = tensors[name].float()
    if tensor.dim() != len(shape) or any(
        want is not None and got != want for got, want in zip(tensor.shape, shape, strict=True)
    ):
        raise ValueError(
            f"tensor {name!r} has shape {tuple(tensor.shape)}, expected "
            f"{tuple('any' if s is None else s for s in shape)}"
        )
    return tensor


def class_means(features: torch.Tensor, labels: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[n, d] features, [n] labels -> [E, d] per-expert mean; every expert needs a sample."""
    counts = torch.bincount(labels, minlength=num_experts)  # [E]
    if bool((counts == 0).any()):
        missing = [int(e) for e in torch.nonzero(counts == 0).flatten()]
        raise RoutingError(
            f"experts {missing} have no calibration sample",
            fix="give every expert calibration text",
        )
    sums = torch.zeros(num_experts, features.shape[1]).index_add_(0, labels, features.float())
    return sums / counts.unsqueeze(1)  # [E, d] / [E, 1]


class CentroidRouter(Router):
    """Training-free: cosine to each expert's centred mean feature (mergekit's `hidden` gates,
    at sequence level, with padding masked).

    Mean-pooled hidden states share a large common direction, so raw centroids all have
    cosine ~1 with each other and with every input. Centring on the mean of the experts'
    centroids (each expert weighted equally, whatever its sample count) removes it.
    """

    name = "centroid"
    default_temperature = 0.1  # cosines differ by ~0.1-1 between experts: a decisive softmax

    def __init__(
        self, centroids: torch.Tensor, center: torch.Tensor, settings: RouterSettings
    ) -> None:
        super().__init__(centroids.shape[0], settings)
        self.centroids = centroids  # [E, d], unit rows
        self.center = center  # [d]

    def scores(self, inputs: torch.Tensor) -> torch.Tensor:
        """Cosine of each centred input [n, d] with each centroid: [n, E]."""
        centred = torch.nn.functional.normalize(inputs - self.center, dim=-1)  # [n, d]
        return centred @ self.centroids.T  # [n, d] @ [d, E] -> [n, E]

    @classmethod
    def fit(
        cls,
        features: torch.Tensor,
        labels: torch.Tensor,
        *,
        num_experts: int,
        settings: RouterSettings,
        seed: int = 0,
    ) -> CentroidRouter:
        """c_e = normalize(mean_e - center), center = mean over experts of mean_e."""
        means = class_means(features, labels, num_experts)  # [E, d]
        center = means.mean(0)  # [d]
        centroids = torch.nn.functional.normalize(means - center, dim=-1)  # [E, d]
        return cls(centroids, center, settings)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """`centroids` [E, d] and `center` [d]."""
        return {"centroids": self.centroids.contiguous(), "center": self.center.contiguous()}

    @classmethod
    def from_saved(
        cls, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
    ) -> CentroidRouter:
        """From `centroids` [E, d] and `center` [d]."""
        centroids = _saved(tensors, "centroids", (config.get("num_experts"), None))
        center = _saved(tensors, "center", (centroids.shape[1],))
        return cls(centroids, center, RouterSettings.from_json(config))


class LogisticRouter(Router):
    """Multinomial logistic regression on standardised features, fitted by full-batch L-BFGS.

    Deterministic (zero init, full batch, fixed step count); classes are weighted equally so a
    larger calibration set does not bias the router towards its expert.
    """

    name = "logistic"

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        settings: RouterSettings,
    ) -> None:
        super().__init__(weight.shape[0], settings)
        self.weight, self.bias = weight, bias  # [E, d], [E]
        self.mean, self.std = mean, std  # [d], [d]

    def scores(self, inputs: torch.Tensor) -> torch.Tensor:
        """Class logits [n, E] of standardised inputs [n, d]."""
        standard = (inputs - self.mean) / self.std  # [n, d]
        return standard @ self.weight.T + self.bias  # [n, d] @ [d, E] + [E] -> [n, E]

    @classmethod
    def fit(
        cls,
        features: torch.Tensor,
        labels: torch.Tensor,
        *,
        num_experts: int,
        settings: RouterSettings,
        seed: int = 0,
    ) -> LogisticRouter:
        """Minimise class-balanced cross-entropy + L2 on the weights (`seed` is unused:
        the fit has no randomness)."""
        features = features.float()
        counts = torch.bincount(labels, minlength=num_experts).float()  # [E]
        class_means(features, labels, num_experts)  # every expert has samples
        mean, std = features.mean(0), features.std(0, correction=0).clamp_min(_STD_FLOOR)
        standard = (features - mean) / std  # [n, d]
        weight = torch.zeros(num_experts, features.shape[1], requires_grad=True)
        bias = torch.zeros(num_experts, requires_grad=True)
        class_weight = counts.sum() / (num_experts * counts)  # [E]
        _minimise(standard, labels, weight, bias, class_weight)
        return cls(weight.detach(), bias.detach(), mean, std, settings)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """`weight` [E, d], `bias` [E], `mean` [d], `std` [d]."""
        return {
            "weight": self.weight.contiguous(),
            "bias": self.bias.contiguous(),
            "mean": self.mean.contiguous(),
            "std": self.std.contiguous(),
        }

    @classmethod
    def from_saved(
        cls, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
    ) -> LogisticRouter:
        """From `weight`, `bias`, `mean`, `std`."""
        weight = _saved(tensors, "weight", (config.get("num_experts"), None))
        experts, dim = weight.shape
        return cls(
            weight,
            _saved(tensors, "bias", (experts,)),
            _saved(tensors, "mean", (dim,)),
            _saved(tensors, "std", (dim,)),
            RouterSettings.from_json(config),
        )


def _minimise(
    standard: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    class_weight: torch.Tensor,
) -> None:
    """L-BFGS on the weighted cross-entropy of `standard @ weight.T + bias`, in place."""
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=_LOGISTIC_STEPS, line_search_fn="strong_wolfe"
    )

    def loss_fn() -> torch.Tensor:
        optimizer.zero_grad()
        logits = standard @ weight.T + bias  # [n, E]
        loss = torch.nn.functional.cross_entropy(logits, labels, weight=class_weight)
        loss = loss + _LOGISTIC_L2 * weight.pow(2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    # One thread: the problem is tiny (threads only spin at barriers), and a fixed thread count
    # keeps the float reductions, hence the fitted weights, the same on every machine.
    with torch.enable_grad(), fixed_threads(1):
        optimizer.step(loss_fn)  # type: ignore[no-untyped-call]


class PerplexityRouter(Router):
    """No weights: every expert scores the input, and the lowest mean token loss wins.

    Its inputs are per-expert losses [n, E] (see `routing.losses.sequence_losses`), so routing
    costs one forward pass per expert.
    """

    name = "perplexity"
    inputs = "losses"

    def scores(self, inputs: torch.Tensor) -> torch.Tensor:
        """Negative losses [n, E]: a lower loss is a higher score."""
        if inputs.dim() != 2 or inputs.shape[1] != self.num_experts:
            raise ValueError(f"expected losses [n, {self.num_experts}], got {tuple(inputs.shape)}")
        return -inputs

    @classmethod
    def fit(
        cls,
        features: torch.Tensor,
        labels: torch.Tensor,
        *,
        num_experts: int,
        settings: RouterSettings,
        seed: int = 0,
    ) -> PerplexityRouter:
        """Nothing to learn."""
        return cls(num_experts, settings)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Nothing to save."""
        return {}

    @classmethod
    def from_saved(
        cls, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
    ) -> PerplexityRouter:
        """From the config alone."""
        experts = config.get("num_experts")
        if not isinstance(experts, int):
            raise ValueError("`num_experts` is missing")
        return cls(experts, RouterSettings.from_json(config))


_ALL: tuple[type[Router], ...] = (CentroidRouter, LogisticRouter, PerplexityRouter)
ROUTERS: dict[str, type[Router]] = {router.name: router for router in _ALL}


def router_class(name: str) -> type[Router]:
    """The router called `name`; UnknownNameError listing the valid names otherwise."""
    try:
        return ROUTERS[name]
    except KeyError:
        raise UnknownNameError("router", name, list(ROUTERS)) from None


__all__ = [
    "ROUTERS",
    "CentroidRouter",
    "LogisticRouter",
    "PerplexityRouter",
    "Router",
    "RouterInputs",
    "RouterSettings",
    "class_means",
    "router_class",
]

"""How well a router separates the experts' calibration data: counts, centroid geometry, and
routing accuracy on a held-out part of the calibration windows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hfmerge.routing.routers import Router, RouterSettings, class_means

HOLDOUT_FRACTION = 0.2
MIN_CALIBRATION_WINDOWS = (
    8  # fewer calibration windows per expert make centroids and accuracies noise
)
LOW_ACCURACY = 0.8  # below this held-out accuracy, routing is unreliable
CLOSE_CENTROIDS = 0.9  # centred centroids this aligned cannot be told apart


@dataclass(frozen=True)
class CalibrationReport:
    """What the router was fitted on and how well it routes held-out calibration windows."""

    experts: list[str]
    samples: list[int]  # calibration windows per expert
    # Cosine between experts' mean features: raw (the common direction makes these ~1), and
    # centred on the mean of the centroids (what the centroid router compares). None for the
    # perplexity router, which has no features.
    centroid_cosine: list[list[float]] | None
    centred_centroid_cosine: list[list[float]] | None
    heldout_samples: int  # 0 when there were too few windows to hold any out
    heldout_accuracy: float | None  # fraction of held-out windows routed to their own expert
    expert_accuracy: list[float | None]  # the same per expert (recall)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def holdout_split(
    labels: torch.Tensor, *, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified (fit, held-out) index tensors; an expert with < 2 windows keeps all for fit."""
    generator = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for expert in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == expert).flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        count = min(len(rows) - 1, max(1, round(fraction * len(rows)))) if len(rows) > 1 else 0
        held.append(rows[:count])
        fit.append(rows[count:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def cosine_matrix(vectors: torch.Tensor) -> list[list[float]]:
    """[E, d] -> E x E cosine similarities, rounded for the report."""
    unit = torch.nn.functional.normalize(vectors.double(), dim=-1)
    return [[round(float(v), 6) for v in row] for row in unit @ unit.T]  # [E, E]


def calibration_report(
    router_type: type[Router],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    experts: Sequence[str],
    settings: RouterSettings,
    seed: int = 0,
    holdout_fraction: float = HOLDOUT_FRACTION,
) -> CalibrationReport:
    """Fit `router_type` on part of the calibration inputs and route the rest."""
    count = len(experts)
    samples = torch.bincount(labels, minlength=count).tolist()
    raw = centred = None
    if router_type.inputs == "features":
        means = class_means(inputs, labels, count)  # [E, d]
        raw, centred = cosine_matrix(means), cosine_matrix(means - means.mean(0))
    fit_rows, held_rows = holdout_split(labels, fraction=holdout_fraction, seed=seed)
    accuracy: float | None = None
    per_expert: list[float | None] = [None] * count
    if len(held_rows) and all(n >= 2 for n in samples):
        router = router_type.fit(
            inputs[fit_rows], labels[fit_rows], num_experts=count, settings=settings, seed=seed
        )
        right = router.choose(inputs[held_rows]) == labels[held_rows]  # [h]
        accuracy = round(float(right.float().mean()), 6)
        per_expert = [_recall(right, labels[held_rows], e) for e in range(count)]
    else:
        held_rows = held_rows[:0]
    report = CalibrationReport(
        list(experts), samples, raw, centred, len(held_rows), accuracy, per_expert
    )
    report.warnings.extend(report_warnings(report))
    return report


def _recall(right: torch.Tensor, labels: torch.Tensor, expert: int) -> float | None:
    mine = labels == expert
    return round(float(right[mine].float().mean()), 6) if bool(mine.any()) else None


def report_warnings(report: CalibrationReport) -> list[str]:
    """Plain sentences about what makes this router unreliable."""
    warnings = [
        f"expert {name!r} has only {n} calibration windows (want {MIN_CALIBRATION_WINDOWS}+)"
        for name, n in zip(report.experts, report.samples, strict=True)
        if n < MIN_CALIBRATION_WINDOWS
    ]
    if report.heldout_accuracy is None:
        warnings.append("too few calibration windows to hold any out: accuracy is unknown")
    elif report.heldout_accuracy < LOW_ACCURACY:
        warnings.append(
            f"held-out routing accuracy is {report.heldout_accuracy:.0%}: the "
            "router does not tell the experts' calibration texts apart well (try "
            "more distinct texts, another router layer, or another router)"
        )
    warnings.extend(_close_pairs(report))
    return warnings


def _close_pairs(report: CalibrationReport) -> list[str]:
    """Experts whose centred centroids nearly coincide (only meaningful from 3 experts: with
    2, centring makes them exactly opposite)."""
    matrix, names = report.centred_centroid_cosine, report.experts
    if matrix is None or len(names) < 3:
        return []
    return [
        f"experts {names[i]!r} and {names[j]!r} have near-identical centroids "
        f"(centred cosine {matrix[i][j]:.3f}): the router cannot tell them apart"
        for i in range(len(names))
        for j in range(i + 1, len(names))
        if matrix[i][j] > CLOSE_CENTROIDS
    ]


__all__ = ["CalibrationReport", "calibration_report", "cosine_matrix", "holdout_split"]

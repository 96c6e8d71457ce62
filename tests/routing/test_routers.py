"""Routers and their calibration report on synthetic feature clusters (no models)."""

from __future__ import annotations

import pytest
import torch

from hfmerge.errors import RoutingError, UnknownNameError
from hfmerge.routing.calibration import calibration_report, holdout_split
from hfmerge.routing.routers import (
    ROUTERS,
    CentroidRouter,
    LogisticRouter,
    PerplexityRouter,
    RouterSettings,
    router_class,
)

DIM, PER_EXPERT = 16, 40


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/support/fixtures.py one_thread


def clusters(
    spread: float, *, experts: int = 3, seed: int = 0, offset: float = 20.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters around random unit means, all shifted by a large common vector (as
    mean-pooled hidden states are): features [E * PER_EXPERT, DIM], labels."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.nn.functional.normalize(torch.randn(experts, DIM, generator=generator), dim=-1)
    common = offset * torch.ones(DIM)
    noise = spread * torch.randn(experts, PER_EXPERT, DIM, generator=generator)
    features = (means.unsqueeze(1) + noise + common).reshape(-1, DIM)  # [E, n, d] -> [E*n, d]
    labels = torch.arange(experts).repeat_interleave(PER_EXPERT)  # [E*n]
    return features, labels


@pytest.mark.parametrize("cls", [CentroidRouter, LogisticRouter])
def test_separated_clusters_route_to_their_expert(cls: type[CentroidRouter]) -> None:
    features, labels = clusters(0.05)
    router = cls.fit(features, labels, num_experts=3, settings=RouterSettings(0.1))
    test_features, test_labels = clusters(0.05, seed=0)
    assert torch.equal(router.choose(test_features), test_labels)
    probabilities = router.probabilities(test_features)
    assert probabilities.shape == (3 * PER_EXPERT, 3)
    assert torch.allclose(probabilities.sum(-1), torch.ones(3 * PER_EXPERT))


def test_centroid_is_centred_so_the_common_direction_does_not_hide_the_experts() -> None:
    features, labels = clusters(0.2, offset=100.0)
    router = CentroidRouter.fit(features, labels, num_experts=3, settings=RouterSettings(0.1))
    raw = torch.nn.functional.normalize(features, dim=-1)
    assert float(raw[0] @ raw[-1]) > 0.999  # uncentred, every input looks the same
    assert (router.choose(features) == labels).float().mean() > 0.95
    assert torch.allclose(router.centroids.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("cls", [CentroidRouter, LogisticRouter])
def test_saved_tensors_and_config_rebuild_the_same_router(cls: type[CentroidRouter]) -> None:
    features, labels = clusters(0.5)
    router = cls.fit(
        features,
        labels,
        num_experts=3,
        settings=RouterSettings(0.5, min_confidence=0.6, default_expert=2),
    )
    again = cls.from_saved(router.config(), router.to_tensors())
    assert torch.equal(again.probabilities(features), router.probabilities(features))
    assert again.settings == router.settings
    with pytest.raises(ValueError, match="shape"):
        cls.from_saved({**router.config(), "num_experts": 4}, router.to_tensors())


def test_logistic_fit_is_deterministic() -> None:
    features, labels = clusters(1.0)
    first = LogisticRouter.fit(features, labels, num_experts=3, settings=RouterSettings())
    second = LogisticRouter.fit(features, labels, num_experts=3, settings=RouterSettings())
    assert all(
        torch.equal(first.to_tensors()[k], second.to_tensors()[k]) for k in first.to_tensors()
    )


def test_unsure_inputs_fall_back_to_the_default_expert() -> None:
    features, labels = clusters(0.05, experts=2)
    settings = RouterSettings(0.1, min_confidence=0.9, default_expert=1)
    router = CentroidRouter.fit(features, labels, num_experts=2, settings=settings)
    direction = torch.randn(DIM, generator=torch.Generator().manual_seed(1))
    across = direction - (direction @ router.centroids[0]) * router.centroids[0]  # [d] ⟂ c_0
    midpoint = (router.center + across).unsqueeze(0)  # [1, d]: as close to one as to the other
    assert router.probabilities(midpoint).max() < 0.9
    assert router.choose(midpoint).tolist() == [1]
    assert torch.equal(router.choose(features), labels)  # confident inputs are unaffected


def test_perplexity_router_picks_the_lowest_loss() -> None:
    router = PerplexityRouter.fit(
        torch.empty(0), torch.empty(0, dtype=torch.long), num_experts=3, settings=RouterSettings()
    )
    losses = torch.tensor([[2.0, 1.0, 3.0], [0.5, 0.7, 0.6], [4.0, 4.0, 3.9]])  # [n, E]
    assert router.choose(losses).tolist() == [1, 0, 2]
    assert router.to_tensors() == {}
    assert PerplexityRouter.from_saved(router.config(), {}).num_experts == 3


def test_unknown_router_name_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError, match="centroid, logistic, perplexity") as caught:
        router_class("nearest")
    assert caught.value.choices == sorted(ROUTERS)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (RouterSettings(0.0), "not positive"),
        (RouterSettings(1.0, min_confidence=1.5, default_expert=0), "not a probability"),
        (RouterSettings(1.0, min_confidence=0.5), "no default_expert"),
        (RouterSettings(1.0, default_expert=3), "not one of the 2 experts"),
    ],
)
def test_bad_settings_are_refused(settings: RouterSettings, message: str) -> None:
    features, labels = clusters(0.1, experts=2)
    with pytest.raises(RoutingError, match=message):
        CentroidRouter.fit(features, labels, num_experts=2, settings=settings)


def test_an_expert_without_samples_is_refused() -> None:
    features, labels = clusters(0.1, experts=2)
    with pytest.raises(RoutingError, match=r"experts \[2\] have no calibration sample"):
        CentroidRouter.fit(features, labels, num_experts=3, settings=RouterSettings())


def test_holdout_split_is_stratified_and_deterministic() -> None:
    labels = torch.tensor([0] * 10 + [1] * 5 + [2])
    fit, held = holdout_split(labels, fraction=0.2, seed=3)
    assert torch.bincount(labels[held], minlength=3).tolist() == [2, 1, 0]
    assert sorted([*fit.tolist(), *held.tolist()]) == list(range(16))
    assert all(
        torch.equal(a, b)
        for a, b in zip((fit, held), holdout_split(labels, fraction=0.2, seed=3), strict=True)
    )


def test_report_of_separated_experts_is_clean() -> None:
    features, labels = clusters(0.05)
    report = calibration_report(
        CentroidRouter, features, labels, experts=["a", "b", "c"], settings=RouterSettings(0.1)
    )
    assert report.samples == [PER_EXPERT] * 3
    assert report.heldout_samples == 3 * 8
    assert report.heldout_accuracy == 1.0
    assert report.expert_accuracy == [1.0, 1.0, 1.0]
    assert report.centroid_cosine is not None
    assert report.centroid_cosine[0][0] == 1.0
    assert report.warnings == []
    assert report.to_json()["experts"] == ["a", "b", "c"]


def test_report_warns_about_overlapping_experts() -> None:
    features, labels = clusters(3.0)
    labels[:4] = 2  # expert 2 also shares expert 0's cluster
    report = calibration_report(
        CentroidRouter,
        features[:90],
        labels[:90],
        experts=["a", "b", "c"],
        settings=RouterSettings(0.1),
    )
    assert report.heldout_accuracy is not None
    assert report.heldout_accuracy < 0.8
    assert any("held-out routing accuracy" in w for w in report.warnings)
    few = calibration_report(
        LogisticRouter,
        features[:6],
        torch.tensor([0, 0, 0, 1, 1, 1]),
        experts=["a", "b"],
        settings=RouterSettings(),
    )
    assert any("only 3 calibration windows" in w for w in few.warnings)

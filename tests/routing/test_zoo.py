"""End to end on the tiny zoo: a router over the code and prose specialists, with their shared
base (seed0) as a separate backbone, sends held-out code and prose to the right expert."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hfmerge.analysis.evaluation import eval_model
from hfmerge.recipe.schema import ProbeSpec, RouteSpec
from hfmerge.routing import (
    BackboneRef,
    ExpertEntry,
    ModelLocation,
    RoutedModel,
    build_router,
    eval_routed,
    routed_manifest,
    write_routed_repo,
)
from hfmerge.zoo import corpus, zoo_model
from tests.support.lm import source_of

EXPERTS = ("code", "prose")
LENGTH = 64


# one_thread: see tests/support/fixtures.py; slow: the module fixture trains three zoo members.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The tiny zoo's base and specialists."""
    with pytest.MonkeyPatch.context() as patch:
        # The cache test_demo uses too: one tiny zoo per worker.
        patch.setenv("HFMERGE_CACHE", str(tmp_path_factory.getbasetemp() / "zoo-cache"))
        patch.setenv("HFMERGE_ZOO_SIZE", "tiny")
        yield {name: zoo_model(name, progress=False) for name in ("seed0", *EXPERTS)}


def routed_repo(method: str, zoo: dict[str, Path], out: Path) -> Path:
    """A bundled routed repo over the specialists, seed0 (their shared base) as backbone."""
    built = build_router(
        RouteSpec.model_validate({"method": method}),
        ProbeSpec(samples=48, max_length=LENGTH),
        experts=[zoo[n] for n in EXPERTS],
        backbone=zoo["seed0"],
        calibration_texts=[[corpus.train_text(n)[:60_000]] for n in EXPERTS],
        names=EXPERTS,
    )
    entries = [ExpertEntry(n, ModelLocation(path=f"experts/{n}")) for n in EXPERTS]
    backbone = BackboneRef(location=ModelLocation(path="backbone"))
    return write_routed_repo(
        out,
        routed_manifest(built, entries, backbone=backbone),
        built.router,
        bundle_sources={n: zoo[n] for n in EXPERTS},
        backbone_source=zoo["seed0"],
    )


def chunks(text: str, count: int, size: int = 600) -> list[str]:
    step = len(text) // count
    return [text[i * step : i * step + size] for i in range(count)]


def test_held_out_code_and_prose_go_to_their_specialist(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    model = RoutedModel.from_pretrained(routed_repo("centroid", zoo, tmp_path), device_map=None)
    routes = model.route(
        chunks(corpus.heldout_text("code"), 20) + chunks(corpus.heldout_text("prose"), 20)
    )
    right = sum(r == 0 for r in routes[:20]) + sum(r == 1 for r in routes[20:])
    assert right >= 32  # 80%; the tiny zoo (hidden 32, 2 blocks) routes 34 of 40 right


def test_perplexity_routing_scores_at_least_as_well_as_the_best_expert(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    data = tmp_path / "mixed.txt"
    data.write_text(corpus.builtin_probe_text("mixed")[:8000], encoding="utf-8")
    repo = routed_repo("perplexity", zoo, tmp_path / "repo")
    routed = eval_routed(repo, data=str(data), max_length=LENGTH, device_map=None)
    alone = [
        eval_model(source_of(repo / "experts" / n), data=str(data), max_length=LENGTH)
        for n in EXPERTS
    ]
    assert all(result.tokens == routed.tokens for result in alone)
    # Each window goes to the expert with its lowest loss, so the token-weighted mean can only
    # beat (or match) every single expert's.
    assert routed.loss <= min(result.loss for result in alone) + 1e-6

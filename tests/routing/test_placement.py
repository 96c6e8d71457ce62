"""ExpertPool: header-based sizes, LRU eviction within a memory budget, accelerate placement."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch

from hfmerge.errors import RoutingError
from hfmerge.routing import ExpertPool, PooledModel, RoutedModel
from hfmerge.routing.placement import estimate_bytes
from tests.support.routing import (
    EXPECTED_ROUTES,
    NAMES,
    build,
    load_expert,
    mixed_batch,
    save_experts,
)
from tests.support.routing import write_bundled as write_repo

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/support/fixtures.py one_thread


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("placement")
    experts = save_experts(root / "experts")
    return write_repo(build("centroid", experts), experts, root / "repo")


def expert_bytes(path: Path) -> int:
    model = load_expert(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_sizes_come_from_headers_at_the_load_dtype(repo: Path) -> None:
    path = repo / "experts" / "digits"
    actual = expert_bytes(path)
    assert estimate_bytes(PooledModel("d", path)) == actual  # `auto`: as stored (float32)
    assert estimate_bytes(PooledModel("d", path, "bfloat16")) == actual // 2


def test_a_budget_for_one_expert_evicts_the_least_recently_used(repo: Path) -> None:
    size = expert_bytes(repo / "experts" / "digits")
    budget = size * 3 // 2  # room for one expert, not two
    model = RoutedModel.from_pretrained(repo, device_map=None, memory_budget=budget)
    batch = mixed_batch(model.tokenizer)
    out = model(batch["input_ids"], batch["attention_mask"])
    assert out.experts.tolist() == EXPECTED_ROUTES
    pool = model.pool
    assert pool.loads == ["digits", "letters"]  # backbone (= digits) routes and runs, then letters
    assert pool.loaded == ("letters",)
    assert pool.peak_bytes <= budget
    for index, name in enumerate(NAMES):  # the answers are still exactly the experts'
        rows = out.experts == index
        with torch.no_grad():
            expected = load_expert(repo / "experts" / name)(
                input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows]
            ).logits
        assert torch.equal(out.logits[rows], expected)
    assert model.route(["12 34"]) == [0]  # routing needs the backbone back
    assert pool.loads == ["digits", "letters", "digits"]
    assert pool.loaded == ("digits",)


def test_an_evicted_expert_is_freed(repo: Path) -> None:
    pool = ExpertPool(
        [PooledModel(n, repo / "experts" / n) for n in NAMES],
        device_map=None,
        budget_bytes=expert_bytes(repo / "experts" / "digits") + 1,
    )
    first = weakref.ref(pool.get("digits"))
    pool.get("letters")
    gc.collect()
    assert first() is None
    assert pool.loaded == ("letters",)
    assert pool.resident_bytes == pool.sizes["letters"]


def test_without_a_budget_every_expert_stays(repo: Path) -> None:
    pool = ExpertPool([PooledModel(n, repo / "experts" / n) for n in NAMES], device_map=None)
    for name in [*NAMES, NAMES[0]]:
        pool.get(name)
    assert pool.loaded == ("letters", "digits")
    assert pool.loads == list(NAMES)


def test_max_memory_is_the_budget_and_accelerate_places_each_expert(repo: Path) -> None:
    size = expert_bytes(repo / "experts" / "digits")
    limit = f"{size * 1.6 / 1000:.3f}KB"
    model = RoutedModel.from_pretrained(repo, device_map="auto", max_memory={"cpu": limit})
    assert model.pool.budget == int(size * 1.6)
    batch = mixed_batch(model.tokenizer)
    assert model(batch["input_ids"], batch["attention_mask"]).experts.tolist() == EXPECTED_ROUTES
    assert len(model.pool.loaded) == 1
    assert model.pool.peak_bytes <= model.pool.budget
    assert model.pool.device_maps == {"digits": {"": "cpu"}, "letters": {"": "cpu"}}


def test_a_budget_below_one_expert_is_refused_before_loading(repo: Path) -> None:
    with pytest.raises(RoutingError, match="cannot hold the largest expert"):
        RoutedModel.from_pretrained(repo, device_map=None, memory_budget="10KB")

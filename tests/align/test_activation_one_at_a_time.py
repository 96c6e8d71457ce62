"""Activation matching with the models run one at a time (features on disk): the same result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hfmerge.align.activation_run as activation_run
from hfmerge.align import align_basis, align_permutations
from hfmerge.align.activation_store import FeatureFiles, cross_stats
from hfmerge.align.cross_stats import CrossStats
from hfmerge.errors import HfMergeError
from hfmerge.lm.placement import MaxMemory, ProbePlacement
from tests.support.align import assert_same_perms
from tests.support.lm import save_lm, save_permuted_copy


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny GQA Llama, its permuted copy, and another init."""
    root = tmp_path_factory.mktemp("one-at-a-time")
    a = save_lm("llama", root / "a", seed=0)
    return {
        "a": a,
        "permuted": save_permuted_copy(a, root / "permuted", seed=3),
        "other": save_lm("llama", root / "other", seed=1),
    }


def test_files_give_back_the_sums_batch_for_batch(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(n, 5, generator=generator) for n in (3, 7, 2)]
    files_a, files_b = FeatureFiles(tmp_path / "a"), FeatureFiles(tmp_path / "b")
    paired = CrossStats(5, 5)
    for batch in rows:
        files_a.append("x", batch)
        files_b.append("x", batch.flip(1))
        files_a.batch_rows.append(len(batch))
        files_b.batch_rows.append(len(batch))
        paired.update(batch.double(), batch.flip(1).double())
    stored = cross_stats(files_a, files_b, ["x"])
    assert torch.equal(stored.cross, paired.cross)
    assert stored.count == 12
    assert torch.allclose(
        stored.correlation().flip(1).diagonal(), torch.ones(5, dtype=torch.float64)
    )


def one_at_a_time(
    monkeypatch: pytest.MonkeyPatch, placement: ProbePlacement
) -> list[ProbePlacement]:
    """Make the budgeted path place the models as `placement` says; records that it was asked."""
    asked: list[ProbePlacement] = []

    def planned(*args: object, **kwargs: object) -> ProbePlacement:
        asked.append(placement)
        return placement

    monkeypatch.setattr(activation_run, "_plan", planned)
    return asked


@pytest.mark.parametrize("offload", [False, True])
def test_one_at_a_time_gives_the_permutations_of_the_paired_run(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, offload: bool
) -> None:
    paired = align_permutations("activation", models["a"], models["other"])
    limit: MaxMemory | None = {"cpu": "1KiB"} if offload else None
    asked = one_at_a_time(monkeypatch, ProbePlacement("auto", limit, True, offload))
    alone = align_permutations("activation", models["a"], models["other"], max_memory_bytes=10**12)
    assert asked
    assert_same_perms(alone, paired)


def test_one_at_a_time_recovers_a_planted_copy_and_rotates_alike(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    planted = align_permutations("activation", models["a"], models["permuted"])
    rotated = align_basis("activation+orthogonal", models["a"], models["other"])
    one_at_a_time(monkeypatch, ProbePlacement("auto", None, one_at_a_time=True))
    budget = 10**12
    assert_same_perms(
        align_permutations("activation", models["a"], models["permuted"], max_memory_bytes=budget),
        planted,
    )
    alone = align_basis(
        "activation+orthogonal", models["a"], models["other"], max_memory_bytes=budget
    )
    assert rotated.rotation is not None
    assert alone.rotation is not None
    assert torch.allclose(alone.rotation, rotated.rotation, atol=1e-12)


def test_a_budget_too_small_is_refused_before_a_model_loads(models: dict[str, Path]) -> None:
    with pytest.raises(HfMergeError, match="cannot hold the probe of even one model"):
        align_permutations("activation", models["a"], models["other"], max_memory_bytes=10**6)


def test_a_large_budget_runs_them_together(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[object] = []
    real = activation_run.load_model

    def counted(model: object, placement: ProbePlacement | None = None, *rest: object) -> object:
        loads.append(placement)
        return real(model, placement, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(activation_run, "load_model", counted)
    align_permutations("activation", models["a"], models["other"], max_memory_bytes=10**12)
    assert len(loads) == 2
    assert all(isinstance(p, ProbePlacement) and not p.one_at_a_time for p in loads)

"""Low-rank task vectors (`rank`, `energy` on the task-vector methods) and TSV-Merge."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hfmerge.methods import get_method, param_problems, validate_params
from hfmerge.methods.gta import TaskVectorModelParams
from hfmerge.methods.lowrank import Truncation, energy_rank, factor_bytes, low_rank, truncate
from hfmerge.methods.params import as_params
from hfmerge.methods.tsv import orthonormal
from tests.methods.test_functions import randn, run

TASK_VECTOR = [
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
]


def planted(spectrum: list[float], rows: int, cols: int, *, seed: int) -> torch.Tensor:
    """A [rows, cols] matrix with exactly these singular values (random orthonormal bases)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, len(spectrum), generator=g)).Q  # [rows, k]
    v = torch.linalg.qr(torch.randn(cols, len(spectrum), generator=g)).Q  # [cols, k]
    matrix: torch.Tensor = (u * torch.tensor(spectrum)) @ v.T  # [rows, k] * [k] @ [k, cols]
    return matrix


def models_for(name: str, count: int, **extra: Any) -> list[dict[str, Any]]:
    fields = get_method(name).model_params.model_fields
    pruned = {"density": 0.6} if "density" in fields else {}
    return [{"weight": 0.5 + 0.25 * i, **pruned, **extra} for i in range(count)]


# --- truncation -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TASK_VECTOR)
@pytest.mark.parametrize("cut", [{"rank": 6}, {"rank": 50}, {"energy": 1.0}])
def test_full_rank_reproduces_the_untruncated_merge(name: str, cut: dict[str, Any]) -> None:
    base = randn(9, 6, seed=1)
    xs = [base + 0.1 * randn(9, 6, seed=2 + i) for i in range(3)]
    plain = run(name, xs, base=base, models=models_for(name, 3), seed=4)
    truncated = run(name, xs, base=base, models=models_for(name, 3, **cut), seed=4)
    torch.testing.assert_close(truncated, plain, rtol=1e-5, atol=1e-5)


def test_full_rank_svd_rebuilds_the_matrix() -> None:
    delta = randn(40, 24, seed=3)
    # exact_max_dim=8 takes the randomized path, which at full rank falls back to the exact SVD.
    for limit in (1024, 8):
        rebuilt = low_rank(delta, Truncation(rank=24), None, exact_max_dim=limit).matrix()
        torch.testing.assert_close(rebuilt, delta, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "breadcrumbs_ties"])
def test_rank_one_task_vectors_are_exact_at_rank_one(name: str) -> None:
    base = randn(12, 7, seed=5)
    deltas = [torch.outer(randn(12, seed=6 + i), randn(7, seed=9 + i)) for i in range(2)]
    xs = [base + d for d in deltas]
    plain = run(name, xs, base=base, models=models_for(name, 2))
    at_one = run(name, xs, base=base, models=models_for(name, 2, rank=1))
    torch.testing.assert_close(at_one, plain, rtol=1e-5, atol=1e-5)


def test_truncation_changes_a_full_rank_task_vector() -> None:
    # Negative control for the test above: a generic task vector loses its small directions.
    base = randn(12, 7, seed=5)
    xs = [base + randn(12, 7, seed=6)]
    plain = run("task_arithmetic", xs, base=base)
    at_one = run("task_arithmetic", xs, base=base, models=[{"rank": 1}])
    assert (at_one - plain).abs().max() > 0.1
    assert torch.linalg.matrix_rank(at_one - base) == 1


def test_randomized_svd_finds_a_low_rank_matrix_exactly() -> None:
    delta = planted([5.0, 3.0, 1.0], 300, 200, seed=7)
    g = torch.Generator().manual_seed(0)
    factors = low_rank(delta, Truncation(rank=3), g, exact_max_dim=64)
    torch.testing.assert_close(factors.matrix(), delta, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(factors.s, torch.tensor([5.0, 3.0, 1.0]), rtol=1e-5, atol=1e-5)


def test_randomized_svd_is_reproducible_from_its_generator_alone() -> None:
    # A decaying spectrum under noise, as task vectors have.
    delta = planted([10.0, 8.0, 6.0, 4.0, 2.0, 1.0], 300, 200, seed=8) + 0.01 * randn(
        300, 200, seed=9
    )

    def once(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)  # the global generator must not matter
        g = torch.Generator().manual_seed(3)
        return low_rank(delta, Truncation(rank=4), g, exact_max_dim=64).matrix()

    assert torch.equal(once(0), once(1))
    assert not torch.equal(
        once(0), low_rank(delta, Truncation(rank=4), None, exact_max_dim=64).matrix()
    )
    exact = low_rank(delta, Truncation(rank=4), None).matrix()
    assert (once(0) - exact).norm() / exact.norm() < 1e-4


@pytest.mark.parametrize(("energy", "rank"), [(0.5, 1), (0.75, 1), (0.9, 2), (0.95, 3), (1.0, 5)])
def test_energy_picks_the_fewest_directions_keeping_that_share(energy: float, rank: int) -> None:
    # Squared singular values 64, 16, 4, 1, 0.25 of 85.25: shares 0.751, 0.938, 0.985, 0.997, 1.
    spectrum = [8.0, 4.0, 2.0, 1.0, 0.5]
    exact = planted(spectrum, 30, 20, seed=10)
    large = planted(spectrum, 300, 200, seed=11)  # randomized SVD (exact_max_dim below)
    for matrix, limit in ((exact, 1024), (large, 64)):
        g = torch.Generator().manual_seed(0)
        factors = low_rank(matrix, Truncation(energy=energy), g, exact_max_dim=limit)
        assert factors.rank == rank
        torch.testing.assert_close(factors.s, torch.tensor(spectrum[:rank]), rtol=1e-4, atol=1e-5)


def test_energy_rank_counts_and_bounds() -> None:
    s = torch.tensor([3.0, 2.0, 1.0])  # squares 9, 4, 1 of 14
    assert energy_rank(s, 9 / 14, 14.0) == 1
    assert energy_rank(s, 13 / 14, 14.0) == 2
    assert energy_rank(s, 0.999, 14.0) == 3
    assert energy_rank(s, 0.5, 100.0) == 3  # the share lies beyond: every direction found
    assert factor_bytes((100, 40), 3) == (100 + 40) * 3 * 4


def test_tensors_that_are_not_matrices_stay_full() -> None:
    bias = randn(7, seed=12)
    conv = randn(4, 3, 2, seed=13)
    for tensor in (bias, conv):
        assert truncate(tensor, Truncation(rank=1), None) is tensor
    with pytest.raises(ValueError, match="exactly one"):
        Truncation(rank=1, energy=0.5)


# --- whole tensors through the chunked form ----------------------------------------------------


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_linear"])
def test_truncated_matrices_merge_whole_and_other_tensors_as_before(name: str) -> None:
    method = get_method(name)
    cpu = torch.device("cpu")

    def merge_for(shape: tuple[int, ...], **cut: Any) -> Any:
        params, per_model = validate_params(method, {}, models_for(name, 2, **cut))
        return method.tensor_merge(
            shape, model_params=per_model, params=params, generator=torch.Generator(), device=cpu
        )

    plain = merge_for((8, 8))
    assert merge_for((8, 8), rank=2).whole_only
    assert merge_for((8, 8), energy=0.5).whole_only
    # A norm is never truncated, so it keeps the chunked form it has without `rank`.
    one_d, plain_one_d = merge_for((8,), rank=2), merge_for((8,))
    assert (one_d.whole_only, one_d.elementwise) == (
        plain_one_d.whole_only,
        plain_one_d.elementwise,
    )
    assert not plain.whole_only


# --- parameters -------------------------------------------------------------------------------


def problems(name: str, params: dict[str, Any], models: list[dict[str, Any]]) -> dict[Any, str]:
    return dict(param_problems(get_method(name), params, models))


def test_rank_and_energy_are_typed_per_model_with_a_shared_default() -> None:
    _, models = validate_params(get_method("ties"), {"rank": 8}, [{}, {"rank": 4}, {"rank": "2"}])
    assert [as_params(m, TaskVectorModelParams).truncation() for m in models] == [
        Truncation(rank=r) for r in (8, 4, 2)
    ]
    _, models = validate_params(get_method("della"), {}, [{"energy": 0.9}, {}])
    assert [as_params(m, TaskVectorModelParams).truncation() for m in models] == [
        Truncation(energy=0.9),
        None,
    ]


def test_bad_rank_and_energy_are_located() -> None:
    found = problems("ties", {"energy": 1.5}, [{}, {"rank": 0}])
    assert "less than or equal to 1" in found[("parameters", "energy")]
    assert "greater than or equal to 1" in found[("models", 1, "rank")]
    found = problems("task_arithmetic", {}, [{"rank": 2.5}, {"rank": True}, {"energy": 0}])
    assert "integer" in found[("models", 0, "rank")]
    assert "boolean" in found[("models", 1, "rank")]
    assert "greater than 0" in found[("models", 2, "energy")]


def test_rank_and_energy_together_are_refused_at_energy() -> None:
    found = problems("dare_ties", {}, [{"rank": 2, "energy": 0.9}])
    assert found == {("models", 0, "energy"): "give `rank` or `energy`, not both (got 0.9)"}
    found = problems("ties", {"rank": 2, "energy": 0.9}, [{}])
    assert found == {("parameters", "energy"): "give `rank` or `energy`, not both (got 0.9)"}


def test_a_models_own_rank_or_energy_replaces_the_shared_one() -> None:
    _, models = validate_params(
        get_method("ties"), {"energy": 0.9}, [{}, {"rank": 16}, {"energy": 0.5}]
    )
    truncations = [as_params(m, TaskVectorModelParams).truncation() for m in models]
    assert truncations == [Truncation(energy=0.9), Truncation(rank=16), Truncation(energy=0.5)]


# --- TSV-Merge --------------------------------------------------------------------------------


def test_tsv_of_one_task_is_task_arithmetic() -> None:
    for shape in ((9, 6), (6, 9), (7,)):
        base = randn(*shape, seed=20)
        x = base + randn(*shape, seed=21)
        expected = run("task_arithmetic", [x], base=base, params={"lambda": 0.7})
        got = run("tsv", [x], base=base, params={"lambda": 0.7})
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_tsv_of_identical_models_at_full_rank_is_that_model() -> None:
    a, base = randn(8, 5, seed=22), randn(8, 5, seed=23)
    merged = run("tsv", [a.clone(), a.clone()], base=base, params={"rank": 5})
    torch.testing.assert_close(merged, a, rtol=1e-5, atol=1e-5)
    assert torch.equal(run("tsv", [a.clone(), a.clone()], base=a.clone()), a)


def test_tsv_sums_tasks_in_orthogonal_subspaces() -> None:
    # Tasks on disjoint singular directions do not interfere: TSV is their plain sum there.
    whole = planted([4.0, 3.0, 2.0, 1.0], 10, 8, seed=24)
    u, s, vh = torch.linalg.svd(whole, full_matrices=False)
    first = (u[:, :2] * s[:2]) @ vh[:2]  # directions 1-2
    second = (u[:, 2:4] * s[2:4]) @ vh[2:4]  # directions 3-4
    base = randn(10, 8, seed=25)
    merged = run("tsv", [base + first, base + second], base=base, params={"rank": 2})
    torch.testing.assert_close(merged, base + first + second, rtol=1e-5, atol=1e-5)


def test_tsv_decorrelates_overlapping_tasks() -> None:
    # Two tasks on one direction: task arithmetic would add them (4x), TSV averages them (2x):
    # the polar factor of the stacked basis [u, u] is [u, u] / sqrt(2), on both sides.
    direction = torch.outer(randn(6, seed=26), randn(4, seed=27))
    base = torch.zeros(6, 4)
    merged = run("tsv", [direction, 3 * direction], base=base, params={"rank": 1})
    torch.testing.assert_close(merged, 2 * direction, rtol=1e-5, atol=1e-5)
    tall = randn(9, 4, seed=28)
    polar = orthonormal(tall)
    torch.testing.assert_close(polar.T @ polar, torch.eye(4), rtol=1e-5, atol=1e-5)

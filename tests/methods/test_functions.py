"""Merge methods: registry, identities, and each method's defining property on small tensors."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch

from hfmerge.errors import UnknownNameError
from hfmerge.methods import METHODS, MergeMethod, get_method, list_methods, validate_params

ALL = sorted(METHODS)
TASK_VECTOR_METHODS = [name for name in ALL if name not in ("linear", "slerp", "model_stock")]
RANDOM_METHODS = ["dare_ties", "dare_linear", "della", "della_linear"]


def run(
    name: str,
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    params: Mapping[str, Any] | None = None,
    models: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Validate raw parameters like the engine does, then merge."""
    method = get_method(name)
    global_params, per_model = validate_params(method, params or {}, models or [{}] * len(tensors))
    generator = torch.Generator().manual_seed(seed)
    return method.merge(
        tensors, base=base, model_params=per_model, params=global_params, generator=generator
    )


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def weights_for(name: str, count: int) -> list[dict[str, Any]]:
    """Valid per-model parameters: weights for the methods that take them, else nothing."""
    fields = get_method(name).model_params.model_fields
    return [{"weight": 0.5 + i} if "weight" in fields else {} for i in range(count)]


def inputs_for(name: str, count: int) -> int:
    method = get_method(name)
    return max(method.min_models, min(count, method.max_models or count))


# --- registry ---------------------------------------------------------------------------------


def test_registry_holds_the_methods_mergekit_users_expect() -> None:
    assert set(ALL) == {
        "linear",
        "slerp",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "dare_linear",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "model_stock",
        "nearswap",
        "nuslerp",
        "multislerp",
        "karcher",
        "sce",
        "arcee_fusion",
        "passthrough",
    }
    assert [m.name for m in list_methods()] == list(METHODS)


@pytest.mark.parametrize("name", ALL)
def test_every_method_is_documented(name: str) -> None:
    method = get_method(name)
    assert isinstance(method, MergeMethod)
    assert method.name == name
    assert method.paper.startswith("https://")
    assert method.summary
    assert "\n" not in method.summary
    assert method.deterministic == (name not in RANDOM_METHODS)
    no_base = ("linear", "nuslerp", "multislerp", "karcher", "passthrough")
    assert method.needs_base == (name not in no_base)
    assert method.optional_base == (name == "multislerp")


def test_misspelt_method_lists_the_valid_ones() -> None:
    with pytest.raises(UnknownNameError) as caught:
        get_method("tie")
    assert caught.value.kind == "merge method"
    for name in ALL:
        assert name in str(caught.value)


# --- identities -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_models_equal_to_the_base_give_the_base(name: str) -> None:
    a = randn(5, 7, seed=1)
    count = inputs_for(name, 3)
    models = [
        {**m, "density": 0.5} if "density" in get_method(name).model_params.model_fields else m
        for m in weights_for(name, count)
    ]
    params = {"t": 0.7} if name in ("slerp", "nearswap") else {}
    merged = run(
        name, [a.clone() for _ in range(count)], base=a.clone(), params=params, models=models
    )
    torch.testing.assert_close(merged, a, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("linear", {}),
        ("task_arithmetic", {"normalize": True}),
        ("ties", {}),
        ("breadcrumbs_ties", {"normalize": True}),
        ("della", {}),
        ("model_stock", {}),
        ("multislerp", {}),
        ("karcher", {}),
        ("sce", {}),
    ],
)
def test_identical_models_merge_to_themselves(name: str, params: dict[str, Any]) -> None:
    # Normalised methods average identical task vectors back to the one they share.
    a, base = randn(6, 4, seed=2), randn(6, 4, seed=3)
    count = inputs_for(name, 3)
    merged = run(
        name,
        [a.clone() for _ in range(count)],
        base=base,
        params=params,
        models=weights_for(name, count),
    )
    torch.testing.assert_close(merged, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_output_keeps_shape_and_float32(name: str) -> None:
    shape = (3, 2, 5)
    count = inputs_for(name, 2)
    tensors = [randn(*shape, seed=10 + i) for i in range(count)]
    params = {"t": 0.4} if name in ("slerp", "nearswap") else {}
    merged = run(
        name, tensors, base=randn(*shape, seed=9), params=params, models=weights_for(name, count)
    )
    assert merged.shape == shape
    assert merged.dtype == torch.float32
    assert torch.isfinite(merged).all()


@pytest.mark.parametrize("name", ALL)
def test_inputs_are_left_as_they_were(name: str) -> None:
    count = inputs_for(name, 3)
    tensors = [randn(4, 6, seed=20 + i) for i in range(count)]
    base = randn(4, 6, seed=19)
    copies = [x.clone() for x in [*tensors, base]]
    params = {"t": 0.4} if name in ("slerp", "nearswap") else {}
    run(name, tensors, base=base, params=params, models=weights_for(name, count))
    assert all(torch.equal(x, copy) for x, copy in zip([*tensors, base], copies, strict=True))


# --- linear -----------------------------------------------------------------------------------


def test_linear_is_the_weighted_sum() -> None:
    xs = [randn(4, 3, seed=i) for i in range(3)]
    ws = [0.2, -0.5, 1.7]
    expected = sum(w * x for w, x in zip(ws, xs, strict=True))
    models = [{"weight": w} for w in ws]
    assert isinstance(expected, torch.Tensor)
    torch.testing.assert_close(
        run("linear", xs, params={"normalize": False}, models=models), expected
    )
    torch.testing.assert_close(run("linear", xs, models=models), expected / sum(ws))


# --- slerp ------------------------------------------------------------------------------------


def test_slerp_endpoints_are_exact() -> None:
    base, other = randn(8, 3, seed=4), randn(8, 3, seed=5)
    assert torch.equal(run("slerp", [other], base=base, params={"t": 0.0}), base)
    assert torch.equal(run("slerp", [other], base=base, params={"t": 1.0}), other)


def test_slerp_follows_the_great_circle() -> None:
    # Orthogonal unit vectors: slerp(t) = cos(tπ/2) e0 + sin(tπ/2) e1, norm 1 throughout.
    e0, e1 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    for t in (0.25, 0.5, 0.9):
        merged = run("slerp", [e1], base=e0, params={"t": t})
        expected = torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2), 0.0])
        torch.testing.assert_close(merged, expected)


@pytest.mark.parametrize("factor", [2.0, -1.0])
def test_slerp_falls_back_to_lerp_when_colinear(factor: float) -> None:
    base = randn(10, seed=6)
    merged = run("slerp", [factor * base], base=base, params={"t": 0.25})
    torch.testing.assert_close(merged, 0.75 * base + 0.25 * factor * base)


# --- nearswap ---------------------------------------------------------------------------------


def test_nearswap_takes_near_entries_and_shrinks_far_ones_towards_the_base() -> None:
    base = torch.zeros(4)
    other = torch.tensor([0.05, -0.1, 0.4, 2.0])
    merged = run("nearswap", [other], base=base, params={"t": 0.1})
    # |other - base| <= t: the other's entry; beyond, weight t / |other - base| of the way.
    torch.testing.assert_close(merged, torch.tensor([0.05, -0.1, 0.1, 0.1]))


def test_nearswap_with_t_zero_keeps_the_base() -> None:
    base, other = randn(32, seed=70), randn(32, seed=71)
    assert torch.equal(run("nearswap", [other], base=base, params={"t": 0.0}), base)


# --- nuslerp ----------------------------------------------------------------------------------


def nuslerp(
    first: torch.Tensor, second: torch.Tensor, weights: tuple[float, float], **params: Any
) -> torch.Tensor:
    models = [{"weight": w} for w in weights]
    return run("nuslerp", [first, second], params=params, models=models)


def test_nuslerp_weights_pick_the_endpoints() -> None:
    first, second = randn(8, 3, seed=80), randn(8, 3, seed=81)
    torch.testing.assert_close(nuslerp(first, second, (1.0, 0.0)), first)
    torch.testing.assert_close(nuslerp(first, second, (0.0, 2.0)), second)


def test_nuslerp_halfway_between_orthogonal_unit_vectors_is_on_the_circle() -> None:
    first, second = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    merged = nuslerp(first, second, (1.0, 1.0))
    # theta = pi/2 and t = 1/2: sin(pi/4) of each, a unit vector (lerp would give length 0.71).
    torch.testing.assert_close(merged, torch.tensor([0.5, 0.5]).sqrt())


def test_nuslerp_interpolates_each_row_or_column_by_its_own_angle() -> None:
    first = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    second = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    half = 0.5**0.5
    rows = nuslerp(first, second, (1.0, 1.0), nuslerp_flatten=False)
    # Row 0: orthogonal unit vectors, on the circle; row 1: equal rows stay as they are.
    torch.testing.assert_close(rows, torch.tensor([[half, half], [1.0, 1.0]]))
    columns = nuslerp(first, second, (1.0, 1.0), nuslerp_flatten=False, nuslerp_row_wise=True)
    # Columns (1, 1) and (0, 1), then (0, 1) and (1, 1): 45 degrees apart, so each merged column
    # is sin(22.5°) / sin(45°) times their sum.
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    torch.testing.assert_close(columns, torch.tensor([[c, c], [2 * c, 2 * c]]))


# --- task arithmetic family --------------------------------------------------------------------


def test_task_arithmetic_adds_scaled_task_vectors() -> None:
    base = randn(5, 5, seed=7)
    xs = [randn(5, 5, seed=8), randn(5, 5, seed=9)]
    ws = [0.7, 0.4]
    expected = base + 0.6 * (ws[0] * (xs[0] - base) + ws[1] * (xs[1] - base))
    merged = run(
        "task_arithmetic", xs, base=base, params={"lambda": 0.6}, models=[{"weight": w} for w in ws]
    )
    torch.testing.assert_close(merged, expected)


def test_ties_elects_signs_by_weighted_sum() -> None:
    base = torch.zeros(3)
    a, b = torch.tensor([1.0, -3.0, 0.0]), torch.tensor([2.0, 1.0, -1.0])
    merged = run("ties", [a, b], base=base, models=[{"weight": 1.0}, {"weight": 1.0}])
    # Sums [3, -2, -1]: entry 0 averages both, entry 1 keeps only a's -3, entry 2 only b's -1.
    torch.testing.assert_close(merged, torch.tensor([1.5, -3.0, -1.0]))


def _same_sign_models(seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = randn(6, 8, seed=seed)
    signs = torch.sign(randn(6, 8, seed=seed + 1))
    return base, [base + signs * randn(6, 8, seed=seed + 2 + i).abs() for i in range(3)]


def test_ties_without_conflicts_or_trimming_is_normalised_task_arithmetic() -> None:
    base, xs = _same_sign_models(20)
    models = [{"weight": w} for w in (0.3, 0.9, 1.4)]
    ties = run("ties", xs, base=base, models=models)
    reference = run("task_arithmetic", xs, base=base, params={"normalize": True}, models=models)
    torch.testing.assert_close(ties, reference)


@pytest.mark.parametrize("name", ["dare_linear", "della_linear", "breadcrumbs"])
def test_linear_variants_at_density_one_are_task_arithmetic(name: str) -> None:
    base = randn(7, 3, seed=30)
    xs = [randn(7, 3, seed=31), randn(7, 3, seed=32)]
    models = [{"weight": 0.8, "density": 1.0}, {"weight": 0.3, "density": 1.0}]
    reference = run("task_arithmetic", xs, base=base, models=[{"weight": 0.8}, {"weight": 0.3}])
    torch.testing.assert_close(run(name, xs, base=base, models=models), reference)


@pytest.mark.parametrize("name", ["dare_ties", "della", "breadcrumbs_ties"])
def test_ties_variants_at_density_one_are_ties(name: str) -> None:
    base = randn(7, 3, seed=33)
    xs = [randn(7, 3, seed=34), randn(7, 3, seed=35)]
    models = [{"weight": 0.8}, {"weight": 0.3}]
    params = {"normalize": False}
    reference = run("ties", xs, base=base, params=params, models=models)
    torch.testing.assert_close(run(name, xs, base=base, params=params, models=models), reference)


def test_ties_density_keeps_the_largest_entries_of_each_task_vector() -> None:
    base = torch.zeros(100)
    delta = randn(100, seed=40)
    merged = run("ties", [delta], base=base, models=[{"weight": 1.0, "density": 0.2}])
    kept = merged != 0
    assert int(kept.sum()) == 20
    assert delta[kept].abs().min() > delta[~kept].abs().max()


def test_ties_rescale_restores_the_l1_norm() -> None:
    base = torch.zeros(50)
    delta = randn(50, seed=41)
    merged = run(
        "ties",
        [delta],
        base=base,
        params={"rescale": True},
        models=[{"weight": 1.0, "density": 0.3}],
    )
    torch.testing.assert_close(merged.abs().sum(), delta.abs().sum())


# --- randomness -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_seeded_generator_makes_every_method_reproducible(name: str) -> None:
    count = inputs_for(name, 2)
    tensors = [randn(16, 16, seed=50 + i) for i in range(count)]
    base = randn(16, 16, seed=49)
    params = {"t": 0.5} if name in ("slerp", "nearswap") else {}
    models = [
        {**m, "density": 0.5} if "density" in get_method(name).model_params.model_fields else m
        for m in weights_for(name, count)
    ]

    def once(seed: int) -> torch.Tensor:
        return run(name, tensors, base=base, params=params, models=models, seed=seed)

    assert torch.equal(once(1), once(1))
    # Only the methods flagged random may depend on the generator.
    assert torch.equal(once(1), once(2)) == get_method(name).deterministic


def test_random_methods_use_only_the_given_generator() -> None:
    base, xs = randn(32, seed=60), [randn(32, seed=61)]
    models = [{"weight": 1.0, "density": 0.5}]
    torch.manual_seed(0)
    first = run("dare_linear", xs, base=base, models=models, seed=3)
    torch.manual_seed(1)
    assert torch.equal(first, run("dare_linear", xs, base=base, models=models, seed=3))


# --- model stock ------------------------------------------------------------------------------


def test_model_stock_ratio_follows_the_angle() -> None:
    base = torch.zeros(2)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])  # 60°: cos 0.5
    t = 2 * 0.5 / (1 + 0.5)
    torch.testing.assert_close(run("model_stock", [a, b], base=base), t * (a + b) / 2)
    orthogonal = run("model_stock", [a, torch.tensor([0.0, 1.0])], base=base)
    torch.testing.assert_close(orthogonal, base)


def test_model_stock_filter_wise_sets_one_ratio_per_row() -> None:
    base = torch.zeros(2, 2)
    a = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 2.0]])  # row 0 orthogonal (t=0), row 1 identical (t=1)
    merged = run("model_stock", [a, b], base=base, params={"filter_wise": True})
    torch.testing.assert_close(merged, torch.tensor([[0.0, 0.0], [1.0, 2.0]]))


# --- multislerp -------------------------------------------------------------------------------


def test_multislerp_halfway_between_orthogonal_vectors_is_on_the_sphere_at_the_mean_length() -> (
    None
):
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    merged = run("multislerp", [e0, e1], models=[{"weight": 1.0}, {"weight": 1.0}])
    # The normalised mean direction (1, 1)/√2, scaled by the mean length (1 + 3) / 2.
    torch.testing.assert_close(merged, 2 * torch.tensor([0.5, 0.5]).sqrt())


def test_multislerp_with_a_base_interpolates_the_task_vectors() -> None:
    base = randn(6, 5, seed=90)
    deltas = [randn(6, 5, seed=91 + i) for i in range(3)]
    models = [{"weight": w} for w in (0.2, 0.5, 0.3)]
    method = get_method("multislerp").with_base(True)
    params, per_model = validate_params(method, {}, models)
    merged = method.merge(
        [base + d for d in deltas], base=base, model_params=per_model, params=params
    )
    alone = run("multislerp", deltas, models=models)
    torch.testing.assert_close(merged, base + alone, rtol=1e-5, atol=1e-5)


def test_multislerp_weights_not_normalised_scale_the_result_by_their_sum() -> None:
    xs = [randn(10, seed=92), randn(10, seed=93), randn(10, seed=94)]
    models = [{"weight": 0.5}, {"weight": 1.5}, {"weight": 0.5}]
    normalised = run("multislerp", xs, models=models)
    # The mean direction is normalised either way; only the mean length takes the weights' sum.
    summed = run("multislerp", xs, params={"normalize_weights": False}, models=models)
    torch.testing.assert_close(summed, 2.5 * normalised)


# --- karcher ----------------------------------------------------------------------------------


def test_karcher_of_two_directions_is_their_geodesic_midpoint_at_the_mean_length() -> None:
    a, b = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 4.0])
    merged = run("karcher", [a, b])
    torch.testing.assert_close(merged, 3 * torch.tensor([0.5, 0.0, 0.5]).sqrt())


def test_karcher_moves_the_start_towards_the_spherical_mean() -> None:
    # Three directions bunched on one side: the normalised arithmetic mean (max_iter 0) is not
    # the Karcher mean, whose tangent vectors sum to zero.
    xs = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([-0.6, 0.8])]
    start = run("karcher", xs, params={"max_iter": 0})
    found = run("karcher", xs, params={"max_iter": 50, "tol": 1e-7})
    angles = torch.atan2(torch.stack([x[1] for x in xs]), torch.stack([x[0] for x in xs]))
    expected = float(angles.mean())  # on a circle the Karcher mean is the mean angle
    assert float(torch.atan2(found[1], found[0])) == pytest.approx(expected, abs=1e-5)
    assert float(torch.atan2(start[1], start[0])) != pytest.approx(expected, abs=1e-3)
    assert float(found.norm()) == pytest.approx(1.0, abs=1e-6)


def test_karcher_of_zero_models_is_zero() -> None:
    zeros = torch.zeros(3, 2)
    assert torch.equal(run("karcher", [zeros, zeros.clone()]), zeros)


# --- sce --------------------------------------------------------------------------------------


def test_sce_weights_by_energy_and_erases_opposed_signs() -> None:
    base = torch.zeros(3)
    a, b = torch.tensor([1.0, -3.0, 0.5]), torch.tensor([2.0, 1.0, -1.0])
    wa, wb = (1 + 9 + 0.25) / 3, (4 + 1 + 1) / 3  # mean squares: the models' energy weights
    merged = run("sce", [a, b], base=base)
    # Sums [3, -2, -0.5]: entry 0 averages both by energy, entry 1 keeps a's, entry 2 b's.
    expected = torch.tensor([(wa * 1 + wb * 2) / (wa + wb), -3.0, -1.0])
    torch.testing.assert_close(merged, expected)


def test_sce_select_topk_keeps_the_entries_varying_most() -> None:
    base = torch.zeros(5)
    a = torch.tensor([1.0, 1.0, 1.0, 4.0, 0.0])
    b = torch.tensor([1.0, 2.0, 4.0, -4.0, 0.0])  # variances 0, 0.25, 2.25, 16, 0
    merged = run("sce", [a, b], base=base, params={"select_topk": 0.5})
    # Half of the 3 varying entries, rounded down: entry 3 only; a's +4 wins the sign there
    # (sum 0 counts as +), the rest keep the base.
    torch.testing.assert_close(merged, torch.tensor([0.0, 0.0, 0.0, 4.0, 0.0]))


# --- arcee_fusion -----------------------------------------------------------------------------


def test_arcee_fusion_takes_only_the_outlying_changes() -> None:
    base = torch.zeros(9)
    other = torch.tensor([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 5.0])
    # One row: importance is |change| times one KL, so the threshold is median + 1.5 IQR of
    # the changes, 0.05 + 1.5 * (0.07 - 0.03) = 0.11: only the last entry passes.
    merged = run("arcee_fusion", [other], base=base)
    assert torch.equal(merged, torch.where(other > 1, other, base))


def test_arcee_fusion_threshold_is_per_tensor_with_importance_per_row() -> None:
    base = torch.zeros(2, 4)
    other = torch.tensor([[0.01, 0.02, 0.04, 3.0], [0.5, 0.5, 0.5, 0.5]])
    merged = run("arcee_fusion", [other], base=base)
    # Row 1 changes uniformly: its softmax is unchanged, so its KL and importance are 0. The
    # sorted scores are KL0 * [0, 0, 0, 0, 0.01, 0.02, 0.04, 3]: q1 = median = 0, q3 = 0.02 KL0,
    # so the threshold is 0.03 KL0 and only row 0's last two changes pass.
    expected = torch.tensor([[0.0, 0.0, 0.04, 3.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(merged, expected)


def test_arcee_fusion_reads_the_quartiles_of_every_score_in_large_tensors() -> None:
    # mergekit samples a million scores above that size; hfmerge reads them all. One row: the
    # importance is |change| times one KL, so the threshold is that of |change|, scaled.
    other = randn(1_200_001, seed=95)
    change = other.abs()
    quarters = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    q1, median, q3 = torch.quantile(change.double(), quarters, interpolation="lower").float()
    threshold = median + 1.5 * (q3 - q1)
    merged = run("arcee_fusion", [other], base=torch.zeros_like(other))
    assert torch.equal(merged, torch.where(change >= threshold, other, 0.0))

"""Every hfmerge method against mergekit's own implementation, tensor for tensor, to 1e-5.

mergekit's random methods draw from torch's global generator with the same `torch.bernoulli`
calls, so seeding it like our generator makes DARE and DELLA comparable too.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import pytest
import torch

from hfmerge.errors import MethodParameterError
from hfmerge.methods import METHODS, describe_parameters, get_method, validate_params

pytestmark = pytest.mark.mergekit

SHAPES = [(1,), (7,), (257,), (16, 33), (3, 4, 5)]
# mergekit ranks DELLA along dim 1 and model_stock's filter_wise along the last dim of an N-D
# tensor; hfmerge uses output rows `[shape[0], -1]` (see the methods' docs). Same for <= 2-D.
# On a one-element row mergekit's DELLA divides 0 by 0 and torch.bernoulli raises.
DELLA = {"della", "della_linear"}
# mergekit parameters hfmerge rejects on purpose: int8_mask is a memory knob for a mask hfmerge
# never stacks; density/rescale are accepted but ignored by mergekit's task_arithmetic.
DROPPED = {"int8_mask"}
DROPPED_BY_METHOD = {"task_arithmetic": {"density", "rescale"}}
# mergekit requires `weight`; hfmerge defaults it to 1.0 (equal weights, as in the papers).
RELAXED = {"weight": 1.0}

WEIGHTS = [[1.0], [0.3, 0.7], [0.5, 1.2, -0.4]]
DENSITIES = [0.2, 0.5, 0.9]


@pytest.fixture(scope="module")
def mergekit_api() -> ModuleType:
    module: ModuleType = pytest.importorskip("mergekit.merge_methods.api")
    return module


@pytest.fixture(scope="module")
def mergekit_registry() -> ModuleType:
    module: ModuleType = pytest.importorskip("mergekit.merge_methods.registry")
    return module


def cases() -> list[Any]:
    """(method, global parameters, per-model parameters) settings worth comparing, with ids."""
    out: list[tuple[str, dict[str, Any], list[dict[str, Any]]]] = []
    for ws in WEIGHTS:
        out.append(
            ("linear", {}, [{"weight": w} for w in ws])
            if len(ws) > 1
            else ("linear", {"normalize": False}, [{"weight": 2.0}, {"weight": 0.5}])
        )
        out.append(
            (
                "task_arithmetic",
                {"lambda": 0.8, "normalize": len(ws) == 2},
                [{"weight": w} for w in ws],
            )
        )
        for density in DENSITIES:
            pruned = [{"weight": w, "density": density} for w in ws]
            for name in ("ties", "dare_ties", "dare_linear"):
                out.append((name, {}, pruned))
            out.append(("ties", {"rescale": True, "normalize": False, "lambda": 1.5}, pruned))
            gammas = [{**m, "gamma": 0.05 * (i + 1)} for i, m in enumerate(pruned)]
            out.append(("breadcrumbs", {}, gammas))
            out.append(("breadcrumbs_ties", {"normalize": True}, gammas))
            if 0.1 < density < 0.9:
                epsilons = [{**m, "epsilon": 0.1} for m in pruned]
                out.append(("della", {}, epsilons))
                out.append(("della_linear", {"rescale": False}, epsilons))
    for t in (0.0, 0.3, 0.5, 1.0):
        out.append(("slerp", {"t": t}, [{}]))
    for t in (0.0, 0.05, 0.2, 1.0):
        out.append(("nearswap", {"t": t}, [{}]))
    for ws in ([1.0, 1.0], [0.3, 0.7], [2.0, -0.5], [1.0, -1.0]):  # the last: t falls back to 0.5
        for flatten, row_wise in ((True, False), (False, False), (False, True), (True, True)):
            layout = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
            out.append(("nuslerp", layout, [{"weight": w} for w in ws]))
    for filter_wise in (False, True):
        out.append(("model_stock", {"filter_wise": filter_wise}, [{}, {}]))
        out.append(("model_stock", {"filter_wise": filter_wise}, [{}, {}, {}]))
    out += _sphere_and_selection_cases()
    return [pytest.param(*case, id=f"{case[0]}-{i}") for i, case in enumerate(out)]


def _sphere_and_selection_cases() -> list[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """The cases of multislerp (without a base), karcher, sce and arcee_fusion."""
    out: list[tuple[str, dict[str, Any], list[dict[str, Any]]]] = []
    for ws in WEIGHTS:
        for normalize in (True, False):
            weighted = [{"weight": w} for w in ws]
            out.append(("multislerp", {"normalize_weights": normalize}, weighted))
    out.append(("multislerp", {"eps": 1e-3}, [{"weight": 0.6}, {"weight": 0.4}]))
    for count in (1, 2, 3):
        out.append(("karcher", {}, [{}] * count))
        out.append(("karcher", {"max_iter": 2, "tol": 1e-3}, [{}] * count))
        for keep in (1.0, 0.5, 0.2, 0.0):
            out.append(("sce", {"select_topk": keep}, [{}] * count))
    out.append(("arcee_fusion", {}, [{}]))
    return out


def ours(
    name: str,
    base: torch.Tensor,
    xs: Sequence[torch.Tensor],
    params: dict[str, Any],
    models: list[dict[str, Any]],
    seed: int,
    *,
    with_base: bool = False,
) -> torch.Tensor:
    """hfmerge's merge; `with_base` gives an optional-base method the base."""
    method = get_method(name).with_base(with_base)
    global_params, per_model = validate_params(method, params, models)
    return method.merge(
        xs,
        base=base if method.needs_base else None,
        model_params=per_model,
        params=global_params,
        generator=torch.Generator().manual_seed(seed),
    )


def theirs(
    api: ModuleType,
    name: str,
    base: torch.Tensor,
    xs: Sequence[torch.Tensor],
    params: dict[str, Any],
    models: list[dict[str, Any]],
    seed: int,
    *,
    with_base: bool = False,
) -> torch.Tensor:
    """mergekit's merge of the same inputs; `with_base` as in `ours`."""
    needs_base = get_method(name).with_base(with_base).needs_base
    inputs = [base, *xs] if needs_base else list(xs)
    offset = 1 if needs_base else 0
    parameters: dict[str, Any] = dict(params)
    for key in models[0]:
        parameters[key] = {offset + i: one[key] for i, one in enumerate(models)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        result: torch.Tensor = api.merge_tensors(
            inputs, name, parameters=parameters, base_index=0 if needs_base else None
        )
    return result


def related(
    shape: tuple[int, ...], count: int, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and `count` fine-tunes of it: the regime these methods are built for."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + 0.1 * torch.randn(shape, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("name", "params", "models"), cases())
def test_matches_mergekit(
    mergekit_api: ModuleType,
    shape: tuple[int, ...],
    name: str,
    params: dict[str, Any],
    models: list[dict[str, Any]],
) -> None:
    if len(shape) > 2 and (name in DELLA or params.get("filter_wise")):
        pytest.skip("hfmerge takes output rows of N-D tensors; mergekit a different axis")
    if shape == (1,) and name in DELLA:
        pytest.skip("mergekit's DELLA fails on one-element rows (0/0 keep probability)")
    seed = len(models) * 1000 + sum(shape)
    base, xs = related(shape, len(models), seed)
    expected = theirs(mergekit_api, name, base, xs, params, models, seed)
    torch.testing.assert_close(
        ours(name, base, xs, params, models, seed), expected, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("name", sorted(METHODS))
def test_parameters_and_defaults_match_mergekit(mergekit_registry: ModuleType, name: str) -> None:
    spec = mergekit_registry.get(name).spec
    expected = {
        p.name: RELAXED.get(p.name) if p.required else p.default
        for p in spec.parameters
        if p.name not in DROPPED | DROPPED_BY_METHOD.get(name, set())
    }
    assert {info.name: info.default for info in describe_parameters(get_method(name))} == expected


def test_slerp_matches_mergekit_near_the_lerp_threshold(mergekit_api: ModuleType) -> None:
    base = torch.randn(64, generator=torch.Generator().manual_seed(0))
    for scale in (0.02, 0.03, 0.05):  # cosines straddling 0.9995
        other = base + scale * torch.randn(64, generator=torch.Generator().manual_seed(1))
        expected = theirs(mergekit_api, "slerp", base, [other], {"t": 0.4}, [{}], 0)
        torch.testing.assert_close(ours("slerp", base, [other], {"t": 0.4}, [{}], 0), expected)


def test_ties_with_unrelated_models_matches_mergekit(mergekit_api: ModuleType) -> None:
    # Independent draws: heavy sign conflicts, the case the election exists for.
    xs = [torch.randn(40, 40, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    models = [{"weight": w, "density": 0.4} for w in (1.0, 0.6, 0.3)]
    expected = theirs(mergekit_api, "ties", xs[0], xs[1:], {}, models, 0)
    torch.testing.assert_close(ours("ties", xs[0], xs[1:], {}, models, 0), expected)


@pytest.mark.parametrize(
    "layout",
    [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}],
)
def test_nuslerp_matches_mergekit_on_unrelated_zero_and_colinear_slices(
    mergekit_api: ModuleType, layout: dict[str, Any]
) -> None:
    generator = torch.Generator().manual_seed(3)
    first, second = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    first[1], second[1] = 0.0, 0.0  # a zero slice (row): normalised to zero, not divided by 0
    first[:, 2] = 0.0  # a zero slice (column) in one model only
    second[4] = 2 * first[4]  # parallel rows: linear interpolation
    second[:, 3] = -first[:, 3]  # antipodal columns
    models = [{"weight": 0.4}, {"weight": 0.6}]
    expected = theirs(mergekit_api, "nuslerp", first, [first, second], layout, models, 0)
    got = ours("nuslerp", first, [first, second], layout, models, 0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("weights", WEIGHTS, ids=len)
def test_multislerp_with_a_base_matches_mergekit(
    mergekit_api: ModuleType, shape: tuple[int, ...], weights: list[float]
) -> None:
    # With a base, the task vectors are interpolated and the base added back.
    models = [{"weight": w} for w in weights]
    base, xs = related(shape, len(models), 7)
    expected = theirs(mergekit_api, "multislerp", base, xs, {}, models, 0, with_base=True)
    got = ours("multislerp", base, xs, {}, models, 0, with_base=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if len(models) > 1 and base.numel() > 1:  # one model, or scalars: both forms coincide
        assert not torch.allclose(got, ours("multislerp", base, xs, {}, models, 0), atol=1e-3)


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_matches_mergekit_on_two_antipodal_models(
    mergekit_api: ModuleType, with_base: bool
) -> None:
    # Opposite directions with equal weights: no barycentre, so the weighted sum stands in for
    # it, 0.5 a - 0.5 * 2a = -0.5 a (plus the base). Integers and quarters keep the task vectors
    # exact, so the directions cancel exactly.
    base = torch.arange(12.0) - 6
    a = torch.randint(-8, 8, (12,), generator=torch.Generator().manual_seed(5)) / 4
    xs = [base + a, base - 2 * a] if with_base else [a, -2 * a]
    models = [{"weight": 1.0}, {"weight": 1.0}]
    expected = theirs(mergekit_api, "multislerp", base, xs, {}, models, 0, with_base=with_base)
    got = ours("multislerp", base, xs, {}, models, 0, with_base=with_base)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, -0.5 * a + (base if with_base else 0))


def test_multislerp_refuses_more_models_whose_directions_cancel_as_mergekit_does(
    mergekit_api: ModuleType,
) -> None:
    a, b = (torch.randn(9, generator=torch.Generator().manual_seed(i)) for i in (6, 7))
    xs, models = [a, -a, b, -2 * b], [{"weight": 1.0}] * 4
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        theirs(mergekit_api, "multislerp", a, xs, {}, models, 0)
    with pytest.raises(MethodParameterError) as caught:
        ours("multislerp", a, xs, {}, models, 0)
    assert "opposite models whose weights cancel" in caught.value.what


def test_multislerp_of_zero_task_vectors_is_the_base_where_mergekit_refuses(
    mergekit_api: ModuleType,
) -> None:
    # A tensor no fine-tune changed: every task vector is zero, and so is their barycentre.
    base = torch.randn(4, 3, generator=torch.Generator().manual_seed(8))
    xs, models = [base.clone() for _ in range(3)], [{"weight": 1.0}] * 3
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        theirs(mergekit_api, "multislerp", base, xs, {}, models, 0, with_base=True)
    assert torch.equal(ours("multislerp", base, xs, {}, models, 0, with_base=True), base)


@pytest.mark.parametrize(
    "xs",
    [
        pytest.param(lambda a, b: [a, -a], id="antipodal"),
        pytest.param(lambda a, b: [a, torch.zeros_like(a), b], id="one-zero"),
        pytest.param(lambda a, b: [torch.zeros_like(a), torch.zeros_like(a)], id="all-zero"),
        pytest.param(lambda a, b: [a, 1e-7 * b], id="one-shorter-than-tol"),
        pytest.param(lambda a, b: [a, 3 * a], id="parallel"),
    ],
)
def test_karcher_matches_mergekit_on_degenerate_models(mergekit_api: ModuleType, xs: Any) -> None:
    a, b = (torch.randn(5, 4, generator=torch.Generator().manual_seed(i)) for i in (8, 9))
    models = xs(a, b)
    expected = theirs(mergekit_api, "karcher", a, models, {}, [{}] * len(models), 0)
    got = ours("karcher", a, models, {}, [{}] * len(models), 0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_sce_matches_mergekit_with_unrelated_models_and_unchanged_entries(
    mergekit_api: ModuleType, keep: float
) -> None:
    xs = [torch.randn(20, 30, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for x in xs[1:]:
        x[3] = xs[0][3]  # a row no model changed: zero variance, never selected
    expected = theirs(mergekit_api, "sce", xs[0], xs[1:], {"select_topk": keep}, [{}] * 3, 0)
    got = ours("sce", xs[0], xs[1:], {"select_topk": keep}, [{}] * 3, 0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[3], xs[0][3])


@pytest.mark.parametrize("shape", [(1,), (2,), (64,), (33, 17), (4, 5, 6)], ids=str)
def test_arcee_fusion_matches_mergekit_with_unrelated_and_equal_models(
    mergekit_api: ModuleType, shape: tuple[int, ...]
) -> None:
    base, other = (torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in (1, 2))
    for x in (other, base.clone()):
        expected = theirs(mergekit_api, "arcee_fusion", base, [x], {}, [{}], 0)
        torch.testing.assert_close(ours("arcee_fusion", base, [x], {}, [{}], 0), expected)

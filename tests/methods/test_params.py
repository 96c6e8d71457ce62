"""Method parameters: defaults, shared per-model defaults, and every kind of bad input located."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError

from hfmerge.errors import MethodParameterError, UnknownNameError
from hfmerge.methods import (
    METHODS,
    describe_parameters,
    get_method,
    param_problems,
    validate_params,
)
from hfmerge.methods.params import MethodParams, ModelParams, as_params
from hfmerge.methods.ties import TiesParams

# name: (global defaults, per-model defaults); None marks a required parameter.
DEFAULTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "linear": ({"normalize": True}, {"weight": 1.0}),
    "slerp": ({"t": None}, {}),
    "nearswap": ({"t": None}, {}),
    "passthrough": ({}, {"scale": None}),
    "nuslerp": ({"nuslerp_flatten": True, "nuslerp_row_wise": False}, {"weight": 1.0}),
    "task_arithmetic": ({"normalize": False, "lambda": 1.0}, {"weight": 1.0}),
    "ties": ({"normalize": True, "rescale": False, "lambda": 1.0}, {"weight": 1.0, "density": 1.0}),
    "dare_ties": (
        {"normalize": False, "rescale": True, "lambda": 1.0},
        {"weight": 1.0, "density": 1.0},
    ),
    "dare_linear": (
        {"normalize": False, "rescale": True, "lambda": 1.0},
        {"weight": 1.0, "density": 1.0},
    ),
    "breadcrumbs": (
        {"normalize": False, "rescale": False, "lambda": 1.0},
        {"weight": 1.0, "density": 1.0, "gamma": 0.01},
    ),
    "breadcrumbs_ties": (
        {"normalize": False, "rescale": False, "lambda": 1.0},
        {"weight": 1.0, "density": 1.0, "gamma": 0.01},
    ),
    "della": (
        {"normalize": True, "rescale": True, "lambda": 1.0},
        {"weight": 1.0, "density": 1.0, "epsilon": 0.15},
    ),
    "della_linear": (
        {"normalize": False, "rescale": True, "lambda": 1.0},
        {"weight": 1.0, "density": 1.0, "epsilon": 0.15},
    ),
    "model_stock": ({"filter_wise": False}, {}),
    "multislerp": ({"normalize_weights": True, "eps": 1e-8}, {"weight": 1.0}),
    "karcher": ({"max_iter": 10, "tol": 1e-5}, {}),
    "sce": ({"select_topk": 1.0}, {}),
    "arcee_fusion": ({}, {}),
}


def table(cls: type[MethodParams] | type[ModelParams]) -> dict[str, Any]:
    return {
        field.alias or name: None if field.is_required() else field.default
        for name, field in cls.model_fields.items()
    }


@pytest.mark.parametrize("name", sorted(METHODS))
def test_parameter_table(name: str) -> None:
    method = get_method(name)
    assert (table(method.params), table(method.model_params)) == DEFAULTS[name]
    described = {info.name: info.default for info in describe_parameters(method)}
    assert described == {**DEFAULTS[name][0], **DEFAULTS[name][1]}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_global_and_per_model_keys_are_disjoint(name: str) -> None:
    # Per-model keys under `parameters` act as defaults; an overlap would make that ambiguous.
    method = get_method(name)
    assert not set(table(method.params)) & set(table(method.model_params))


def problems(name: str, params: dict[str, Any], models: list[dict[str, Any]]) -> dict[Any, str]:
    return dict(param_problems(get_method(name), params, models))


def test_valid_parameters_give_typed_objects_with_defaults() -> None:
    params, models = validate_params(
        get_method("ties"),
        {"density": 0.5, "lambda": 2},
        [{"weight": 1}, {"weight": 0.5, "density": 0.2}],
    )
    assert params.model_dump(by_alias=True) == {"normalize": True, "rescale": False, "lambda": 2.0}
    assert [m.model_dump() for m in models] == [
        {"weight": 1.0, "density": 0.5},
        {"weight": 0.5, "density": 0.2},
    ]
    with pytest.raises(ValidationError, match="frozen"):
        as_params(params, TiesParams).normalize = False  # type: ignore[misc]


def test_unknown_key_is_located_and_lists_what_the_method_takes() -> None:
    found = problems("slerp", {"t": 0.5, "alpha": 1}, [{}])
    assert list(found) == [("parameters", "alpha")]
    assert "t (required)" in found[("parameters", "alpha")]


def test_misspelt_key_suggests_the_right_one() -> None:
    found = problems("ties", {"densty": 0.5}, [{"weight": 1}])
    assert "did you mean 'density'?" in found[("parameters", "densty")]


def test_unknown_method_name_suggests_the_closest_and_lists_all() -> None:
    with pytest.raises(UnknownNameError) as info:
        get_method("linaer")
    assert info.value.fix == "did you mean 'linear'? Otherwise use one of the valid merge methods"
    assert info.value.why == f"valid merge methods are: {', '.join(sorted(METHODS))}"
    with pytest.raises(UnknownNameError) as info:
        get_method("zzz")
    assert info.value.fix == "use one of the valid merge methods"


def test_key_of_another_method_names_its_owners() -> None:
    message = problems("task_arithmetic", {}, [{"weight": 1, "density": 0.5}])[
        ("models", 0, "density")
    ]
    assert "ties" in message
    assert "dare_linear" in message


def test_global_key_beside_a_model_asks_to_move_it() -> None:
    found = problems("ties", {}, [{"weight": 1, "normalize": False}])
    assert "under `parameters`" in found[("models", 0, "normalize")]


def test_mergekit_int8_mask_explains_itself() -> None:
    found = problems("ties", {"int8_mask": True}, [{"weight": 1}])
    assert "mergekit" in found[("parameters", "int8_mask")]


@pytest.mark.parametrize(
    ("params", "models", "location"),
    [
        ({"normalize": "yes"}, [{"weight": 1}], ("parameters", "normalize")),
        ({}, [{"weight": True}], ("models", 0, "weight")),
        ({}, [{"weight": "heavy"}], ("models", 0, "weight")),
        ({"lambda": float("nan")}, [{"weight": 1}], ("parameters", "lambda")),
        ({}, [{"weight": 1, "density": 1.5}], ("models", 0, "density")),
        ({"density": -0.1}, [{"weight": 1}, {"weight": 1}], ("parameters", "density")),
        ({"lambda_": 2}, [{"weight": 1}], ("parameters", "lambda_")),
    ],
)
def test_wrong_types_and_ranges_are_located(
    params: dict[str, Any], models: list[dict[str, Any]], location: tuple[Any, ...]
) -> None:
    assert list(problems("ties", params, models)) == [location]


def test_numeric_strings_are_numbers() -> None:
    # PyYAML reads `1e-2` (no dot) as a string; mergekit accepts it as a number, so do we.
    _, models = validate_params(get_method("ties"), {}, [{"weight": "1e-2"}])
    assert models[0].model_dump()["weight"] == pytest.approx(0.01)


def test_missing_required_parameter_is_reported() -> None:
    found = problems("slerp", {}, [{}])
    assert list(found) == [("parameters", "t")]
    assert "needs `t`" in found[("parameters", "t")]


def test_weight_defaults_to_one() -> None:
    _, models = validate_params(get_method("linear"), {}, [{}, {"weight": 3}])
    assert [m.model_dump()["weight"] for m in models] == [1.0, 3.0]


def test_shared_default_is_overridden_per_model() -> None:
    _, models = validate_params(
        get_method("dare_linear"), {"density": 0.4, "weight": 1}, [{}, {"density": 0.9}]
    )
    assert [m.model_dump()["density"] for m in models] == [0.4, 0.9]


@pytest.mark.parametrize(
    ("params", "models", "location"),
    [
        ({}, [{"weight": 1, "density": 0.1}], ("models", 0, "density")),
        ({}, [{"weight": 1, "density": 0.5, "epsilon": 0.5}], ("models", 0, "density")),
        ({"density": 0.9}, [{"weight": 1}, {"weight": 1}], ("parameters", "density")),
    ],
)
def test_della_epsilon_must_keep_probabilities_inside_0_1(
    params: dict[str, Any], models: list[dict[str, Any]], location: tuple[Any, ...]
) -> None:
    found = problems("della", params, models)
    assert list(found) == [location]
    assert "(0, 1)" in found[location]


def test_della_epsilon_is_free_when_nothing_is_pruned() -> None:
    assert problems("della", {}, [{"weight": 1, "density": 1.0, "epsilon": 0.5}]) == {}


@pytest.mark.parametrize(
    ("name", "count", "expected"),
    [
        ("slerp", 2, "exactly 1 other model"),
        ("model_stock", 1, "at least 2 other models"),
        ("linear", 1, "at least 2 models"),
        ("ties", 0, "at least 1 other model"),
    ],
)
def test_wrong_model_count(name: str, count: int, expected: str) -> None:
    models = [{"weight": 1.0} if name in ("linear", "ties") else {} for _ in range(count)]
    params = {"t": 0.5} if name in ("slerp", "nearswap") else {}
    found = problems(name, params, models)
    assert expected in found[("models",)]
    with pytest.raises(MethodParameterError, match=expected) as caught:
        validate_params(get_method(name), params, models)
    assert caught.value.method == name
    assert "Fix:" in str(caught.value)


def test_linear_refuses_to_normalise_weights_summing_to_zero() -> None:
    models = [{"weight": 1.0}, {"weight": -1.0}]
    assert "sum to 0" in problems("linear", {}, models)[("models",)]
    assert problems("linear", {"normalize": False}, models) == {}


def test_multislerp_refuses_to_normalise_weights_summing_to_zero() -> None:
    models = [{"weight": 0.5}, {"weight": -0.5}]
    assert "`normalize_weights` would divide" in problems("multislerp", {}, models)[("models",)]
    assert problems("multislerp", {"normalize_weights": False}, models) == {}


@pytest.mark.parametrize("bad", [True, -1, 2.5, "ten"])
def test_an_iteration_count_is_a_whole_number_at_least_zero(bad: Any) -> None:
    assert list(problems("karcher", {"max_iter": bad}, [{}, {}])) == [("parameters", "max_iter")]


def test_an_iteration_count_reads_yaml_spellings_of_whole_numbers() -> None:
    for given in (0, 3, 3.0, "3"):
        params, _ = validate_params(get_method("karcher"), {"max_iter": given}, [{}, {}])
        assert params.model_dump()["max_iter"] == int(float(given))


def test_every_problem_is_reported_at_once() -> None:
    found = problems(
        "della",
        {"bogus": 1, "lambda": "x"},
        [{"weight": 1, "density": 0.05}, {"gamma": 1, "weight": "x"}],
    )
    assert set(found) == {
        ("parameters", "bogus"),
        ("parameters", "lambda"),
        ("models", 0, "density"),
        ("models", 1, "gamma"),
        ("models", 1, "weight"),
    }


def test_merge_rejects_an_engine_call_that_breaks_the_contract() -> None:
    method = get_method("ties")
    params, models = validate_params(method, {}, [{"weight": 1}])
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="base"):
        method.merge([x], base=None, model_params=models, params=params)
    with pytest.raises(ValueError, match="float32"):
        method.merge([x.double()], base=x, model_params=models, params=params)
    slerp_params, _ = validate_params(get_method("slerp"), {"t": 0.5}, [{}])
    with pytest.raises(TypeError, match="TiesParams"):
        method.merge([x], base=x, model_params=models, params=slerp_params)

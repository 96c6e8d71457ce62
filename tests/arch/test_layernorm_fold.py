"""LayerNorm families (GPT-2, GPT-NeoX): the fold of gains and biases, and a residual rotation that
fixes the all-ones direction, keep a model's function (float64, 1e-10); one that does not fix it
changes it."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel

from hfmerge.arch import spec_for
from hfmerge.arch.head_maps import HeadMap, qk_maps_exact
from hfmerge.arch.residual import (
    FOLDED,
    BasisMap,
    map_state_dict,
    ones_complement,
    require_foldable,
    rotation_space,
)
from hfmerge.arch.spec import ArchSpec
from hfmerge.errors import AlignmentError
from tests.support.controls import CHANGED, KEPT
from tests.support.head_maps import mixing_head_maps, random_head_maps
from tests.support.rotation import allowed_rotation, random_orthogonal
from tests.support.tiny_models import (
    make_tiny_model,
    max_abs_diff,
    model_outputs,
    nontrivial_permutations,
    tiny_batch,
)

# (kind, config overrides): GPT-2 untied and tied; GPT-NeoX parallel and sequential, and without
# attention biases (its first norm's bias then stays in the norm as b/g).
CASES = {
    "gpt2": ("gpt2", {"tie_word_embeddings": False}),
    "gpt2_tied": ("gpt2", {"tie_word_embeddings": True}),
    "gpt_neox": ("gpt_neox", {}),
    "gpt_neox_sequential": ("gpt_neox", {"use_parallel_residual": False}),
    "gpt_neox_no_attention_bias": ("gpt_neox", {"attention_bias": False}),
}


def _model(case: str) -> tuple[PreTrainedModel, ArchSpec, dict[str, torch.Tensor]]:
    """The float64 model, its spec and checkpoint tensors as saved (a tied head absent)."""
    kind, overrides = CASES[case]
    model = make_tiny_model(kind, dtype=torch.float64, **overrides)
    tied = model.config.tie_word_embeddings
    params = {n: t for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")}
    return model, spec_for(model.config.to_dict(), params.keys()), params


def _change(case: str, model: PreTrainedModel, state: dict[str, torch.Tensor]) -> float:
    """Largest logit change with `state` loaded into an untied copy of `model`."""
    kind, overrides = CASES[case]
    fields = {**overrides, "tie_word_embeddings": False}  # the head a tensor of its own
    untied = make_tiny_model(kind, seed=77, dtype=torch.float64, **fields)
    untied.load_state_dict({**untied.state_dict(), **state}, strict=True)
    inputs = tiny_batch(kind, seed=20)
    return max_abs_diff(model_outputs(model, inputs), model_outputs(untied, inputs))


def test_the_tied_case_reads_its_head_from_the_embedding() -> None:
    assert _model("gpt2_tied")[1].tied == {"lm_head.weight": "transformer.wte.weight"}


@pytest.mark.parametrize("case", CASES)
def test_the_fold_keeps_the_logits_and_sets_every_gain_to_one(case: str) -> None:
    model, spec, params = _model(case)
    assert spec.centred_norms
    assert spec.foldable
    folded = map_state_dict(params, spec, FOLDED)
    assert spec.tied.keys() <= folded.keys()  # a tied head is written untied
    for norm in spec.norm_readers:
        assert not torch.equal(params[norm], torch.ones_like(params[norm]))  # a real fold
        assert torch.equal(folded[norm], torch.ones_like(params[norm]))
    assert _change(case, model, folded) < KEPT


def test_norm_biases_go_to_the_readers_biases_or_stay_as_bias_over_gain() -> None:
    _, spec, params = _model("gpt2")
    folded = map_state_dict(params, spec, FOLDED)
    ln_1, c_attn = "transformer.h.0.ln_1", "transformer.h.0.attn.c_attn"
    assert torch.equal(folded[f"{ln_1}.bias"], torch.zeros_like(params[f"{ln_1}.bias"]))
    # Conv1D [in, out]: the bias takes b·W over the input (residual) axis.
    expected = params[f"{c_attn}.bias"] + params[f"{ln_1}.bias"] @ params[f"{c_attn}.weight"]
    assert torch.allclose(folded[f"{c_attn}.bias"], expected, atol=1e-14)
    ln_f = "transformer.ln_f"  # read by the head, which has no bias
    kept = params[f"{ln_f}.bias"] / params[f"{ln_f}.weight"]
    assert torch.allclose(folded[f"{ln_f}.bias"], kept, atol=1e-14)


@pytest.mark.parametrize("case", CASES)
def test_a_rotation_fixing_the_ones_direction_keeps_the_logits(case: str) -> None:
    model, spec, params = _model(case)
    rotation = allowed_rotation(spec, seed=3)
    ones = torch.ones(rotation.shape[0], dtype=torch.float64)
    assert torch.allclose(rotation @ ones, ones, atol=1e-12)
    rotated = map_state_dict(params, spec, BasisMap(fold=True, rotation=rotation))
    assert _change(case, model, rotated) < KEPT


@pytest.mark.parametrize("case", ["gpt2", "gpt_neox"])
def test_a_rotation_that_moves_the_ones_direction_changes_the_logits(case: str) -> None:
    """Negative control: LayerNorm subtracts the mean, which a general rotation does not keep."""
    model, spec, params = _model(case)
    rotation = random_orthogonal(spec.groups["residual"].size, seed=3)
    rotated = map_state_dict(params, spec, BasisMap(fold=True, rotation=rotation))
    assert _change(case, model, rotated) > CHANGED


def test_permutations_fold_rotation_and_any_orthogonal_qk_map_compose_on_gpt2() -> None:
    """No RoPE: Q/K maps may be full orthogonal matrices; GPT-2's fused c_attn is split."""
    model, spec, params = _model("gpt2")
    assert qk_maps_exact(spec)
    vo = random_head_maps(spec, seed=7, invertible=True)
    mixing = mixing_head_maps(spec, seed=8)
    maps = {n: HeadMap(qk=mixing[n].qk, vo=vo[n].vo) for n in vo}
    basis = BasisMap(
        nontrivial_permutations(spec, seed=5),
        fold=True,
        rotation=allowed_rotation(spec, seed=6),
        head_maps=maps,
    )
    c_attn = "transformer.h.0.attn.c_attn.weight"
    mapped = map_state_dict(params, spec, basis)
    assert not torch.allclose(mapped[c_attn], params[c_attn])
    assert _change("gpt2", model, mapped) < KEPT


def test_gpt_neox_takes_vo_maps_but_no_qk_maps_under_its_partial_rope() -> None:
    model, spec, params = _model("gpt_neox")
    assert not qk_maps_exact(spec)
    maps = random_head_maps(spec, seed=9, invertible=True, qk=False)
    basis = BasisMap(fold=True, rotation=allowed_rotation(spec, seed=4), head_maps=maps)
    assert _change("gpt_neox", model, map_state_dict(params, spec, basis)) < KEPT


def test_the_ones_complement_is_orthonormal_and_orthogonal_to_ones() -> None:
    basis = ones_complement(7)
    assert basis.shape == (7, 6)
    assert torch.allclose(basis.T @ basis, torch.eye(6, dtype=torch.float64), atol=1e-14)
    assert torch.allclose(
        basis.T @ torch.ones(7, dtype=torch.float64), torch.zeros(6).double(), atol=1e-14
    )


def test_rmsnorm_families_keep_an_unconstrained_rotation() -> None:
    model = make_tiny_model("llama")
    assert rotation_space(spec_for(model.config.to_dict(), model.state_dict().keys())) is None


def test_a_zero_gain_with_a_bias_kept_in_the_norm_is_refused() -> None:
    _, spec, params = _model("gpt2")
    gain, bias = params["transformer.ln_f.weight"].clone(), params["transformer.ln_f.bias"]
    gain[3] = 0.0
    broken = {**params, "transformer.ln_f.weight": gain}
    with pytest.raises(AlignmentError, match=r"transformer\.ln_f\.weight"):
        map_state_dict(broken, spec, FOLDED)
    # With no bias on that unit there is nothing to divide: the fold is exact.
    cleared = bias.clone()
    cleared[3] = 0.0
    folded = map_state_dict({**broken, "transformer.ln_f.bias": cleared}, spec, FOLDED)
    assert float(folded["transformer.ln_f.bias"][3]) == 0.0


def test_a_bare_gpt2_has_nothing_to_fold_its_final_norm_into() -> None:
    model = make_tiny_model("gpt2")
    names = [n.removeprefix("transformer.") for n in model.state_dict() if n != "lm_head.weight"]
    config = {**model.config.to_dict(), "architectures": ["GPT2Model"]}
    spec = spec_for(config, names)
    assert not spec.foldable
    with pytest.raises(AlignmentError, match="not exact"):
        require_foldable(spec, label="B", feature="weight+orthogonal")

"""Alignment of mixture-of-experts models (Mixtral, Qwen3-MoE): weight matching, canonical order and
activation matching recover planted expert orders and per-expert FF orders exactly; REPAIR, which
has no sites inside the fused experts, refuses them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hfmerge.align import align_permutations
from hfmerge.align.weight_matching import weight_matching
from hfmerge.arch.experts import plain
from hfmerge.arch.permute import invert, permute_state_dict
from hfmerge.cli.app import main
from hfmerge.errors import AlignmentError
from hfmerge.pipeline.options import RunOptions
from hfmerge.pipeline.run import run_recipe
from hfmerge.recipe.schema import parse_recipe
from tests.support.align import assert_same_perms, padded_batches
from tests.support.lm import save_permuted_copy
from tests.support.tiny_models import nontrivial_permutations
from tests.support.tiny_moe import MOE_KINDS, checkpoint_of, save_moe_model, write_checkpoint
from tests.support.weights import read_weights


@pytest.mark.parametrize("kind", MOE_KINDS)
@pytest.mark.parametrize("seed", [1, 2])
def test_weight_matching_recovers_a_planted_expert_order(
    kind: str, seed: int, tmp_path: Path
) -> None:
    state, spec = checkpoint_of(save_moe_model(kind, tmp_path / "a"))
    planted = nontrivial_permutations(spec, seed=seed)
    assert not torch.equal(plain(planted, "layers.1.experts", 4), torch.arange(4))
    result = weight_matching(spec, state, permute_state_dict(state, spec, planted), seed=seed)
    assert_same_perms(result.perms, invert(spec, planted))  # expert orders and FF orders
    assert result.converged


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_weight_matching_pairs_experts_through_noise(kind: str, tmp_path: Path) -> None:
    """A fine-tune stand-in: every weight plus noise at a third of its own scale."""
    state, spec = checkpoint_of(save_moe_model(kind, tmp_path / "a"))
    generator = torch.Generator().manual_seed(4)
    noisy = {
        n: t + t.std() / 3 * torch.randn(t.shape, generator=generator) for n, t in state.items()
    }
    planted = nontrivial_permutations(spec, seed=5)
    result = weight_matching(spec, state, permute_state_dict(noisy, spec, planted))
    expected = invert(spec, planted)
    for layer in (0, 1):
        name = f"layers.{layer}.experts"
        assert torch.equal(plain(result.perms, name, 4), plain(expected, name, 4)), name


@pytest.mark.parametrize("method", ["weight", "canonical"])
@pytest.mark.parametrize("kind", MOE_KINDS)
def test_cli_align_returns_a_exactly(kind: str, method: str, chdir_tmp: Path) -> None:
    """`hfmerge align A PERMUTED_A --method M` writes A's own tensors, under A's names."""
    a = save_moe_model(kind, chdir_tmp / "a", seed=2)
    b = save_permuted_copy(a, chdir_tmp / "b", seed=9)
    original, permuted = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert any(not permuted[name].equal(tensor) for name, tensor in original.items())
    assert main(["align", str(a), str(b), "--out", "c", "--method", method]) == 0
    aligned = load_file(chdir_tmp / "c" / "model.safetensors")
    assert aligned.keys() == original.keys()
    assert all(aligned[name].equal(tensor) for name, tensor in original.items())


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_activation_matching_recovers_a_planted_expert_order(
    kind: str, tmp_path: Path, one_thread: None
) -> None:
    """Residual, attention, expert order and every expert's FF order, from the loaded models'
    activations (fused experts hooked, each expert's units on the tokens routed to it)."""
    a = save_moe_model(kind, tmp_path / "a", seed=1)
    state, spec = checkpoint_of(a)
    planted = nontrivial_permutations(spec, seed=3)
    assert not torch.equal(plain(planted, "layers.1.experts", 4), torch.arange(4))
    b = write_checkpoint(a, permute_state_dict(state, spec, planted), tmp_path / "b")
    result = align_permutations("activation", a, b, batches=padded_batches(kind))
    assert_same_perms(result, invert(spec, planted))


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_an_aligned_merge_of_a_with_its_permuted_copy_is_a(kind: str, tmp_path: Path) -> None:
    """`align: weight` in a recipe: the merge reads B's experts from the slots they land in."""
    a = save_moe_model(kind, tmp_path / "a", seed=3)
    b = save_permuted_copy(a, tmp_path / "b", seed=4)
    out = tmp_path / "out"
    recipe = {
        "models": [str(a), str(b)],
        "merge": {"method": "linear"},
        "align": {"method": "weight"},
        "output": {"path": str(out)},
    }
    run_recipe(parse_recipe(recipe), RunOptions(progress=False))
    original, merged = read_weights(a), read_weights(out)
    assert merged.keys() == original.keys()
    for name, tensor in original.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("align", "feature"),
    [
        ({"method": "weight", "repair": True}, "`align.repair` (REPAIR)"),
    ],
)
def test_a_recipe_asking_moe_for_what_it_lacks_is_refused_before_merging(
    align: dict[str, object], feature: str, tmp_path: Path
) -> None:
    a = save_moe_model("qwen3_moe", tmp_path / "a")
    out = tmp_path / "out"
    recipe = {"models": [str(a), str(a)], "align": align, "output": {"path": str(out)}}
    with pytest.raises(AlignmentError, match="mixture-of-experts") as caught:
        run_recipe(
            parse_recipe({**recipe, "merge": {"method": "linear"}}), RunOptions(progress=False)
        )
    assert feature in str(caught.value)
    assert not out.exists()

"""`align.method: weight+orthogonal` in a recipe: a model merged with its rotated copy is the model
(folded), the output is a plain checkpoint, and models the rewrite does not fit are refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from hfmerge.arch import spec_for
from hfmerge.arch.residual import FOLDED, map_state_dict
from hfmerge.errors import AlignmentError
from hfmerge.pipeline.options import RunOptions
from hfmerge.pipeline.run import run_recipe
from hfmerge.recipe.schema import parse_recipe
from tests.support.lm import save_lm
from tests.support.rotation import save_mapped_copy
from tests.support.tiny_models import max_abs_diff, model_outputs, tiny_batch
from tests.support.weights import read_weights

QUIET = RunOptions(progress=False)


def _recipe(
    models: list[Path], out: Path, method: str, align: str = "weight+orthogonal", **extra: Any
) -> Any:
    return parse_recipe(
        {
            "models": [str(m) for m in models],
            "merge": {"method": method},
            "output": {"path": str(out)},
            "align": {"method": align},
            **extra,
        }
    )


def _load(path: Path) -> PreTrainedModel:
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model


@pytest.mark.parametrize(
    "method", ["linear", pytest.param("task_arithmetic", marks=pytest.mark.slow)]
)
def test_a_model_merged_with_its_rotated_copy_is_the_model_folded(
    method: str, tmp_path: Path
) -> None:
    a = save_lm("llama", tmp_path / "a", seed=3)
    b = save_mapped_copy(a, tmp_path / "b", seed=7)
    out = tmp_path / "out"
    # Task arithmetic adds B's difference from the base A: zero only if A is read folded too.
    extra = {"base": str(a)} if method == "task_arithmetic" else {}
    run_recipe(_recipe([a, b], out, method, **extra), QUIET)
    original = read_weights(a)
    spec = spec_for(_load(a).config.to_dict(), original.keys())
    folded = map_state_dict({n: t.double() for n, t in original.items()}, spec, FOLDED)
    merged = read_weights(out)
    assert merged.keys() == original.keys()
    for name, tensor in folded.items():
        torch.testing.assert_close(merged[name].double(), tensor, rtol=0, atol=1e-5)
    for norm in spec.norm_readers:
        assert torch.equal(merged[norm], torch.ones_like(merged[norm]))
    inputs = tiny_batch("llama", seed=2)
    assert max_abs_diff(model_outputs(_load(a), inputs), model_outputs(_load(out), inputs)) < 1e-4
    assert "orthogonal" in (out / "README.md").read_text().split("## Alignment")[1]


def test_activation_orthogonal_in_a_recipe_undoes_the_rotation_from_probe_text(
    tmp_path: Path,
) -> None:
    a = save_lm("llama", tmp_path / "a", seed=3)
    b = save_mapped_copy(a, tmp_path / "b", seed=7)
    out = tmp_path / "out"
    run_recipe(_recipe([a, b], out, "linear", align="activation+orthogonal"), QUIET)
    inputs = tiny_batch("llama", seed=2)
    assert max_abs_diff(model_outputs(_load(a), inputs), model_outputs(_load(out), inputs)) < 1e-4
    assert "residual activations" in (out / "README.md").read_text().split("## Alignment")[1]


def test_learned_in_a_recipe_starts_from_weight_orthogonal_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no gradient step, `learned` is its start: the planted rotation undone."""
    monkeypatch.setattr("hfmerge.align.learned.STEPS", 0)
    a = save_lm("llama", tmp_path / "a", seed=3)
    b = save_mapped_copy(a, tmp_path / "b", seed=7)
    out = tmp_path / "out"
    recipe = _recipe([a, b], out, "linear", align="learned", probe={"samples": 8})
    run_recipe(recipe, QUIET)
    inputs = tiny_batch("llama", seed=2)
    assert max_abs_diff(model_outputs(_load(a), inputs), model_outputs(_load(out), inputs)) < 1e-4
    assert "gradient descent" in (out / "README.md").read_text().split("## Alignment")[1]


def test_permutations_alone_cannot_undo_the_rotation(tmp_path: Path) -> None:
    """The negative control of the test above: `weight` leaves the merge far from the model."""
    a = save_lm("llama", tmp_path / "a", seed=3)
    b = save_mapped_copy(a, tmp_path / "b", seed=7)
    out = tmp_path / "out"
    data = _recipe([a, b], out, "linear").model_dump()
    data["align"]["method"] = "weight"
    run_recipe(parse_recipe(data), QUIET)
    inputs = tiny_batch("llama", seed=2)
    assert max_abs_diff(model_outputs(_load(a), inputs), model_outputs(_load(out), inputs)) > 1e-2


def test_a_gpt2_merged_with_its_rotated_copy_keeps_its_function(tmp_path: Path) -> None:
    """LayerNorm: the copy's rotation fixes 1, and the merge reads the base's biases folded."""
    a = save_lm("gpt2", tmp_path / "a", seed=3, tie_word_embeddings=False)
    b = save_mapped_copy(a, tmp_path / "b", seed=7)
    out = tmp_path / "out"
    run_recipe(_recipe([a, b], out, "linear"), QUIET)
    merged = read_weights(out)
    assert torch.equal(merged["transformer.ln_f.weight"], torch.ones(32))
    inputs = tiny_batch("gpt2", seed=2)
    assert max_abs_diff(model_outputs(_load(a), inputs), model_outputs(_load(out), inputs)) < 1e-4


@pytest.mark.parametrize(("kind", "reason"), [("bert", "not exact"), ("llama_tied", "tied")])
def test_models_the_rewrite_does_not_fit_are_refused_before_matching(
    kind: str, reason: str, tmp_path: Path
) -> None:
    a = save_lm(kind, tmp_path / "a", seed=1)
    b = save_lm(kind, tmp_path / "b", seed=2)
    out = tmp_path / "out"
    with pytest.raises(AlignmentError, match=reason):
        run_recipe(_recipe([a, b], out, "linear"), QUIET)
    assert not out.exists()

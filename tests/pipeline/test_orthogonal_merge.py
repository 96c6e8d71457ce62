"""`align.method: weight+orthogonal` in a recipe: a model merged with its rotated copy is the model
(folded), the output is a plain checkpoint (a tied head written untied), and models the rewrite
does not fit are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from hfmerge.arch import spec_for
from hfmerge.arch.residual import FOLDED, map_state_dict
from hfmerge.engine.plan import MergePlan
from hfmerge.errors import AlignmentError
from hfmerge.pipeline.options import RunOptions
from hfmerge.pipeline.run import run_recipe
from hfmerge.recipe.schema import parse_recipe
from tests.support.lm import save_head_beside_embedding, save_lm
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


@pytest.mark.parametrize(("kind", "reason"), [("bert", "post-LN")])
def test_models_the_rewrite_does_not_fit_are_refused_before_matching(
    kind: str, reason: str, tmp_path: Path
) -> None:
    a = save_lm(kind, tmp_path / "a", seed=1)
    b = save_lm(kind, tmp_path / "b", seed=2)
    out = tmp_path / "out"
    with pytest.raises(AlignmentError, match=reason):
        run_recipe(_recipe([a, b], out, "linear"), QUIET)
    assert not out.exists()


# The checkpoints are float32: each folded product (E·g for the head, W·g for the other readers)
# is rounded once to float32 (relative 2^-24 ≈ 6e-8), which moves logits of magnitude ~4 by up
# to ~7e-7 through two layers (measured: 6.3e-7 Llama, 7.3e-7 Qwen3); float64 arithmetic adds
# nothing. The same output with its head set back to the embedding is off by more than 1.
FOLD_ROUNDING = 2e-6
TIED: dict[str, dict[str, Any]] = {"llama_tied": {}, "qwen3": {"tie_word_embeddings": True}}


def _logit_gap(a: Path, out: Path) -> float:
    inputs = tiny_batch("llama", seed=2)
    outputs = []
    for path in (a, out):
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
        outputs.append(model_outputs(model, inputs))
    return max_abs_diff(*outputs)


@pytest.mark.parametrize("kind", list(TIED))
def test_a_tied_model_merged_with_itself_is_the_model_written_untied(
    kind: str, tmp_path: Path
) -> None:
    """merge(A, A): the base is read folded too, so the merge is A's function, its head the
    folded head saved as a tensor of its own and the config untied."""
    a = save_lm(kind, tmp_path / "a", seed=3, **TIED[kind])
    out = tmp_path / "out"
    run_recipe(_recipe([a, a], out, "linear"), QUIET)
    original, merged = read_weights(a), read_weights(out)
    assert "lm_head.weight" not in original
    assert merged.keys() == {*original, "lm_head.weight"}
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    spec = spec_for(json.loads((a / "config.json").read_text()), original.keys())
    folded = map_state_dict({n: t.double() for n, t in original.items()}, spec, FOLDED)
    torch.testing.assert_close(merged["lm_head.weight"].double(), folded["lm_head.weight"])
    embedding = merged["model.embed_tokens.weight"]
    assert (merged["lm_head.weight"] - embedding).abs().max() > 0.1  # untied: the gain is in it
    assert _logit_gap(a, out) < FOLD_ROUNDING
    card = (out / "README.md").read_text().split("## Alignment")[1]
    assert "`lm_head.weight` was tied to its input embedding" in card
    assert "written untied" in card


def test_a_tied_config_with_its_head_saved_merges_untied(tmp_path: Path) -> None:
    """A checkpoint holding the head beside the embedding under a tied config: the head is
    merged as saved (no tensor added) and the config is untied, so transformers loads the
    folded head rather than tying it back to the embedding."""
    a = save_head_beside_embedding(save_lm("llama_tied", tmp_path / "a", seed=3))
    out = tmp_path / "out"
    run_recipe(_recipe([a, a], out, "linear"), QUIET)
    assert read_weights(out).keys() == read_weights(a).keys()
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert _logit_gap(a, out) < FOLD_ROUNDING
    assert "written untied" in (out / "README.md").read_text()


@pytest.mark.parametrize(("align", "untied"), [("weight+orthogonal", True), ("weight", False)])
def test_the_plan_writes_a_tied_head_only_when_the_alignment_folds(
    align: str, untied: bool, tmp_path: Path
) -> None:
    a = save_lm("llama_tied", tmp_path / "a", seed=1)
    b = save_lm("llama_tied", tmp_path / "b", seed=2)
    recipe = _recipe([a, b], tmp_path / "out", "linear", align=align)
    plan = run_recipe(recipe, RunOptions(progress=False, dry_run=True)).plan
    assert isinstance(plan, MergePlan)
    jobs = {job.name: job for job in plan.jobs}
    assert ("lm_head.weight" in jobs) is untied
    if untied:
        head, embedding = jobs["lm_head.weight"], jobs["model.embed_tokens.weight"]
        assert (head.shape, head.dtype, head.action) == (embedding.shape, embedding.dtype, "merge")
        assert "untied by the norm fold" in head.why
        assert plan.jobs[-1] is head

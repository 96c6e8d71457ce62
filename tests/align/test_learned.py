"""`learned`: weight+orthogonal's residual rotation refined by gradient descent on the loss of the
interpolated models; B's function kept, the midpoint loss lowered, post-LN models refused."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from hfmerge.align import MatchResult, align_basis, align_checkpoint
from hfmerge.align.learned import learned_matching, split_heldout
from hfmerge.arch import spec_for
from hfmerge.arch.residual import FOLDED, BasisMap, map_state_dict
from hfmerge.arch.spec import ArchSpec
from hfmerge.cli.app import main
from hfmerge.errors import AlignmentError
from hfmerge.lm.batches import probe_batches
from hfmerge.lm.textdata import load_texts, token_windows
from tests.support.align import assert_same_perms
from tests.support.lm import char_tokenizer, save_lm, train_tiny_lm
from tests.support.rotation import random_orthogonal
from tests.support.tiny_models import (
    max_abs_diff,
    model_outputs,
    nontrivial_permutations,
    tiny_batch,
)

STEPS = 30  # enough for the loss to move on these tiny models, a few seconds

Batch = dict[str, torch.Tensor]


def _params(model: PreTrainedModel, spec: ArchSpec) -> dict[str, torch.Tensor]:
    return {
        n: t.detach().double().clone() for n, t in model.state_dict().items() if n in spec.tensors
    }


def _batches(text: str, samples: int = 32) -> list[Batch]:
    """Probe batches of 4 windows of 48 characters (32 windows: 2 of the 8 batches held out)."""
    tokenizer = char_tokenizer("llama")
    windows = token_windows(tokenizer, load_texts(text), max_length=48, samples=samples)
    return probe_batches(windows, tokenizer, batch_size=4)


def _with(model: PreTrainedModel, tensors: Mapping[str, torch.Tensor]) -> PreTrainedModel:
    """A float64 Llama of `model`'s config holding `tensors`."""
    assert isinstance(model.config, LlamaConfig)
    copy = LlamaForCausalLM(model.config).double()
    copy.load_state_dict(dict(tensors), strict=True)
    copy.train(False)
    return copy


def _loss(model: PreTrainedModel, batches: list[Batch]) -> float:
    """Token-weighted next-token loss over the batches' unpadded tokens."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            count = int(batch["attention_mask"][:, 1:].sum())
            total += float(model(**batch, labels=labels).loss) * count
            tokens += count
    return total / tokens


def _midpoint_loss(
    model_a: PreTrainedModel,
    spec: ArchSpec,
    params_b: Mapping[str, torch.Tensor],
    basis: BasisMap,
    batches: list[Batch],
) -> float:
    """The loss of ½·A + ½·B read through `basis`, both folded, built from the tensors."""
    own = map_state_dict(_params(model_a, spec), spec, FOLDED)
    other = map_state_dict(params_b, spec, basis)
    return _loss(_with(model_a, {n: (own[n] + other[n]) / 2 for n in own}), batches)


def _spec(model: PreTrainedModel) -> ArchSpec:
    return spec_for(model.config.to_dict(), model.state_dict().keys())


def _learned(
    model_a: PreTrainedModel,
    spec: ArchSpec,
    params_b: Mapping[str, torch.Tensor],
    batches: list[Batch],
) -> MatchResult:
    params_a = _params(model_a, spec)
    return learned_matching(spec, model_a, params_a, params_b, batches, label="A", steps=STEPS)


@pytest.fixture(scope="module")
def trained_a() -> PreTrainedModel:
    return train_tiny_lm("llama", seed=0)


@pytest.mark.slow
def test_a_planted_rotated_copy_keeps_its_function_and_its_midpoint(
    trained_a: PreTrainedModel,
) -> None:
    """B is A folded, permuted and rotated: B read through the learned map is still B, and the
    midpoint is no worse than where weight+orthogonal started (there: A itself)."""
    spec = _spec(trained_a)
    planted = BasisMap(
        nontrivial_permutations(spec, seed=4),
        fold=True,
        rotation=random_orthogonal(spec.groups["residual"].size, seed=6),
    )
    params_b = map_state_dict(_params(trained_a, spec), spec, planted)
    batches = _batches("builtin:prose-train")
    result = _learned(trained_a, spec, params_b, batches)
    assert result.rotation is not None
    assert result.rotation.dtype == torch.float64
    eye = torch.eye(result.rotation.shape[0], dtype=torch.float64)
    assert torch.allclose(result.rotation @ result.rotation.T, eye, atol=1e-12)
    model_b = _with(trained_a, params_b)
    read = _with(trained_a, map_state_dict(params_b, spec, result.basis))
    inputs = batches[0]
    assert torch.allclose(read(**inputs).logits, model_b(**inputs).logits, atol=1e-5, rtol=0)
    start, end = result.objective
    assert start == pytest.approx(_loss(trained_a, batches[:16]), abs=1e-4)  # the midpoint is A
    assert end <= start + 1e-6


@pytest.mark.slow
def test_on_a_pair_trained_apart_the_midpoint_loss_falls(trained_a: PreTrainedModel) -> None:
    """Two seeds: the learned map's midpoint model scores better on the probe text than
    weight+orthogonal's (its start), and on held-out text too; the reported losses are real."""
    model_b = train_tiny_lm("llama", seed=1)
    probe, held_out = _batches("builtin:prose-train"), _batches("builtin:prose")
    spec = _spec(trained_a)
    params_b = _params(model_b, spec)
    result = _learned(trained_a, spec, params_b, probe)
    start = _start(trained_a, spec, params_b)
    assert start.perms is not None
    assert_same_perms(start.perms, result.perms)
    before = _midpoint_loss(trained_a, spec, params_b, start, probe)
    after = _midpoint_loss(trained_a, spec, params_b, result.basis, probe)
    assert result.objective == pytest.approx([before, after], abs=1e-4)
    assert after < before - 0.01
    assert _midpoint_loss(trained_a, spec, params_b, result.basis, held_out) < _midpoint_loss(
        trained_a, spec, params_b, start, held_out
    )
    assert 0 < result.iterations <= STEPS


def _start(
    model_a: PreTrainedModel, spec: ArchSpec, params_b: Mapping[str, torch.Tensor]
) -> BasisMap:
    """weight+orthogonal's map: the start the learned rotation refines."""
    from hfmerge.align.head_maps import head_map_matching

    start = head_map_matching(spec, _params(model_a, spec), params_b)
    assert start.rotation is not None
    return start.basis


@pytest.mark.slow
def test_cli_barrier_compares_learned_with_the_other_modes(
    trained_a: PreTrainedModel,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("hfmerge.align.learned.STEPS", STEPS)  # the CLI takes the default
    a = save_lm("llama", tmp_path / "a", model=trained_a)
    b = save_lm("llama", tmp_path / "b", model=train_tiny_lm("llama", seed=1))
    argv = ["barrier", str(a), str(b), "--align", "none,weight+orthogonal,learned"]
    argv += ["--steps", "3", "--max-length", "48", "--samples", "8"]
    argv += ["--probe-data", "builtin:prose-train", "--json", str(tmp_path / "b.json")]
    assert main([*argv, "--plot", str(tmp_path / "b.png")]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ["λ", "none", "weight+orthogonal", "learned"]
    assert (tmp_path / "b.png").stat().st_size > 0
    none, orthogonal, learned = json.loads((tmp_path / "b.json").read_text())["results"]
    for curve in (orthogonal, learned):  # the endpoints are A and B: the map keeps B
        assert curve["loss_a"] == pytest.approx(none["loss_a"], abs=1e-5)
        assert curve["loss_b"] == pytest.approx(none["loss_b"], abs=1e-5)
    # Refined from weight+orthogonal's map: another midpoint (whether it scores better on 8
    # windows of held-out text after steps on 8 others is not the point here).
    assert abs(learned["loss_mid"] - orthogonal["loss_mid"]) > 1e-4


def test_a_post_layernorm_pair_is_refused(tmp_path: Path) -> None:
    a = save_lm("bert", tmp_path / "a", seed=1)
    b = save_lm("bert", tmp_path / "b", seed=2)
    with pytest.raises(AlignmentError, match="not exact"):
        align_basis("learned", a, b, batches=_batches("builtin"))


@pytest.mark.slow
def test_a_tied_head_is_learned_untied_and_the_written_model_is_still_b(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hfmerge align --method learned` on tied Llamas: the loaded skeleton's tied head takes its
    own folded values during the steps; B written through the learned map keeps its logits."""
    monkeypatch.setattr("hfmerge.align.learned.STEPS", 5)
    a = save_lm("llama_tied", tmp_path / "a", seed=1)
    b = save_lm("llama_tied", tmp_path / "b", seed=2)
    out = tmp_path / "out"
    result = align_checkpoint(a, b, out, method="learned", progress=False)
    assert result.iterations == 5
    start, end = result.objective
    assert end < start  # a real change of the midpoint, measured on the built-in probe text
    original = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32)
    aligned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not aligned.config.tie_word_embeddings
    inputs = tiny_batch("llama", seed=20)
    assert max_abs_diff(model_outputs(original, inputs), model_outputs(aligned, inputs)) < 1e-4


def test_every_fourth_probe_batch_is_held_out_to_choose_the_rotation() -> None:
    batches: list[Batch] = [{"input_ids": torch.tensor([i])} for i in range(9)]
    train, held = split_heldout(batches)
    assert [int(b["input_ids"]) for b in held] == [3, 7]
    assert [int(b["input_ids"]) for b in train] == [0, 1, 2, 4, 5, 6, 8]
    assert split_heldout(batches[:3]) == (batches[:2], batches[2:3])  # the last of 2 or 3
    assert split_heldout(batches[:1]) == (batches[:1], [])  # one batch: nothing to hold out


@pytest.mark.slow
def test_a_refinement_that_only_fits_the_probe_text_is_not_kept(
    trained_a: PreTrainedModel,
) -> None:
    """16 probe windows (3 batches to step on, 1 held out): the steps lower the loss on the
    batches they see but raise it on the held-out one, so weight+orthogonal's map is kept."""
    spec = _spec(trained_a)
    params_b = _params(train_tiny_lm("llama", seed=1), spec)
    probe = _batches("builtin:prose-train", samples=16)
    result = _learned(trained_a, spec, params_b, probe)
    start = _start(trained_a, spec, params_b)
    assert result.rotation is not None
    assert start.rotation is not None
    assert torch.equal(result.rotation, start.rotation)
    assert result.objective[0] == result.objective[1]
    assert result.iterations == STEPS  # it stepped; the held-out batch chose the start

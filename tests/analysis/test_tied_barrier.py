"""Barriers of models with a tied head: the interpolation skeleton is untied while folded weights
are loaded (the orthogonal curves and `learned`) and tied as loaded for the others, so every
curve's endpoints are the models' own losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from hfmerge.analysis.barrier import BarrierResult, compare_barriers
from hfmerge.analysis.interpolate import Interpolator, write_point
from hfmerge.arch.residual import FOLDED, read_in_basis
from hfmerge.cli.app import main
from hfmerge.lm.load import load_lm
from tests.support.lm import save_head_beside_embedding, save_lm, source_of
from tests.support.tiny_models import max_abs_diff, model_outputs, tiny_batch
from tests.support.weights import read_weights

LENGTH, SAMPLES = 48, 8
ENDPOINTS = 1e-5  # float32 losses; the fold rounds each product once to float32 (~7e-7 here)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/support/fixtures.py one_thread


@pytest.fixture(scope="module")
def tied_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two unrelated tiny Llamas with tied heads (no lm_head.weight in their checkpoints)."""
    root = tmp_path_factory.mktemp("tied")
    return save_lm("llama_tied", root / "a", seed=1), save_lm("llama_tied", root / "b", seed=2)


def _curves(a: Path, b: Path, aligns: list[str]) -> list[BarrierResult]:
    return compare_barriers(
        source_of(a),
        source_of(b),
        aligns=aligns,
        steps=3,
        max_length=LENGTH,
        samples=SAMPLES,
        progress=False,
    )


def _head_and_embedding(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor]:
    params = dict(model.named_parameters(remove_duplicate=False))
    return params["lm_head.weight"], params["model.embed_tokens.weight"]


def test_the_skeleton_is_untied_for_folded_weights_and_tied_back_for_the_others(
    tied_pair: tuple[Path, Path],
) -> None:
    a, b = tied_pair
    model = load_lm(a, label="a")
    _, embedding = _head_and_embedding(model)
    interpolator = Interpolator(model, source_of(a), source_of(b))
    spec = interpolator.a.spec
    interpolator.load(0.0, spec=spec, basis=FOLDED)
    head, _ = _head_and_embedding(model)
    assert head is not embedding  # its own parameter now
    assert model.config.tie_word_embeddings is False
    saved = read_weights(a)
    folded = read_in_basis("lm_head.weight", saved.__getitem__, spec, FOLDED)
    assert torch.equal(head.detach(), folded)  # E·g: the final gain folded into the head alone
    assert torch.equal(embedding.detach(), saved["model.embed_tokens.weight"])
    interpolator.load(0.0)
    assert _head_and_embedding(model)[0] is embedding
    assert model.config.tie_word_embeddings is True
    # A second interpolator on a skeleton the first left untied (REPAIR measures each input so)
    # ties it back as loaded before taking its checkpoint targets.
    interpolator.load(1.0, spec=spec, basis=FOLDED)
    Interpolator(model, source_of(a), source_of(b))
    assert _head_and_embedding(model)[0] is embedding


def test_a_folded_point_written_for_placed_loading_holds_its_head_untied(
    tied_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """`write_point` (REPAIR within a memory budget) writes what `load` puts in the skeleton:
    B folded at λ=1, its head a tensor of its own under an untied config, B's function."""
    a, b = tied_pair
    spec = Interpolator(load_lm(a, label="a"), source_of(a), source_of(b)).a.spec
    out = tmp_path / "point"
    write_point(
        source_of(a), source_of(b), 1.0, out, spec=spec, basis=FOLDED, max_shard_bytes=2**30
    )
    assert read_weights(out).keys() == {*read_weights(b), "lm_head.weight"}
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    inputs = tiny_batch("llama_tied", seed=3)
    gap = max_abs_diff(
        model_outputs(load_lm(b, label="b"), inputs), model_outputs(load_lm(out, label="p"), inputs)
    )
    assert gap < 1e-5  # float32 rounding of the folded products; tied back, it is off by ~1


@pytest.mark.slow
def test_cli_barrier_of_tied_models_keeps_every_curves_endpoints(
    tied_pair: tuple[Path, Path],
    chdir_tmp: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("hfmerge.align.learned.STEPS", 10)  # a few steps: the map stays exact
    a, b = tied_pair
    modes = "none,weight,weight+orthogonal,learned"
    argv = ["barrier", str(a), str(b), "--align", modes, "--steps", "3", "--json", "b.json"]
    assert main([*argv, "--max-length", str(LENGTH), "--samples", str(SAMPLES)]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["λ", *modes.split(",")]
    none, *aligned = json.loads((chdir_tmp / "b.json").read_text())["results"]
    for curve in aligned:
        assert curve["loss_a"] == pytest.approx(none["loss_a"], abs=ENDPOINTS)
        assert curve["loss_b"] == pytest.approx(none["loss_b"], abs=ENDPOINTS)
    # λ=0 is scored once, on the first curve: a folded curve first scores A folded, untied, and
    # a curve after it that does not fold runs the tied skeleton again (the same losses).
    folded, weight = _curves(a, b, ["weight+orthogonal", "weight"])
    assert folded.loss_a == pytest.approx(none["loss_a"], abs=ENDPOINTS)
    assert folded.loss_b == pytest.approx(none["loss_b"], abs=ENDPOINTS)
    assert folded.loss == pytest.approx(aligned[1]["loss"], abs=ENDPOINTS)
    assert weight.loss == pytest.approx(aligned[0]["loss"], abs=1e-6)


@pytest.mark.slow
def test_a_tied_config_with_its_head_saved_keeps_the_orthogonal_endpoints(
    tmp_path: Path,
) -> None:
    """The checkpoint holds the head beside the embedding, the loaded model ties them: the fold
    must not write the folded head into the embedding they share."""
    a = save_head_beside_embedding(save_lm("llama_tied", tmp_path / "a", seed=1))
    b = save_head_beside_embedding(save_lm("llama_tied", tmp_path / "b", seed=2))
    folded, none = _curves(a, b, ["weight+orthogonal", "none"])
    (plain,) = _curves(a, b, ["none"])
    assert none.loss[1:] == pytest.approx(plain.loss[1:], abs=1e-6)  # λ=0 is `folded`'s
    assert folded.loss_a == pytest.approx(plain.loss_a, abs=ENDPOINTS)
    assert folded.loss_b == pytest.approx(plain.loss_b, abs=ENDPOINTS)

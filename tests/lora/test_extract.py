"""`extract-lora`: PEFT loads the adapter, full rank reproduces the fine-tune, lower ranks keep
what their energy says, and the output is written like every other output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import PreTrainedModel

from hfmerge import api
from hfmerge.errors import IncompatibleModelsError, NonFiniteWeightsError, OptionError, OutputError
from hfmerge.lora.factor import RankChoice, factorize
from tests.support.lora import merge_adapter
from tests.support.tiny_models import add_noise, make_tiny_model, model_outputs, tiny_batch
from tests.support.weights import read_weights


def fine_tune_pair(root: Path, kind: str = "llama") -> tuple[Path, Path]:
    """A tiny base and a noisy full fine-tune of it (every tensor changed)."""
    base, tuned = root / "base", root / "tuned"
    make_tiny_model(kind, seed=0).save_pretrained(base)
    fine_tune(kind).save_pretrained(tuned)
    return base, tuned


def fine_tune(kind: str) -> PreTrainedModel:
    """Every tensor changed; GPT-2's tied embeddings kept (PEFT's saved copy of an embedding
    does not carry the tie to the output head)."""
    model = add_noise(make_tiny_model(kind, seed=0), seed=5, scale=0.02)
    if kind == "gpt2":
        original = make_tiny_model(kind, seed=0)
        with torch.no_grad():
            for name in ("transformer.wte.weight", "transformer.wpe.weight"):
                model.get_parameter(name).copy_(original.get_parameter(name))
    return model


def peft_logits(kind: str, adapter: Path) -> torch.Tensor:
    model = PeftModel.from_pretrained(make_tiny_model(kind, seed=0), str(adapter))
    with torch.no_grad():
        logits: torch.Tensor = model(**tiny_batch(kind)).logits
    return logits


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_full_rank_with_modules_to_save_reproduces_the_fine_tune(tmp_path: Path, kind: str) -> None:
    base, tuned = fine_tune_pair(tmp_path, kind)
    result = api.extract_lora(
        str(tuned),
        str(base),
        tmp_path / "adapter",
        rank=10_000,
        modules_to_save=True,
        progress=False,
    )
    assert all(row.energy == pytest.approx(1.0, abs=1e-6) for row in result.extraction.lora)
    expected = model_outputs(fine_tune(kind), tiny_batch(kind))["logits"]
    assert torch.allclose(peft_logits(kind, result.out_dir), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_hfmerge_reads_the_full_rank_adapter_back_as_the_fine_tune(
    tmp_path: Path, kind: str
) -> None:
    base, tuned = fine_tune_pair(tmp_path, kind)
    adapter = api.extract_lora(
        str(tuned), str(base), tmp_path / "a", rank=10_000, modules_to_save=True, progress=False
    )
    assert adapter.extraction.lora_biases == (kind == "gpt2")  # c_attn.bias and the like
    merged = merge_adapter(base, adapter.out_dir, tmp_path / "merged")
    wanted = read_weights(tuned)
    assert merged.keys() == wanted.keys()
    for name, tensor in merged.items():
        assert torch.allclose(tensor, wanted[name], rtol=0, atol=1e-5), name


def test_low_rank_files_card_and_config(tmp_path: Path) -> None:
    base, tuned = fine_tune_pair(tmp_path)
    result = api.extract_lora(str(tuned), str(base), tmp_path / "a", rank=3, progress=False)
    config = json.loads((result.out_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (3, 3, "LORA")
    assert config["rank_pattern"] == {}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "lm_head"} <= set(
        config["target_modules"]
    )
    weights = read_weights(result.out_dir)
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (
        3,
        64,
    )
    assert not any("embed_tokens" in n or "norm" in n for n in weights)  # left out by default
    card = (result.out_dir / "README.md").read_text()
    assert "base_model_relation: adapter" in card
    assert f"base_model: {base}" in card
    assert "| model.norm.weight | 64 | left out | - | 0.00% |" in card
    assert 0.0 < min(row.energy for row in result.extraction.lora) < 1.0


def test_energy_picks_per_tensor_ranks_into_rank_and_alpha_patterns(tmp_path: Path) -> None:
    base, tuned = fine_tune_pair(tmp_path)
    result = api.extract_lora(str(tuned), str(base), tmp_path / "a", energy=0.6, progress=False)
    config = result.config
    ranks = {row.name.removesuffix(".weight"): row.rank for row in result.extraction.lora}
    assert len(set(ranks.values())) > 1
    assert config["rank_pattern"] == config["alpha_pattern"]
    assert all(row.energy >= 0.6 for row in result.extraction.lora)
    logits = peft_logits("llama", result.out_dir)  # PEFT reads the per-module ranks
    assert torch.isfinite(logits).all()


def test_energy_rank_is_the_smallest_keeping_the_share() -> None:
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 40))
    v, _ = torch.linalg.qr(torch.randn(30, 30))
    s = torch.tensor([4.0, 2.0, 1.0, 1.0] + [0.0] * 26)  # energies 16, 4, 1, 1 of 22
    delta = u[:, :30] @ torch.diag(s) @ v.T
    assert factorize(delta, RankChoice(rank=None, energy=16 / 22 - 1e-4)).rank == 1
    assert factorize(delta, RankChoice(rank=None, energy=20.5 / 22)).rank == 3
    full = factorize(delta, RankChoice(rank=None, energy=1.0))
    assert torch.allclose(full.b @ full.a, delta, atol=1e-5)


def test_randomized_svd_finds_a_low_rank_delta() -> None:
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(300, 8, generator=generator) @ torch.randn(8, 200, generator=generator)
    choice = RankChoice(rank=8, exact_limit=50)
    found = factorize(delta, choice)
    assert found.rank == 8
    assert found.energy == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(found.b @ found.a, delta, atol=1e-3)
    by_energy = factorize(delta, RankChoice(rank=None, energy=0.999999, exact_limit=50))
    assert by_energy.rank <= 8
    again = factorize(delta, choice)
    assert torch.equal(again.a, found.a)  # a fixed seed: the same adapter every time


def test_refusals(tmp_path: Path) -> None:
    base, tuned = fine_tune_pair(tmp_path)
    with pytest.raises(OptionError, match="--rank or --energy"):
        api.extract_lora(str(tuned), str(base), tmp_path / "a", rank=4, energy=0.5)
    with pytest.raises(OptionError, match="at most 1"):
        api.extract_lora(str(tuned), str(base), tmp_path / "a", energy=1.5)
    with pytest.raises(OutputError):
        api.extract_lora(str(tuned), str(base), tuned / "inside", progress=False)
    other = tmp_path / "other"
    make_tiny_model("llama", seed=0, intermediate_size=80).save_pretrained(other)
    with pytest.raises(IncompatibleModelsError):
        api.extract_lora(str(other), str(base), tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()


def test_a_nan_in_the_fine_tune_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    base, tuned = fine_tune_pair(tmp_path)
    model = make_tiny_model("llama", seed=0)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    model.save_pretrained(tuned)
    with pytest.raises(NonFiniteWeightsError, match="up_proj"):
        api.extract_lora(str(tuned), str(base), tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()

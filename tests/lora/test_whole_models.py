"""Steps that run whole models apply a LoRA adapter as PEFT's `merge_and_unload` does: loading,
`evaluate`, `cka`, `barrier` (with weight matching) and a recipe's CKA gate, alignment and REPAIR
over `BASE+ADAPTER` give what they give over PEFT's merged model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hfmerge import api
from hfmerge.errors import AdapterError
from hfmerge.lm.load import load_lm, load_probe_model
from hfmerge.pipeline.options import RunOptions
from hfmerge.pipeline.run import run_recipe
from hfmerge.recipe.schema import parse_recipe
from tests.lora.test_apply import CASES
from tests.support.lm import char_tokenizer, save_lm
from tests.support.lora import save_adapter, save_peft_merged
from tests.support.weights import read_weights

LORA: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}
PROBE = {"data": "builtin", "samples": 8, "max_length": 32}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(base with a tokenizer, its adapter, PEFT's merge of the two with the tokenizer)."""
    root = tmp_path_factory.mktemp("pair")
    base, adapter, _ = save_adapter("llama", root, **LORA)
    char_tokenizer("llama").save_pretrained(base)
    return base, adapter, save_peft_merged(base, adapter, root / "merged")


@pytest.mark.parametrize("case", ["plain", "conv1d", "embedding", "modules_to_save"])
def test_a_loaded_model_with_its_adapter_is_peft_s_merge(tmp_path: Path, case: str) -> None:
    kind, lora = CASES[case]
    base, adapter, expected = save_adapter(kind, tmp_path, **lora)
    whole = load_lm(base, label="base", adapter=adapter).state_dict()
    plain = load_lm(base, label="base").state_dict()
    assert any(not torch.equal(whole[n], plain[n]) for n in expected)  # the adapter did something
    for name, tensor in expected.items():
        assert torch.allclose(whole[name], tensor, rtol=0, atol=1e-6), name
    headless = load_probe_model(base, label="base", adapter=adapter, device_map=None)
    prefix = f"{headless.base_model_prefix}."
    for name, tensor in headless.state_dict().items():  # no `model.` prefix, no LM head
        assert torch.allclose(tensor, expected[prefix + name], rtol=0, atol=1e-6), name


@pytest.mark.slow
def test_evaluate_and_cka_over_base_plus_adapter_are_those_of_the_merge(
    pair: tuple[Path, Path, Path],
) -> None:
    base, adapter, merged = pair
    adapted = f"{base}+{adapter}"
    report = api.evaluate([adapted, str(merged), str(base)], data="builtin", samples=4)
    loss = {ref: report.result(ref).loss for ref in (adapted, str(merged), str(base))}
    assert loss[adapted] == pytest.approx(loss[str(merged)], rel=1e-5)
    assert abs(loss[adapted] - loss[str(base)]) > 1e-3  # the adapter changed the model
    kw: dict[str, Any] = {"samples": 8, "max_length": 32, "device_map": "cpu", "progress": False}
    with_adapter = api.cka(adapted, str(base), **kw)
    with_merge = api.cka(str(merged), str(base), **kw)
    assert with_adapter.diagonal == pytest.approx(with_merge.diagonal, abs=1e-5)
    assert min(with_adapter.diagonal) < 0.9999  # not the base against itself


@pytest.mark.slow
def test_barrier_with_weight_matching_reads_the_adapted_weights(
    pair: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, adapter, merged = pair
    other = save_lm("llama", tmp_path / "other", seed=1)
    kw: dict[str, Any] = {"align": ["none", "weight"], "steps": 3, "samples": 4, "progress": False}
    adapted = api.barrier(f"{base}+{adapter}", str(other), **kw).results
    expected = api.barrier(str(merged), str(other), **kw).results
    for got, want in zip(adapted, expected, strict=True):
        assert got.loss == pytest.approx(want.loss, rel=1e-5), got.align


@pytest.mark.slow
@pytest.mark.parametrize("adapted_is_base", [True, False])
def test_a_recipe_s_gate_alignment_and_repair_apply_the_adapter(
    pair: tuple[Path, Path, Path], tmp_path: Path, adapted_is_base: bool
) -> None:
    base, adapter, merged = pair
    other = save_lm("llama", tmp_path / "other", seed=1)

    def run(model: str, out: Path) -> dict[str, torch.Tensor]:
        data = {
            "models": [{"model": model, "weight": 0.5}, {"model": str(other), "weight": 0.5}],
            "base": model if adapted_is_base else str(other),
            "align": {"method": "weight", "repair": True},
            "check": {"cka_min": 0.99},  # below it: --force runs the gate and goes on
            "probe": PROBE,
            "merge": {"method": "linear"},
            "output": {"path": str(out), "dtype": "float32"},
        }
        run_recipe(parse_recipe(data), RunOptions(force=True, progress=False))
        return read_weights(out)

    got = run(f"{base}+{adapter}", tmp_path / "adapted")
    want = run(str(merged), tmp_path / "merged")
    for name, tensor in want.items():
        assert torch.allclose(got[name], tensor, rtol=0, atol=1e-5), name


def test_commands_that_read_the_model_s_own_weights_refuse_an_adapter_by_name(
    pair: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, adapter, _ = pair
    adapted = f"{base}+{adapter}"
    with pytest.raises(AdapterError) as caught:
        api.fingerprint([adapted, str(base)], progress=False)
    assert (caught.value.adapter, caught.value.base) == (str(adapter), str(base))
    assert "merge_and_unload" in str(caught.value)
    with pytest.raises(AdapterError):
        api.align(str(base), adapted, out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

"""A routed model over two LoRA adapters of one tiny Llama: the repo stores the adapters (and the
base once), `RoutedModel` holds the base once plus the adapters' factors, and each row's logits
and generations are those of PEFT's merge of its base with the adapter it was routed to."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from hfmerge.pipeline.options import RunOptions
from hfmerge.pipeline.run import run_recipe
from hfmerge.recipe.schema import parse_recipe
from hfmerge.routing import MANIFEST_FILE, RoutedModel, read_manifest
from hfmerge.routing.manifest import ADAPTER_FORMAT_VERSION, parse_manifest
from hfmerge.routing.model import SHARED_BASE
from tests.support.lm import char_tokenizer
from tests.support.lora import save_adapter, save_peft_merged
from tests.support.routing import LENGTH, NAMES, digit_texts, letter_texts

# The routed repo fixture builds a router (~2 s); see tests/support/fixtures.py one_thread.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

LORA: dict[str, Any] = {
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj", "v_proj", "up_proj", "embed_tokens"],
}


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """(a routed repo over adapters `digits` and `letters` of one base, bundled; PEFT's merge of
    the base with each adapter, by expert name)."""
    root = tmp_path_factory.mktemp("adapters")
    adapters, merged = {}, {}
    for index, name in enumerate(NAMES):  # one base (seed 0), two adapters on it
        base, adapter, _ = save_adapter("llama", root / name, adapter_seed=10 + index, **LORA)
        (root / "adapters").mkdir(exist_ok=True)
        adapters[name] = adapter.rename(root / "adapters" / name)  # the expert's name
        char_tokenizer("llama").save_pretrained(base)
        merged[name] = save_peft_merged(base, adapters[name], root / f"{name}-merged")
    texts = {}
    for name, make in zip(NAMES, (digit_texts, letter_texts), strict=True):
        texts[name] = root / f"{name}.txt"
        texts[name].write_text("\n".join(make(20)) + "\n", encoding="utf-8")
    base = root / NAMES[0] / "base"
    recipe = {
        "models": [f"{base}+{adapters[name]}" for name in NAMES],
        "base": str(base),  # the router backbone: the adapters' own base, not loaded twice
        "probe": {"samples": 24, "max_length": LENGTH},
        "route": {"method": "centroid", "experts": [{"data": str(texts[n])} for n in NAMES]},
        "output": {"path": str(root / "routed")},
    }
    run_recipe(parse_recipe(recipe), RunOptions(progress=False))
    return root / "routed", merged


def _merged(path: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(path)
    model.train(False)
    return model


def test_the_repo_stores_the_base_once_and_each_adapter(
    routed: tuple[Path, dict[str, Path]],
) -> None:
    repo, _ = routed
    manifest = read_manifest(repo)
    assert manifest.format_version == ADAPTER_FORMAT_VERSION
    assert [e.adapter.path if e.adapter else None for e in manifest.experts] == [
        f"experts/{n}" for n in NAMES
    ]
    assert {e.location.path for e in manifest.experts} == {"bases/base"}
    assert manifest.router.backbone is not None
    assert manifest.router.backbone.location is not None
    assert manifest.router.backbone.location.path == "bases/base"
    for name in NAMES:
        files = sorted(p.name for p in (repo / "experts" / name).iterdir())
        assert files == ["adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in (repo / "bases").iterdir()] == ["base"]
    document = json.loads((repo / MANIFEST_FILE).read_text())
    assert parse_manifest(document) == manifest  # the adapter locations round-trip


def test_each_row_is_its_adapter_merged_into_the_one_base(
    routed: tuple[Path, dict[str, Path]],
) -> None:
    repo, merged = routed
    model = RoutedModel.from_pretrained(repo, device_map="cpu")
    texts = digit_texts(3, seed=5) + letter_texts(3, seed=6)
    assert model.route(texts) == [0] * 3 + [1] * 3
    model.tokenizer.padding_side = "left"
    batch = model.tokenizer(texts, return_tensors="pt", padding=True)
    out = model(batch["input_ids"], batch["attention_mask"])
    generated = model.generate(
        batch["input_ids"], batch["attention_mask"], max_new_tokens=4, do_sample=False
    )
    for index, name in enumerate(NAMES):
        rows = out.experts == index
        expert = _merged(merged[name])
        ids, mask = batch["input_ids"][rows], batch["attention_mask"][rows]
        with torch.no_grad():
            expected = expert(input_ids=ids, attention_mask=mask).logits
            tokens = cast(Any, expert).generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=model.tokenizer.pad_token_id,
            )
        assert torch.allclose(out.logits[rows], expected, rtol=0, atol=1e-5), name
        assert torch.equal(generated[rows], tokens), name
    # One base in memory, whichever expert ran: its parameters once, plus the adapters' factors.
    assert model.pool.loaded == (f"{SHARED_BASE}0",)
    held = sum(p.numel() for p in model.pool.get(f"{SHARED_BASE}0").parameters())
    base_numel = sum(p.numel() for p in _merged(merged[NAMES[0]]).parameters())
    assert held == base_numel
    factors = sum(adapter.numel for adapter in model.adapters.values())
    assert factors == sum(_adapter_numel(repo / "experts" / name) for name in NAMES)
    assert factors < base_numel / 4  # memory grows by the adapters, not by whole models


def _adapter_numel(folder: Path) -> int:
    tensors = load_file(folder / "adapter_model.safetensors")
    return sum(t.numel() for name, t in tensors.items() if "lora_" in name)  # the factors

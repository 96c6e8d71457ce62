"""LoRA adapters on the (loopback) Hub: checked from their config and header before any weight
is downloaded, applied on read, and pinned in the saved recipe."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from hfmerge.cli.app import main
from tests.adversarial.cli_failures import fails
from tests.adversarial.test_no_pickle_no_remote_code import _Marker
from tests.support.fakehub import FakeHub
from tests.support.fakehub_models import write_recipe
from tests.support.lora import save_adapter
from tests.support.weights import read_weights

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def test_a_hub_adapter_is_checked_remotely_then_applied_and_pinned(
    fake_hub: FakeHub, chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter, expected = save_adapter(
        "llama", chdir_tmp / "made", r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]
    )
    base_sha = fake_hub.add_model("org/base", base)
    adapter_sha = fake_hub.add_model("org/adapter", adapter)
    entries = [{"model": "org/base+org/adapter", "weight": 1.0}, {"model": "org/base", "weight": 0}]
    recipe = write_recipe(chdir_tmp / "r.yaml", entries, dtype="float32")

    assert main(["validate", str(recipe)]) == 0
    assert fake_hub.weight_bytes_served == 0  # configs and headers only

    assert main(["run", str(recipe)]) == 0
    merged = read_weights(chdir_tmp / "merged")
    for name, tensor in merged.items():
        assert torch.allclose(tensor, expected[name], rtol=0, atol=1e-6), name
    pinned = yaml.safe_load((chdir_tmp / "merged" / "hfmerge_recipe.yaml").read_text())
    assert pinned["models"][0] == {
        "model": "org/base",
        "weight": 1.0,
        "revision": base_sha,
        "lora": f"org/adapter@{adapter_sha}",
    }


def test_a_pickle_only_hub_adapter_is_refused_before_any_download(
    fake_hub: FakeHub, chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter, _ = save_adapter("llama", chdir_tmp / "made", r=2, target_modules=["q_proj"])
    marker = chdir_tmp / "unpickled"
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"w": _Marker(marker)}))
    fake_hub.add_model("org/base", base)
    fake_hub.add_model("org/adapter", adapter)
    recipe = write_recipe(chdir_tmp / "r.yaml", ["org/base+org/adapter", "org/base"])
    err = fails(["run", str(recipe)], capsys)
    assert "Adapter org/adapter (on base org/base): it has only pickle weights" in err
    assert fake_hub.weight_bytes_served == 0
    assert not marker.exists()
    assert not (chdir_tmp / "merged").exists()


@pytest.mark.slow
def test_hub_adapters_serve_as_routed_experts_and_in_whole_model_commands(
    fake_hub: FakeHub, chdir_tmp: Path
) -> None:
    """Experts pinned on the Hub as {base, adapter}; `evaluate` downloads a Hub adapter too."""
    from hfmerge import api
    from hfmerge.lm.load import load_lm
    from hfmerge.pipeline.options import RunOptions
    from hfmerge.pipeline.run import run_recipe
    from hfmerge.recipe.schema import parse_recipe
    from hfmerge.routing import RoutedModel, read_manifest
    from tests.support.lm import char_tokenizer
    from tests.support.routing import NAMES, digit_texts, letter_texts

    lora: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj"]}
    local = {}
    for index, name in enumerate(NAMES):
        base, local[name], _ = save_adapter("llama", chdir_tmp / name, adapter_seed=index, **lora)
        char_tokenizer("llama").save_pretrained(base)
        fake_hub.add_model(f"org/{name}", local[name])
    base_sha = fake_hub.add_model("org/base", base)
    texts = [chdir_tmp / f"{name}.txt" for name in NAMES]
    for path, make in zip(texts, (digit_texts, letter_texts), strict=True):
        path.write_text("\n".join(make(20)) + "\n", encoding="utf-8")
    recipe = {
        "models": [f"org/base+org/{name}" for name in NAMES],
        "base": "org/base",
        "probe": {"samples": 24, "max_length": 32},
        "route": {"experts": [{"data": str(p)} for p in texts], "bundle": False},
        "output": {"path": "routed"},
    }
    run_recipe(parse_recipe(recipe), RunOptions(progress=False))
    manifest = read_manifest(chdir_tmp / "routed")
    assert {(e.location.repo_id, e.location.revision) for e in manifest.experts} == {
        ("org/base", base_sha)
    }
    assert [e.adapter.repo_id if e.adapter else None for e in manifest.experts] == [
        f"org/{n}" for n in NAMES
    ]
    card = (chdir_tmp / "routed" / "README.md").read_text(encoding="utf-8")
    assert "[`org/base`]" in card  # the base and the adapter, each linked at its commit
    assert "[`org/digits`]" in card
    assert "`org/base+org/letters`" in card
    model = RoutedModel.from_pretrained(chdir_tmp / "routed", device_map="cpu")
    inputs = digit_texts(2, seed=5) + letter_texts(2, seed=6)
    batch = model.tokenizer(inputs, return_tensors="pt", padding=True)
    out = model(batch["input_ids"], batch["attention_mask"])
    assert out.experts.tolist() == [0, 0, 1, 1]
    for index, name in enumerate(NAMES):
        expert = load_lm(base, label=name, adapter=local[name])  # the local copies
        rows = out.experts == index
        with torch.no_grad():
            ids, mask = batch["input_ids"][rows], batch["attention_mask"][rows]
            expected = expert(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(out.logits[rows], expected, rtol=0, atol=1e-5), name
    hub, here = "org/base+org/digits", f"{base}+{local['digits']}"
    report = api.evaluate([hub, here], samples=2, progress=False)
    assert report.result(hub).loss == pytest.approx(report.result(here).loss, rel=1e-6)

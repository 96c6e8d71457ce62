"""LoRA adapters on the (loopback) Hub: checked from their config and header before any weight
is downloaded, applied on read, and pinned in the saved recipe."""

from __future__ import annotations

import pickle
from pathlib import Path

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

"""Hostile LoRA adapters: each is refused before anything is written, by an error that names
the adapter, the problem and the fix; a pickle is never loaded."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hfmerge.cli.app import main
from tests.adversarial.cli_failures import fails, one_line
from tests.adversarial.test_no_pickle_no_remote_code import _Marker
from tests.support.lora import save_adapter
from tests.support.tiny_models import make_tiny_model

LORA: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny llama base and a PEFT adapter on it."""
    base, adapter, _ = save_adapter("llama", tmp_path / "pair", **LORA)
    return base, adapter


def recipe(tmp_path: Path, base: Path, adapter: Path) -> str:
    path = tmp_path / "recipe.yaml"
    data = {
        "models": [f"{base}+{adapter}", str(base)],
        "merge": {"method": "linear"},
        "output": {"path": str(tmp_path / "out")},
    }
    path.write_text(yaml.safe_dump(data))
    return str(path)


def refused(tmp_path: Path, base: Path, adapter: Path, capsys: pytest.CaptureFixture[str]) -> str:
    err = fails(["run", recipe(tmp_path, base, adapter)], capsys)
    assert f"Adapter {adapter}" in err
    assert not (tmp_path / "out").exists()
    return err


def test_an_adapter_for_another_base_is_refused_by_shape(
    tmp_path: Path, pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, adapter = pair
    other = tmp_path / "other"
    make_tiny_model("llama", seed=0, hidden_size=32, num_attention_heads=4).save_pretrained(other)
    err = refused(tmp_path, other, adapter, capsys)
    assert "does not fit the base's model.layers.0.self_attn.q_proj.weight [32, 32]" in err
    assert "base it was trained on" in err


def test_dora_and_other_peft_types_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter, _ = save_adapter("llama", tmp_path / "dora", use_dora=True, **LORA)
    err = refused(tmp_path, base, adapter, capsys)
    assert "DoRA (`use_dora`)" in err
    assert "merge_and_unload" in err
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    assert "peft_type is 'IA3'" in refused(tmp_path, base, adapter, capsys)


def test_an_adapter_without_its_config_is_refused(
    tmp_path: Path, pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter = pair
    (adapter / "adapter_config.json").unlink()
    err = refused(tmp_path, base, adapter, capsys)
    assert "has no adapter_config.json" in err
    assert "PeftModel.save_pretrained" in err


def test_a_config_that_lies_about_the_rank_is_refused(
    tmp_path: Path, pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter = pair
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["rank_pattern"] = {"v_proj": 2}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    err = refused(tmp_path, base, adapter, capsys)
    assert "module model.layers.0.self_attn.v_proj has rank 4 in its weights but 2" in err


def test_a_header_that_promises_more_bytes_than_the_file_holds_is_refused(
    tmp_path: Path, pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter = pair
    data = (adapter / WEIGHTS).read_bytes()
    (adapter / WEIGHTS).write_bytes(data[:-64])  # the header still lists the cut bytes
    err = fails(["run", recipe(tmp_path, base, adapter)], capsys)
    assert WEIGHTS in err
    assert not (tmp_path / "out").exists()


def test_a_pickle_only_adapter_is_refused_and_never_loaded(
    tmp_path: Path, pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter = pair
    marker = tmp_path / "unpickled"
    (adapter / WEIGHTS).unlink()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"w": _Marker(marker)}))
    err = refused(tmp_path, base, adapter, capsys)
    assert "only pickle weights (adapter_model.bin)" in err
    assert "safe_serialization=True" in err
    assert not marker.exists()


def test_nan_in_an_adapter_stops_the_merge_naming_the_adapted_model(
    tmp_path: Path, pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter = pair
    tensors = load_file(adapter / WEIGHTS)
    name = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[name][2, 1] = float("nan")
    save_file(tensors, adapter / WEIGHTS)
    capsys.readouterr()
    assert main(["run", recipe(tmp_path, base, adapter)]) == 1  # found while merging: after a bar
    err = one_line(capsys.readouterr().err)
    wanted = f"error: Model {base}+{adapter}: tensor model.layers.1.self_attn.v_proj.weight holds"
    assert wanted in err
    assert "Fix: " in err
    assert not (tmp_path / "out").exists()


def test_a_base_other_than_the_one_named_is_a_warning_when_the_shapes_fit(
    tmp_path: Path, pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter = pair
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/some-other-base"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["run", recipe(tmp_path, base, adapter)]) == 0
    err = one_line(capsys.readouterr().err)
    assert "warning: adapter" in err
    assert "names org/some-other-base as its base" in err
    assert torch.isfinite(load_file(tmp_path / "out" / "model.safetensors")["lm_head.weight"]).all()

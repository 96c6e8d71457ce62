"""Shared by the LoRA tests: tiny bases with PEFT adapters saved beside them, the merged model
PEFT makes of the pair, and a recipe that reads the pair through hfmerge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from hfmerge.pipeline.options import RunOptions
from hfmerge.pipeline.run import run_recipe
from hfmerge.recipe.schema import parse_recipe
from tests.support.tiny_models import make_tiny_model
from tests.support.weights import read_weights


def save_adapter(
    kind: str, root: Path, *, seed: int = 0, adapter_seed: int | None = None, **lora: Any
) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A tiny `kind` base (from `seed`) and a PEFT LoRA adapter on it (random non-zero A and B,
    from `adapter_seed`, default `seed + 1`), saved under `root`; with the tensors of PEFT's own
    merge of the two (`merge_and_unload`)."""
    base_dir, adapter_dir = root / "base", root / "adapter"
    make_tiny_model(kind, seed=seed).save_pretrained(base_dir)
    torch.manual_seed(seed + 1 if adapter_seed is None else adapter_seed)
    config = LoraConfig(init_lora_weights=False, **lora)
    peft_model = get_peft_model(make_tiny_model(kind, seed=seed), config)
    with torch.no_grad():  # every trained part non-zero and unlike the base
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.normal_(0.0, 0.1)
    peft_model.save_pretrained(str(adapter_dir))
    reloaded = PeftModel.from_pretrained(make_tiny_model(kind, seed=seed), adapter_dir)
    merged = reloaded.merge_and_unload()
    return base_dir, adapter_dir, {k: v.detach().clone() for k, v in merged.state_dict().items()}


def merge_adapter(
    base: Path, adapter: Path, out: Path, *, spelling: str = "plus"
) -> dict[str, torch.Tensor]:
    """`BASE+ADAPTER` (or `{model: BASE, lora: ADAPTER}`) through a linear merge that keeps it
    alone (weight 1 against the bare base at weight 0), read back."""
    adapted: Any = (
        f"{base}+{adapter}" if spelling == "plus" else {"model": str(base), "lora": str(adapter)}
    )
    if isinstance(adapted, str):
        adapted = {"model": adapted}
    data = {
        "models": [{**adapted, "weight": 1.0}, {"model": str(base), "weight": 0.0}],
        "merge": {"method": "linear"},
        "output": {"path": str(out), "dtype": "float32"},
    }
    run_recipe(parse_recipe(data), RunOptions(force=True, progress=False))
    return read_weights(out)


def save_peft_merged(base: Path, adapter: Path, out: Path) -> Path:
    """PEFT's own merge of `base` and `adapter` (`merge_and_unload`), saved into `out` with the
    base's tokenizer files: the model a whole-model step over `BASE+ADAPTER` must equal."""
    from transformers import AutoModelForCausalLM

    from hfmerge.tensors import copy_side_files

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    model.merge_and_unload().save_pretrained(out)
    copy_side_files(base, out)
    return out

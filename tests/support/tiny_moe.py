"""Tiny random mixture-of-experts models (Mixtral, Qwen3-MoE) in their checkpoint form, for tests.

transformers 5 holds each block's experts fused in memory (`mlp.experts.gate_up_proj`, [experts,
2 * inner, hidden]) but saves and loads them as separate tensors per expert
(`experts.{e}.w1.weight`), the names hfmerge's specs describe. So these helpers go through
`save_pretrained` / `from_pretrained` rather than `state_dict()` / `load_state_dict()`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from hfmerge.arch import spec_for
from hfmerge.arch.spec import ArchSpec
from tests.support.tiny_models import exact_float64_norms, make_tiny_model

MOE_KINDS = ("mixtral", "qwen3_moe")
CHECKPOINT = "model.safetensors"


def save_moe_model(kind: str, path: Path, **kw: Any) -> Path:
    """`make_tiny_model(kind, **kw)` saved with save_pretrained (per-expert tensors)."""
    make_tiny_model(kind, **kw).save_pretrained(path)
    return path


def checkpoint_of(path: Path) -> tuple[dict[str, torch.Tensor], ArchSpec]:
    """A saved model's tensors as its checkpoint names them, and their spec."""
    config = json.loads((path / "config.json").read_text())
    state = load_file(str(path / CHECKPOINT))
    return state, spec_for(config, state.keys())


def write_checkpoint(source: Path, state: dict[str, torch.Tensor], out: Path) -> Path:
    """`state` saved as a model folder with `source`'s config.json."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text((source / "config.json").read_text())
    save_file({n: t.contiguous() for n, t in state.items()}, str(out / CHECKPOINT))
    return out


def load_moe_model(path: Path) -> PreTrainedModel:
    """A saved tiny MoE model in float64, eval mode, eager attention, exact RMSNorms."""
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float64, attn_implementation="eager", experts_implementation="eager"
    )
    module: torch.nn.Module = model
    module.eval()
    return exact_float64_norms(model)

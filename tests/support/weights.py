"""Reading a saved checkpoint back in tests: every tensor of a folder, by safetensors itself."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every `*.safetensors` file in `folder` (one file or shards)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors

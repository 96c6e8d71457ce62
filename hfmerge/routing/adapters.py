"""LoRA adapters as routed experts: the low-rank factors held in memory, applied to a shared base
by forward hooks while one expert runs.

A hook adds `scale · x·Aᵀ·Bᵀ` to a module's output: for a linear layer (`x·Wᵀ`) and for a GPT-2
Conv1D (`x·W` with W stored [in, out]) alike, that is the output of `W + scale·B·A` in the layout
the adapter lands in; for an embedding, rows `Aᵀ[ids]·Bᵀ`. The base's weights are never written,
so one base serves every adapter on it, and memory grows by the factors only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hfmerge.errors import RoutingError
from hfmerge.lora import ADAPTER_WEIGHTS
from hfmerge.sources.inspection import inspect_downloaded
from hfmerge.sources.refs import ModelSource
from hfmerge.tensors import LazyCheckpoint, file_index


@dataclass(frozen=True)
class LowRankFactors:
    """One module's factors: its output gains `scale · x·Aᵀ·Bᵀ` (rows of Aᵀ for an embedding)."""

    module: str  # the module's name in the loaded causal LM
    a: torch.Tensor  # [r, in] (an embedding's: [r, num_embeddings])
    b: torch.Tensor  # [out, r]
    scale: float
    # Copies on the devices the module ran on, made once rather than on every call.
    placed: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) on `device`."""
        if device not in self.placed:
            self.placed[device] = (self.a.to(device), self.b.to(device))
        return self.placed[device]


@dataclass(frozen=True)
class ExpertAdapter:
    """An expert's LoRA adapter, as factors to hook onto its base."""

    name: str
    factors: tuple[LowRankFactors, ...]

    @property
    def numel(self) -> int:
        """Elements held: every A and B."""
        return sum(f.a.numel() + f.b.numel() for f in self.factors)

    @contextmanager
    def active(self, model: nn.Module) -> Iterator[nn.Module]:
        """`model` with this adapter applied while the block runs; its hooks removed after."""
        with ExitStack() as stack:
            for factors in self.factors:
                module = model.get_submodule(factors.module)
                handle = module.register_forward_hook(_hook(factors, module))
                stack.callback(handle.remove)
            yield model


def read_expert_adapter(name: str, base: Path, adapter: Path) -> ExpertAdapter:
    """The adapter in folder `adapter`, checked against the base folder `base` (from headers),
    as factors in float32.

    Raises:
        AdapterError: the adapter does not fit the base.
        RoutingError: it replaces whole tensors with other values (`modules_to_save`), which no
            hook adds.
    """
    source = ModelSource(ref=name, path=base, adapter=ModelSource(ref=str(adapter), path=adapter))
    inspected = inspect_downloaded(source)
    assert inspected.adapter is not None  # the source has one
    layout = inspected.adapter.layout
    weights = adapter / ADAPTER_WEIGHTS
    with (
        LazyCheckpoint(adapter, index=file_index(weights, label=str(adapter))) as reader,
        LazyCheckpoint(base) as base_reader,
    ):
        changed = [  # PEFT saves an adapted embedding's base whole too: unchanged, nothing to do
            target
            for target, saved in layout.replaced.items()
            if not torch.equal(reader.get(saved), base_reader.get(target))
        ]
        if changed:
            raise RoutingError(
                f"expert {name}'s adapter replaces whole tensors ({', '.join(changed[:5])})",
                why="a routed adapter is applied as low-rank factors beside the shared base",
                fix="save the adapter without modules_to_save, or merge it into its base and "
                "route the merged model",
            )
        factors = tuple(
            LowRankFactors(
                delta.tensor.removesuffix(".weight"),
                reader.get(delta.a).to(torch.float32),
                reader.get(delta.b).to(torch.float32),
                delta.scale,
            )
            for delta in layout.deltas.values()
        )
    return ExpertAdapter(name, factors)


def _hook(factors: LowRankFactors, module: nn.Module) -> Any:
    """The forward hook adding the factors' product to `module`'s output."""
    embedding = isinstance(module, nn.Embedding)

    def add_delta(_: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        a, b = factors.on(output.device)
        x = inputs[0]
        if embedding:
            low = nn.functional.embedding(x, a.T)  # [..., r]: rows of Aᵀ
        else:
            low = nn.functional.linear(x.to(torch.float32), a)  # [..., r]
        delta = nn.functional.linear(low, b).mul_(factors.scale)  # [..., out]
        return output + delta.to(output.dtype)

    return add_delta


__all__ = ["ExpertAdapter", "LowRankFactors", "read_expert_adapter"]

"""Experts loaded on demand with accelerate device maps, kept in an LRU within a memory budget.

Sizes come from safetensors headers before anything loads. When the budget (an explicit byte
count, or the sum of `max_memory`) cannot hold one more expert, the least recently used ones are
dropped first. Callers must not keep references to pooled models beyond one call, or an evicted
expert's memory stays alive.
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from hfmerge.errors import RoutingError
from hfmerge.lm.load import (
    Completeness,
    load_pretrained,
    load_probe_model,
)
from hfmerge.lm.placement import DeviceMap, MaxMemory
from hfmerge.routing.manifest import AUTO_DTYPE
from hfmerge.tensors import parse_size, read_checkpoint_index, torch_dtype


@dataclass(frozen=True)
class PooledModel:
    """One model the pool can load: a causal LM expert, or a headless router backbone."""

    name: str
    path: Path
    dtype: str = AUTO_DTYPE  # torch name, or `auto` (as stored)
    head: bool = True  # False: the base model only (AutoModel), for a separate backbone
    pinned: bool = False  # never evicted (the separate backbone runs on every batch)


_FLOAT_PREFIXES = ("F", "BF")  # safetensors float dtype names: F16, F32, BF16, F8_E4M3, ...


def load_dtype(model: PooledModel) -> torch.dtype:
    """The dtype to load `model` in; `auto` is the float dtype holding most of its weights."""
    if model.dtype != AUTO_DTYPE:
        return getattr(torch, model.dtype)  # type: ignore[no-any-return]
    bytes_by_dtype: dict[str, int] = {}
    for info in read_checkpoint_index(model.path, label=model.name):
        if info.dtype.startswith(_FLOAT_PREFIXES):
            bytes_by_dtype[info.dtype] = bytes_by_dtype.get(info.dtype, 0) + info.nbytes
    if not bytes_by_dtype:
        return torch.float32
    return torch_dtype(max(bytes_by_dtype, key=lambda name: bytes_by_dtype[name]))


def estimate_bytes(model: PooledModel) -> int:
    """Weight bytes once loaded, from the safetensors headers (float tensors at `dtype`)."""
    size = load_dtype(model).itemsize
    return sum(
        info.numel * size if info.dtype.startswith(_FLOAT_PREFIXES) else info.nbytes
        for info in read_checkpoint_index(model.path, label=model.name)
    )


def budget_of(max_memory: MaxMemory | None, budget_bytes: int | None) -> int | None:
    """The explicit budget, else the sum of `max_memory`'s limits, else none."""
    if budget_bytes is not None:
        return budget_bytes
    if not max_memory:
        return None
    try:
        return sum(parse_size(limit) for limit in max_memory.values())
    except ValueError as exc:
        raise RoutingError(
            f"max_memory {max_memory} cannot be read ({exc})",
            fix="write limits like {0: '20GiB', 'cpu': '60GiB'}",
        ) from None


def load_causal_lm(
    path: Path,
    *,
    label: str,
    dtype: torch.dtype,
    device_map: DeviceMap | None,
    max_memory: MaxMemory | None,
    adapter: Path | None = None,
) -> PreTrainedModel:
    """A causal LM placed by accelerate (`device_map`), eval mode, with its LoRA `adapter` folder
    applied; missing weights are an error."""
    from transformers import AutoModelForCausalLM

    return load_pretrained(
        AutoModelForCausalLM,
        path,
        label=label,
        dtype=dtype,
        device_map=device_map,
        max_memory=max_memory,
        complete=Completeness("its LM head", "route between complete checkpoints with LM heads"),
        adapter=adapter,
    )


class ExpertPool:
    """Loads pooled models lazily and keeps the most recently used ones within the budget."""

    def __init__(
        self,
        models: Sequence[PooledModel],
        *,
        device_map: DeviceMap | None = "auto",
        max_memory: MaxMemory | None = None,
        budget_bytes: int | None = None,
    ) -> None:
        self.models = {model.name: model for model in models}
        self.device_map = device_map
        self.max_memory = max_memory
        self.budget = budget_of(max_memory, budget_bytes)
        self.sizes = {model.name: estimate_bytes(model) for model in models}
        self._check_budget()
        self._loaded: OrderedDict[str, PreTrainedModel] = OrderedDict()  # oldest use first
        self.device_maps: dict[str, dict[str, Any]] = {}  # each model's latest hf_device_map
        self.loads: list[str] = []  # every load in order (evictions make names repeat)
        self.peak_bytes = 0

    def _check_budget(self) -> None:
        if self.budget is None:
            return
        pinned = sum(self.sizes[n] for n, m in self.models.items() if m.pinned)
        largest = max((self.sizes[n] for n, m in self.models.items() if not m.pinned), default=0)
        if pinned + largest > self.budget:
            beside = f" beside the router backbone ({pinned:,} bytes)" if pinned else ""
            raise RoutingError(
                f"the memory budget ({self.budget:,} bytes) cannot hold the largest expert "
                f"({largest:,} bytes){beside}",
                fix="raise max_memory (or memory_budget), or load the experts in a smaller dtype",
            )

    @property
    def loaded(self) -> tuple[str, ...]:
        """Names of the models in memory, least recently used first."""
        return tuple(self._loaded)

    @property
    def resident_bytes(self) -> int:
        """Estimated bytes of the models in memory."""
        return sum(self.sizes[name] for name in self._loaded)

    def get(self, name: str) -> PreTrainedModel:
        """Model `name`, loading it (and evicting least recently used ones) when needed."""
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return self._loaded[name]
        if name not in self.models:
            raise KeyError(f"{name!r} is not in the pool ({', '.join(self.models)})")
        self._make_room(self.sizes[name])
        model = self._load(self.models[name])
        self._loaded[name] = model
        self.loads.append(name)
        self.device_maps[name] = dict(getattr(model, "hf_device_map", None) or {"": "cpu"})
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes)
        return model

    def evict(self, name: str) -> None:
        """Drop model `name` and free its memory (if nothing else holds it)."""
        if self._loaded.pop(name, None) is not None:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def clear(self) -> None:
        """Drop every model."""
        for name in list(self._loaded):
            self.evict(name)

    def _make_room(self, needed: int) -> None:
        if self.budget is None:
            return
        for name in [n for n in self._loaded if not self.models[n].pinned]:  # LRU order
            if self.resident_bytes + needed <= self.budget:
                return
            self.evict(name)

    def _load(self, entry: PooledModel) -> PreTrainedModel:
        limits, dtype = self._remaining_memory(), load_dtype(entry)
        if not entry.head:
            return load_probe_model(
                entry.path,
                label=entry.name,
                device_map=self.device_map,
                max_memory=limits,
                dtype=dtype,
            )
        return load_causal_lm(
            entry.path, label=entry.name, dtype=dtype, device_map=self.device_map, max_memory=limits
        )

    def _remaining_memory(self) -> MaxMemory | None:
        """`max_memory` less what the loaded models occupy on each device, so accelerate packs
        the next expert beside them instead of over them."""
        if not self.max_memory:
            return None
        used: dict[int | str, int] = {}
        for model in self._loaded.values():
            for tensor in [*model.parameters(), *model.buffers()]:
                key = _memory_key(tensor.device)
                if key is not None:
                    used[key] = used.get(key, 0) + tensor.numel() * tensor.element_size()
        return {
            device: _size_text(max(0, parse_size(limit) - used.get(device, 0)))
            for device, limit in self.max_memory.items()
        }


def _size_text(count: int) -> str:
    """Bytes as a size string accelerate reads exactly (it takes no plain-digit strings)."""
    return f"{count / 1000:.3f}KB"


def _memory_key(device: torch.device) -> int | str | None:
    """The `max_memory` key, as accelerate names devices, of a tensor's device (None: meta/disk,
    not in memory)."""
    if device.type == "cuda":
        return device.index or 0
    if device.type in ("cpu", "mps", "xpu"):
        return device.type if device.index is None else f"{device.type}:{device.index}"
    return None


__all__ = [
    "ExpertPool",
    "PooledModel",
    "budget_of",
    "estimate_bytes",
    "load_causal_lm",
    "load_dtype",
]

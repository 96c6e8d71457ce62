"""Where probed models go: accelerate device maps, per-device limits, a plan for one host budget.

`--max-memory` takes either per-device limits (`0=20GiB,cpu=60GiB`, handed to accelerate as they
are) or one size (`4GB`): a budget for the whole command's host memory. With one size, the plan
loads both models together when they fit, else one at a time, and offloads to disk the layers of a
model that do not fit beside the statistics the command keeps.
"""

# The budget counts what stays in the process, estimated before anything loads:
# - the interpreter with torch and transformers imported (`BASE_BYTES`, about 0.4 GB measured);
# - the largest shard file: transformers memory-maps a shard while loading it, and the pages it
#   touches count as resident until it is done with that shard (loading a 1.1B model with 1 GiB on
#   the CPU peaks 2.3 GB above that 1 GiB, from its 2.0 GB first shard);
# - the layers kept in memory, float32 (the CPU share handed to accelerate), and with layers on
#   disk, room for two of the largest tensors in flight (converted while loading, materialised
#   while running);
# - the caller's own working memory: activations of one batch, the statistics, and, one model at a
#   time, the first model's samples kept until the second runs.

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hfmerge.errors import HfMergeError, OptionError
from hfmerge.tensors import read_checkpoint_index
from hfmerge.tensors.shards import format_size, parse_size

DeviceMap = str | dict[str, int | str]
MaxMemory = dict[int | str, str]
MemoryLimit = int | MaxMemory  # one host budget in bytes, or accelerate's per-device limits

BASE_BYTES = 512 * 2**20
PROBE_BYTES_PER_PARAM = 4  # probed models load in float32
LAYER_HEADROOM = 2  # an offloaded layer is materialised while it runs: keep room for two

_NAMED_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_MAP_FIX = (
    "use auto, balanced, sequential, cpu, a device such as cuda:0, or a JSON mapping of "
    'module names to devices such as \'{"": "cpu"}\''
)


def parse_device_map(text: str) -> DeviceMap:
    """`--device-map`: a named strategy, one device for everything, or a JSON module -> device map.

    Raises:
        OptionError: an unknown strategy or device, or a malformed JSON map.
    """
    text = text.strip()
    if text.startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OptionError(
                "--device-map", text, f"is not valid JSON ({exc.msg})", fix=_MAP_FIX
            ) from None
        if not isinstance(mapping, dict) or not all(
            isinstance(v, int | str) for v in mapping.values()
        ):
            raise OptionError(
                "--device-map", text, "must map module names to devices", fix=_MAP_FIX
            )
        return mapping
    if text in _NAMED_MAPS:
        return text
    try:
        torch.device(text)
    except RuntimeError:
        raise OptionError(
            "--device-map", text, "is neither a strategy nor a device", fix=_MAP_FIX
        ) from None
    return text


def parse_max_memory(text: str) -> MaxMemory:
    """`0=20GiB,cpu=60GiB` -> {0: "20GiB", "cpu": "60GiB"} (accelerate's `max_memory`).

    Raises:
        OptionError: an entry without `=`.
    """
    limits: MaxMemory = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        device, sep, size = entry.partition("=")
        if not sep or not device.strip() or not size.strip():
            raise OptionError(
                "--max-memory",
                text,
                f"entry {entry!r} is not DEVICE=SIZE",
                fix="write it like `0=20GiB,cpu=60GiB`, or give one size such as `4GB`",
            )
        key = device.strip()
        limits[int(key) if key.isdigit() else key] = size.strip()
    return limits


def parse_memory_limit(text: str) -> MemoryLimit:
    """`--max-memory` of a probing command: one size (`4GB`, a host budget in bytes) or
    per-device limits (`0=20GiB,cpu=60GiB`).

    Raises:
        OptionError: neither form.
    """
    if "=" in text:
        return parse_max_memory(text)
    try:
        return parse_size(text.strip())
    except ValueError as exc:
        raise OptionError(
            "--max-memory",
            text,
            "is neither a size nor DEVICE=SIZE limits",
            why=str(exc),
            fix="give one size such as `4GB`, or per-device limits like `0=20GiB,cpu=60GiB`",
        ) from None


def split_limit(limit: MemoryLimit | None) -> tuple[int | None, MaxMemory | None]:
    """`--max-memory` as (a host budget in bytes, accelerate's per-device limits): one is None."""
    if isinstance(limit, int):
        return limit, None
    return None, limit


def limit_setting(limit: MemoryLimit | None) -> str | dict[str, str]:
    """How a report records `--max-memory`: the size as given in bytes, or the per-device map."""
    if isinstance(limit, int):
        return f"{limit / 1e9:g} GB"
    return {str(k): v for k, v in (limit or {}).items()}


@dataclass(frozen=True)
class Footprint:
    """What loading one model for probing holds, from its safetensors headers alone."""

    weights: int  # bytes in float32
    largest_shard: int  # bytes of its largest shard file
    largest_tensor: int  # bytes in float32; an offloaded layer holds a few of these at a time

    @classmethod
    def of(cls, path: Path, *, label: str) -> Footprint:
        """The footprint of the checkpoint in `path`."""
        index = read_checkpoint_index(path, label=label)
        numels = [info.numel for info in index]
        return cls(
            weights=PROBE_BYTES_PER_PARAM * sum(numels),
            largest_shard=max(os.path.getsize(path / shard) for shard in index.shards),
            largest_tensor=PROBE_BYTES_PER_PARAM * max(numels),
        )


@dataclass(frozen=True)
class ProbePlacement:
    """How a probing command places its two models."""

    device_map: DeviceMap | None
    max_memory: MaxMemory | None  # per model, for accelerate
    one_at_a_time: bool = False  # load, run and free A before B loads
    offload: bool = False  # some layers may go to a temporary folder on disk
    peak_bytes: int | None = None  # the plan's estimate of the command's host memory at peak

    def describe(self) -> str:
        """`together`, `one at a time` or `one at a time, with disk offload` (reports, JSON)."""
        if not self.one_at_a_time:
            return "together"
        return "one at a time, with disk offload" if self.offload else "one at a time"

    def announce(self, task: str, *, budget: int, seconds: float | None = None) -> None:
        """Say the plan before the work starts: where the models go, the memory it expects and,
        when given, how long the forward passes should take (`lm.probe_time`)."""
        from hfmerge.progress import format_duration, say

        peak = (
            f"about {format_size(self.peak_bytes)} at peak, " if self.peak_bytes is not None else ""
        )
        time = "" if seconds is None else f"; the forward passes about {format_duration(seconds)}"
        say(
            f"{task}: models {self.describe()}; {peak}within --max-memory {format_size(budget)}"
            f"{time}"
        )


def check_budget_map(device_map: DeviceMap | None) -> None:
    """Refuse a device or a JSON map beside one `--max-memory` size (`OptionError`): a budget
    plans the map itself, from a strategy such as `auto`."""
    if device_map is None or device_map in _NAMED_MAPS:
        return
    raise OptionError(
        "--device-map",
        json.dumps(device_map) if isinstance(device_map, dict) else device_map,
        "cannot be combined with a single --max-memory size",
        why="one size is a budget from which hfmerge plans where each layer goes",
        fix="drop --device-map (auto), or give per-device limits such as `cpu=4GiB`",
    )


def plan_placement(
    footprints: tuple[Footprint, Footprint],
    *,
    budget: int,
    device_map: DeviceMap | None,
    working: int,
    kept: int,
    paired: int = 0,
    shrink: str = "fewer --samples or a smaller --batch-size",
) -> ProbePlacement:
    """Place two probed models within `budget` bytes of host memory.

    `working`: bytes the caller holds whichever way the models load (activations of a batch,
    statistics); `kept`: bytes it holds in addition when they run one at a time (the first
    model's samples); `paired`: bytes it holds in addition when they run together; `shrink`: how
    the user makes `working` smaller, for the error.

    Raises:
        OptionError: `device_map` names a device or a JSON map: a budget plans the map itself.
        HfMergeError: the budget cannot hold even one model with its layers offloaded to disk.
    """
    check_budget_map(device_map)
    strategy = device_map or "auto"
    fixed = BASE_BYTES + max(f.largest_shard for f in footprints) + working
    # Whole models need no limit: accelerate would place them as they are. A limit would apply
    # to each model alone, not to the two together.
    together = fixed + paired + sum(f.weights for f in footprints)
    if together <= budget:
        return ProbePlacement(strategy, None, peak_bytes=together)
    share = budget - fixed - kept
    if share >= max(f.weights for f in footprints):
        alone = fixed + kept + max(f.weights for f in footprints)
        return ProbePlacement(strategy, None, one_at_a_time=True, peak_bytes=alone)
    least = LAYER_HEADROOM * max(f.largest_tensor for f in footprints)
    if share < least:
        raise HfMergeError(
            f"--max-memory {_gib(budget)} cannot hold the probe of even one model",
            why=f"the interpreter, the largest shard while it loads, {_gib(working + kept)} of "
            f"activations and statistics, and room for one layer need {_gib(fixed + kept + least)}",
            fix=f"give --max-memory {math.ceil((fixed + kept + least) / 1e9)}GB or more, "
            f"or {shrink}",
        )
    # The layers kept in memory leave room for the largest tensors in flight: loading converts
    # each to float32 beside the layers already placed, and a run materialises offloaded ones.
    return ProbePlacement(
        strategy, _cpu(share - least), one_at_a_time=True, offload=True, peak_bytes=budget
    )


def forward_bytes(configs: Sequence[Any], *, batch_size: int, length: int) -> int:
    """float32 bytes one forward pass of the largest of these models holds at most: every
    hidden state (they are all returned), a block's FF activations and its attention scores."""
    sizes = []
    for config in configs:
        hidden = int(config.hidden_size)
        inner = int(getattr(config, "intermediate_size", None) or 4 * hidden)
        heads = int(getattr(config, "num_attention_heads", None) or 1)
        per_token = hidden * (int(config.num_hidden_layers) + 1) + 3 * inner + 2 * heads * length
        sizes.append(PROBE_BYTES_PER_PARAM * batch_size * length * per_token)
    return max(sizes)


def _cpu(share: int) -> MaxMemory:
    return {"cpu": f"{share // 2**20}MiB"}


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


__all__ = [
    "BASE_BYTES",
    "DeviceMap",
    "Footprint",
    "MaxMemory",
    "MemoryLimit",
    "ProbePlacement",
    "check_budget_map",
    "forward_bytes",
    "limit_setting",
    "parse_device_map",
    "parse_max_memory",
    "parse_memory_limit",
    "plan_placement",
    "split_limit",
]

"""How long a probing command's forward passes take, estimated before any model loads.

A pass of one model over the probe is its float32 products (twice its matrix parameters per token
computed, padding included, plus the attention scores and their weighted sum) and, when layers are
offloaded to disk, reading and converting those layers again for every batch. Both rates are
measured on the spot: one float32 product shaped like a block's FF projection over one batch, and
one read of the checkpoint's largest tensor converted to float32 (from the page cache when the
file was read recently, as it is after a download or a merge).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hfmerge.lm.placement import PROBE_BYTES_PER_PARAM, Footprint, ProbePlacement
from hfmerge.runtime import fastest_seconds
from hfmerge.tensors import LazyCheckpoint, parse_size, read_checkpoint_index

WORTH_ESTIMATING_SECONDS = 10.0  # below this the passes are short: nothing to say


@dataclass(frozen=True)
class ProbeSpeed:
    """This machine's float32 product rate and its rate of reading a layer in from disk."""

    flop_per_second: float
    read_bytes_per_second: float  # float32 bytes produced per second

    @classmethod
    def measure(cls, path: Path, *, label: str, rows: int, hidden: int, inner: int) -> ProbeSpeed:
        """Time a [rows, hidden] x [hidden, inner] float32 product (`fastest_seconds`) and one
        read of the largest tensor in `path`, converted to float32."""
        generator = torch.Generator().manual_seed(0)
        left = torch.randn(rows, hidden, generator=generator)
        right = torch.randn(hidden, inner, generator=generator)
        rate = 2.0 * rows * hidden * inner / fastest_seconds(lambda: torch.mm(left, right))
        largest = max(read_checkpoint_index(path, label=label), key=lambda info: info.numel)
        with LazyCheckpoint(path, label=label) as reader:
            read = fastest_seconds(lambda: reader.get(largest.name).float(), tries=1)
        return cls(rate, PROBE_BYTES_PER_PARAM * largest.numel / read)


@dataclass(frozen=True)
class ProbeText:
    """The size of a probe: tokens computed (padding included), the longest window, batches."""

    tokens: int
    length: int
    batches: int

    @classmethod
    def of(cls, batches: Sequence[Mapping[str, torch.Tensor]]) -> ProbeText:
        """The size of tokenized `batches` (each with `input_ids` [windows, length])."""
        ids = [batch["input_ids"] for batch in batches]
        return cls(
            tokens=sum(int(i.numel()) for i in ids),
            length=max((int(i.shape[-1]) for i in ids), default=0),
            batches=len(ids),
        )


@dataclass(frozen=True)
class ProbeWork:
    """One model's pass over the probe."""

    flop: float
    batches: int
    offloaded_bytes: int  # float32 bytes read in again for every batch

    @classmethod
    def of(
        cls, path: Path, config: Any, text: ProbeText, placement: ProbePlacement, *, label: str
    ) -> ProbeWork:
        """The pass of the model in `path` (its transformers `config`) over `text`, as placed."""
        footprint = Footprint.of(path, label=label)
        hidden, layers = int(config.hidden_size), int(config.num_hidden_layers)
        embedding = int(getattr(config, "vocab_size", 0) or 0) * hidden  # looked up, not multiplied
        matrices = max(0, footprint.weights // PROBE_BYTES_PER_PARAM - embedding)
        # The products with the weights, then per layer the scores and their weighted sum.
        flop = 2.0 * matrices * text.tokens + 4.0 * layers * hidden * text.length * text.tokens
        offloaded = 0
        if placement.offload and placement.max_memory:
            kept = parse_size(str(placement.max_memory["cpu"]))
            offloaded = max(0, footprint.weights - kept)
        return cls(flop, text.batches, offloaded)

    def seconds(self, speed: ProbeSpeed) -> float:
        """The pass's time at `speed`."""
        reads = self.batches * self.offloaded_bytes / speed.read_bytes_per_second
        return self.flop / speed.flop_per_second + reads


def probe_seconds(
    path: Path, text: ProbeText, placement: ProbePlacement, *, label: str, passes: int
) -> float | None:
    """The time of `passes` passes of models shaped like the one in `path` over `text`, as
    placed; None when there is nothing to probe or it would be too short to be worth saying."""
    from hfmerge.lm.load import load_config

    if not text.tokens:
        return None
    config = load_config(path, label=label)
    work = ProbeWork.of(path, config, text, placement, label=label)
    hidden = int(config.hidden_size)
    inner = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    rows = max(1, text.tokens // text.batches)
    speed = ProbeSpeed.measure(path, label=label, rows=rows, hidden=hidden, inner=inner)
    seconds = passes * work.seconds(speed)
    return seconds if seconds >= WORTH_ESTIMATING_SECONDS else None


def announce_probe(
    placement: ProbePlacement,
    task: str,
    *,
    budget: int,
    path: Path,
    label: str,
    text: ProbeText,
    passes: int,
) -> None:
    """Say the plan before the work starts (`ProbePlacement.announce`) with the time of
    `passes` passes over `text` of models shaped like the one in `path`."""
    seconds = probe_seconds(path, text, placement, label=label, passes=passes)
    placement.announce(task, budget=budget, seconds=seconds)


__all__ = ["ProbeSpeed", "ProbeText", "ProbeWork", "announce_probe", "probe_seconds"]

"""Plan output shards from names, dtypes and shapes alone: the file and offset of every tensor."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Protocol

from hfmerge.tensors.dtypes import element_size

SINGLE_FILE = "model.safetensors"  # a one-shard checkpoint
INDEX_FILE = "model.safetensors.index.json"  # a sharded checkpoint's tensor -> shard map
_SIZE_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)
# Decimal units as in huggingface_hub / transformers ("2GB" = 2 * 10**9); "GiB" units are binary.
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS.update({"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40})


def format_size(size: int) -> str:
    """A byte count as messages print it: decimal gigabytes, two decimals ("1.41 GB")."""
    return f"{size / 1e9:.2f} GB"


def parse_size(size: int | str) -> int:
    """Bytes in a size such as 2_000_000, "2GB", "500MB", "1.5GiB" or "1024" (1GB = 10**9)."""
    if isinstance(size, bool):
        raise ValueError(f"invalid size {size!r}: give a byte count or a string such as '2GB'")
    value = size if isinstance(size, int) else _parse_size_text(size)
    if value < 1:
        raise ValueError(f"invalid size {size!r}: must be at least 1 byte")
    return value


def _parse_size_text(text: str) -> int:
    match = _SIZE_PATTERN.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: use a number with an optional unit, such as '2GB', '500MB' "
            "or '1.5GiB' (KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024)"
        )
    number, unit = match.group(1), (match.group(2) or "").lower()
    try:
        return int(Decimal(number) * _UNITS[unit])
    except InvalidOperation:  # pragma: no cover - the pattern only lets valid decimals through
        raise ValueError(f"invalid size {text!r}") from None


class TensorLike(Protocol):
    """Anything with a tensor's name, safetensors dtype string and shape (e.g. `TensorInfo`)."""

    @property
    def name(self) -> str:
        """The tensor's name in the checkpoint."""
        ...

    @property
    def dtype(self) -> str:
        """Its safetensors dtype string: `F32`, `BF16`, `I64`, ..."""
        ...

    @property
    def shape(self) -> Sequence[int]:
        """Its shape."""
        ...


@dataclass(frozen=True)
class OutputTensor:
    """A tensor to be written: name, safetensors dtype string ("BF16") and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor's place in its shard: [begin, end) bytes from the start of the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data."""
        return self.end - self.begin


@dataclass(frozen=True)
class PlannedShard:
    """One output file and its tensors in layout order."""

    filename: str
    tensors: tuple[PlannedTensor, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in this shard."""
        return self.tensors[-1].end if self.tensors else 0

    @property
    def names(self) -> tuple[str, ...]:
        """Tensor names in layout order."""
        return tuple(t.name for t in self.tensors)


@dataclass(frozen=True)
class ShardPlan:
    """Every output file and where each tensor goes, fixed before any tensor is computed."""

    shards: tuple[PlannedShard, ...]
    _where: Mapping[str, tuple[PlannedShard, PlannedTensor]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        where = {t.name: (shard, t) for shard in self.shards for t in shard.tensors}
        object.__setattr__(self, "_where", where)

    @property
    def names(self) -> tuple[str, ...]:
        """Planned tensor names, shard by shard in layout order."""
        return tuple(self._where)

    @property
    def filenames(self) -> tuple[str, ...]:
        """Shard file names in order."""
        return tuple(shard.filename for shard in self.shards)

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data over all shards (the index's `total_size`)."""
        return sum(shard.nbytes for shard in self.shards)

    @property
    def total_parameters(self) -> int:
        """Elements over all tensors."""
        return sum(math.prod(t.shape) for _, t in self._where.values())

    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard file name, sorted by tensor name (as transformers writes it)."""
        return {name: self._where[name][0].filename for name in sorted(self._where)}

    def locate(self, name: str) -> tuple[PlannedShard, PlannedTensor]:
        """The shard and place planned for tensor `name`; KeyError if it is not planned."""
        try:
            return self._where[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the shard plan") from None

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)


def plan_shards(tensors: Sequence[TensorLike], *, max_shard_bytes: int) -> ShardPlan:
    """Group `tensors` greedily, in the given order, into shards of at most `max_shard_bytes`.

    A tensor larger than the cap gets a shard of its own. Inside a shard, tensors are laid out by
    decreasing element size (stable), so every tensor starts at a multiple of its element size.
    """
    if isinstance(max_shard_bytes, bool) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be a positive byte count, got {max_shard_bytes!r}")
    checked = [_checked(t) for t in tensors]
    _check_unique(checked)
    groups = _group(checked, max_shard_bytes)
    count = len(groups)
    return ShardPlan(
        tuple(
            PlannedShard(_shard_filename(i, count), _layout(group))
            for i, group in enumerate(groups, start=1)
        )
    )


def _checked(tensor: TensorLike) -> OutputTensor:
    shape = tuple(tensor.shape)
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"tensor {tensor.name!r} has an invalid shape {shape!r}")
    if not tensor.name or tensor.name == "__metadata__":
        raise ValueError(f"invalid tensor name {tensor.name!r}")
    element_size(tensor.dtype)  # raises ValueError on a dtype the writer cannot store
    return OutputTensor(tensor.name, tensor.dtype, shape)


def _check_unique(outputs: list[OutputTensor]) -> None:
    if not outputs:
        raise ValueError("cannot plan shards for zero tensors")
    seen: set[str] = set()
    for tensor in outputs:
        if tensor.name in seen:
            raise ValueError(f"tensor {tensor.name!r} appears twice")
        seen.add(tensor.name)


def _nbytes(tensor: OutputTensor) -> int:
    return math.prod(tensor.shape) * element_size(tensor.dtype)


def _group(outputs: list[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    groups: list[list[OutputTensor]] = [[]]
    used = 0
    for tensor in outputs:
        size = _nbytes(tensor)
        if groups[-1] and used + size > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(tensor)
        used += size
    return groups


def _layout(group: list[OutputTensor]) -> tuple[PlannedTensor, ...]:
    # Every tensor's byte size is a multiple of its element size, so wider dtypes first keeps
    # each tensor aligned, as safetensors' own writer does (mmap readers may need it).
    ordered = sorted(group, key=lambda tensor: -element_size(tensor.dtype))
    planned: list[PlannedTensor] = []
    offset = 0
    for tensor in ordered:
        end = offset + _nbytes(tensor)
        planned.append(PlannedTensor(tensor.name, tensor.dtype, tensor.shape, offset, end))
        offset = end
    return tuple(planned)


def _shard_filename(index: int, count: int) -> str:
    if count == 1:
        return SINGLE_FILE
    return f"model-{index:05d}-of-{count:05d}.safetensors"

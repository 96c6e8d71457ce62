"""Parse one safetensors file's header (8-byte little-endian length + JSON) without reading data."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfmerge.errors import ModelSourceError
from hfmerge.tensors.dtypes import element_size, is_known_dtype, known_dtypes

# safetensors itself refuses headers above 100 MB; a bigger length field means a corrupt file.
MAX_HEADER_BYTES = 100_000_000
_REDOWNLOAD = (
    "download the file again (it may be truncated or not a safetensors file), or re-save the model "
    "with `save_pretrained(..., safe_serialization=True)`"
)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its header describes it; `offset` is its first byte in the shard file."""

    name: str
    dtype: str  # safetensors dtype string: "BF16", "F32", "I64", ...
    shape: tuple[int, ...]
    shard: str  # file name relative to the model directory
    nbytes: int
    offset: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


def read_shard_header(path: Path, shard: str, *, label: str) -> list[TensorInfo]:
    """Every tensor listed in the header of the safetensors file `path`, in file order.

    `shard` is the name recorded in each `TensorInfo`; `label` names the model in errors.
    """
    file_size, raw = _read_raw_header(path, shard, label=label)
    return parse_shard_header(raw, file_size=file_size, shard=shard, label=label)


def header_length(prefix: bytes, *, file_size: int, shard: str, label: str) -> int:
    """The JSON header's byte length from a file's first 8 bytes, checked against its size."""
    if len(prefix) < 8:
        raise _corrupt(label, shard, f"it is only {len(prefix)} bytes long")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES or 8 + length > file_size:
        raise _corrupt(label, shard, f"its header length field ({length}) is impossible")
    return int(length)


def parse_shard_header(raw: bytes, *, file_size: int, shard: str, label: str) -> list[TensorInfo]:
    """Tensors of a shard from its raw JSON header (the bytes after the length field).

    Used for local files and for headers fetched remotely with range requests alike, so both
    get the same validation. `file_size` is the whole file's size in bytes.
    """
    data_start = 8 + len(raw)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(label, shard, f"its header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _corrupt(label, shard, "its header is not a JSON object")
    infos: list[TensorInfo] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = _check_entry(entry, name, label=label, shard=shard)
        infos.append(_make_info(name, entry, shard, begin, end, data_start))
    infos.sort(key=lambda info: info.offset)
    _check_layout(infos, file_size, label=label, shard=shard)
    return infos


def _read_raw_header(path: Path, shard: str, *, label: str) -> tuple[int, bytes]:
    try:
        file_size = path.stat().st_size
        with path.open("rb") as handle:
            length = header_length(handle.read(8), file_size=file_size, shard=shard, label=label)
            raw = handle.read(length)
    except OSError as exc:
        raise ModelSourceError(
            label, f"cannot read {shard}: {exc.strerror or exc}", fix="check the file permissions"
        ) from None
    return file_size, raw


def _check_entry(entry: Any, name: str, *, label: str, shard: str) -> tuple[int, int]:
    """Validate one header entry's fields; return its (begin, end) data offsets."""
    if not isinstance(entry, dict):
        raise _corrupt(label, shard, f"tensor {name!r} has no dtype/shape/offsets record")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise _corrupt(label, shard, f"tensor {name!r} has no dtype")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _corrupt(label, shard, f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _corrupt(label, shard, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = int(offsets[0]), int(offsets[1])
    if not is_known_dtype(dtype):  # refused here, not when the first read needs its size
        raise ModelSourceError(
            label,
            f"{shard}: tensor {name!r} has dtype {dtype!r}, which hfmerge cannot read "
            f"(it reads {', '.join(known_dtypes())})",
            "use a checkpoint saved with standard safetensors dtypes, or convert this one with "
            "the tool that made it",
        )
    if end - begin != math.prod(shape) * element_size(dtype):
        raise _corrupt(label, shard, f"tensor {name!r}: byte size does not match dtype and shape")
    return begin, end


def _make_info(
    name: str, entry: dict[str, Any], shard: str, begin: int, end: int, data_start: int
) -> TensorInfo:
    return TensorInfo(
        name=name,
        dtype=entry["dtype"],
        shape=tuple(int(d) for d in entry["shape"]),
        shard=shard,
        nbytes=end - begin,
        offset=data_start + begin,
    )


def _check_layout(infos: list[TensorInfo], file_size: int, *, label: str, shard: str) -> None:
    """Tensors must lie inside the file and must not overlap (a truncated download fails here)."""
    previous_end = 0
    for info in infos:
        if info.offset < previous_end:
            raise _corrupt(label, shard, f"tensor {info.name!r} overlaps the tensor before it")
        previous_end = info.offset + info.nbytes
    if previous_end > file_size:
        # Worded like a short read of the data (checkpoint._read_exactly): a file cut while a
        # merge runs is reported the same whichever read meets the cut first.
        raise _corrupt(
            label,
            shard,
            f"the file ends {previous_end - file_size} bytes early "
            f"(its header needs {previous_end} bytes, the file has {file_size})",
        )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _corrupt(label: str, shard: str, problem: str) -> ModelSourceError:
    return ModelSourceError(
        label, f"{shard} is not a valid safetensors file: {problem}", _REDOWNLOAD
    )

"""Find a model directory's safetensors shards, index them from headers, and read tensors lazily."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch

from hfmerge.errors import ModelSourceError
from hfmerge.tensors.dtypes import torch_dtype
from hfmerge.tensors.fds import FdCache
from hfmerge.tensors.header import TensorInfo, read_shard_header
from hfmerge.tensors.shards import INDEX_FILE, SINGLE_FILE

# Pickle formats are only ever listed by name: unpickling a file can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT_FIX = (
    "convert it once, in an environment you trust: load it with transformers "
    "(`model = AutoModelForCausalLM.from_pretrained(DIR)`, or the matching Auto class), "
    "save it with `model.save_pretrained(OUT, safe_serialization=True)` and use OUT; "
    "or pick a revision of the repo that ships model.safetensors"
)


class CheckpointIndex:
    """Every tensor of a checkpoint, known from shard headers alone (no tensor data read)."""

    def __init__(self, model_dir: Path, tensors: list[TensorInfo], *, label: str) -> None:
        self.model_dir = model_dir
        self.label = label
        # File order (shard, then offset): reading `names` in order reads each file front to back.
        self._tensors = {info.name: info for info in tensors}
        self.shards: tuple[str, ...] = tuple(dict.fromkeys(info.shard for info in tensors))

    @property
    def names(self) -> tuple[str, ...]:
        """Tensor names in file order."""
        return tuple(self._tensors)

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data over all shards (headers excluded)."""
        return sum(info.nbytes for info in self._tensors.values())

    def info(self, name: str) -> TensorInfo:
        """Header record of tensor `name`; KeyError naming the checkpoint if absent."""
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in checkpoint {self.label}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self._tensors.values())


def read_checkpoint_index(model_dir: Path, *, label: str | None = None) -> CheckpointIndex:
    """Index the safetensors checkpoint in `model_dir` from its headers.

    Reads `model.safetensors`, or `model.safetensors.index.json` and the shards it names (the single
    file wins when both exist, as in transformers). `label` names the model in errors (a Hub id).
    """
    model_dir = Path(model_dir)
    label = label or str(model_dir)
    _check_directory(model_dir, label)
    # lexists: a dangling or looping symlink is read, and fails with its reason, rather than
    # counting as no weights at all
    if os.path.lexists(model_dir / SINGLE_FILE):
        tensors = read_shard_header(model_dir / SINGLE_FILE, SINGLE_FILE, label=label)
    elif os.path.lexists(model_dir / INDEX_FILE):
        tensors = _read_sharded(model_dir, label)
    else:
        raise _no_safetensors_error(model_dir, label)
    if not tensors:
        raise ModelSourceError(
            label, "its safetensors checkpoint holds no tensors", "point to a model with weights"
        )
    return CheckpointIndex(model_dir, tensors, label=label)


def _check_directory(model_dir: Path, label: str) -> None:
    if not model_dir.exists():
        raise ModelSourceError(
            label,
            f"directory {model_dir} does not exist",
            "check the path, or give a Hub id as org/name[@revision]",
        )
    if not model_dir.is_dir():
        raise ModelSourceError(
            label, f"{model_dir} is not a directory", "point to the model's directory, not a file"
        )


def _read_sharded(model_dir: Path, label: str) -> list[TensorInfo]:
    weight_map = read_weight_map(model_dir / INDEX_FILE, label)
    tensors: list[TensorInfo] = []
    for shard in sorted(set(weight_map.values())):
        path = model_dir / shard
        if not os.path.lexists(path):
            raise ModelSourceError(
                label,
                f"{INDEX_FILE} names shard {shard}, which is missing",
                "download the complete repository (every model-*.safetensors file)",
            )
        tensors.extend(read_shard_header(path, shard, label=label))
    check_weight_map(weight_map, tensors, label)
    return tensors


def read_weight_map(path: Path, label: str) -> dict[str, str]:
    """The `weight_map` (tensor name -> shard file) of a `model.safetensors.index.json`."""
    try:
        document: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSourceError(
            label, f"cannot read {INDEX_FILE}: {exc}", "download the index file again"
        ) from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _is_plain_relative(v)
        for k, v in weight_map.items()
    ):
        raise ModelSourceError(
            label,
            f"{INDEX_FILE} has no valid weight_map (tensor name -> shard file in the directory)",
            "download the index file again",
        )
    return weight_map


def _is_plain_relative(name: str) -> bool:
    path = Path(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts


def check_weight_map(weight_map: dict[str, str], tensors: list[TensorInfo], label: str) -> None:
    """Every name appears once over all shards, and in the shard the index says."""
    where: dict[str, str] = {}
    for info in tensors:
        if info.name in where:
            raise ModelSourceError(
                label,
                f"tensor {info.name!r} is stored in both {where[info.name]} and {info.shard}",
                "download the repository again; its shards do not belong together",
            )
        where[info.name] = info.shard
    for name, shard in weight_map.items():
        if where.get(name) != shard:
            raise ModelSourceError(
                label,
                f"{INDEX_FILE} puts tensor {name!r} in {shard}, but that shard's header lacks it",
                "download the repository again; its index and shards do not match",
            )


def _no_safetensors_error(model_dir: Path, label: str) -> ModelSourceError:
    files = sorted(p.name for p in model_dir.iterdir() if p.is_file())
    pickles = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        return ModelSourceError(
            label,
            f"it has only pickle checkpoints ({', '.join(pickles[:5])}), which hfmerge does not "
            "load because unpickling a file can run arbitrary code",
            CONVERT_FIX,
        )
    others = [name for name in files if name.endswith(".safetensors")]
    if others:
        return ModelSourceError(
            label,
            f"it has safetensors files ({', '.join(others[:5])}) but neither {SINGLE_FILE} "
            f"nor {INDEX_FILE}",
            f"rename a single-file checkpoint to {SINGLE_FILE}, or add the shard index",
        )
    return ModelSourceError(
        label,
        "it has no model weights",
        f"point to a directory with {SINGLE_FILE} (or model-*-of-*.safetensors and {INDEX_FILE})",
    )


def file_index(path: Path, *, label: str) -> CheckpointIndex:
    """Index one safetensors file of any name (such as an adapter's) from its header."""
    return CheckpointIndex(
        path.parent, read_shard_header(path, path.name, label=label), label=label
    )


class TensorReader(Protocol):
    """What the merge engine reads tensors through: a checkpoint, or a wrapper around one."""

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name`, whole."""
        ...

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` (dim 0) of tensor `name`."""
        ...


class LazyCheckpoint:
    """Read a checkpoint one tensor at a time, keeping at most `max_open` shard files open.

    Tensors are read with `pread` into fresh buffers, never through a memory map: a file that
    shrinks while mapped kills the process with SIGBUS on the next touch of a lost page, where a
    short read is an error naming the file; and a mapped shard keeps every page it touched
    resident until it is unmapped. Use as a context manager. `index`, when given, is the
    checkpoint's index already read (`file_index` for a single file of another name).
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        label: str | None = None,
        max_open: int = 2,
        index: CheckpointIndex | None = None,
    ) -> None:
        if max_open < 1:
            raise ValueError("max_open must be at least 1")
        self.index = index if index is not None else read_checkpoint_index(model_dir, label=label)
        self._fds = FdCache(self.index.model_dir, flags=os.O_RDONLY, max_open=max_open)

    @property
    def names(self) -> tuple[str, ...]:
        """Tensor names in file order."""
        return self.index.names

    def info(self, name: str) -> TensorInfo:
        """Header record of tensor `name`."""
        return self.index.info(name)

    def __contains__(self, name: object) -> bool:
        return name in self.index

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name`, read from disk into a new CPU tensor that owns its memory."""
        info = self.index.info(name)
        return self._read(info, info.offset, info.nbytes, tuple(info.shape))

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` (dim 0) of tensor `name`, read alone; a 0-d tensor has one row."""
        return self._read(*self._rows(name, start, stop))

    def _rows(
        self, name: str, start: int, stop: int
    ) -> tuple[TensorInfo, int, int, tuple[int, ...]]:
        """(info, first byte, byte count, shape) of rows `start:stop` of tensor `name`."""
        info = self.index.info(name)
        shape = tuple(info.shape)
        rows = shape[0] if shape else 1
        if not 0 <= start <= stop <= rows:
            raise IndexError(f"rows {start}:{stop} out of range for {name!r} with {rows} rows")
        if not shape:
            return info, info.offset, info.nbytes, shape
        row_bytes = info.nbytes // rows if rows else 0
        offset = info.offset + start * row_bytes
        return info, offset, (stop - start) * row_bytes, (stop - start, *shape[1:])

    def _read(
        self, info: TensorInfo, offset: int, nbytes: int, shape: tuple[int, ...]
    ) -> torch.Tensor:
        dtype = torch_dtype(info.dtype)
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        # Uninitialised, unlike a bytearray: the read overwrites every byte anyway.
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        try:
            _read_exactly(self._fds.get(info.shard), buffer.numpy().data, offset)
        except OSError as exc:
            raise self._short_file(info, str(exc)) from None
        # safetensors data is little-endian, as is every platform torch ships for.
        return buffer.view(dtype).reshape(shape)

    def _short_file(self, info: TensorInfo, problem: str) -> ModelSourceError:
        return ModelSourceError(
            self.index.label,
            f"cannot read tensor {info.name!r} from {info.shard}: {problem}",
            "download the file again",
        )

    def close(self) -> None:
        """Release every open shard file."""
        self._fds.close()

    def __enter__(self) -> LazyCheckpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


_MAX_READ = 1 << 30  # one pread call moves at most 2 GiB on Linux; stay well below


def _read_exactly(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from `fd` at `offset`, in chunks; a short file is an error."""
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done : done + _MAX_READ]], offset + done)
        if count == 0:
            raise OSError(f"file ends {len(view) - done} bytes early")
        done += count

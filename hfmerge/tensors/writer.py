"""Stream tensors into planned safetensors shards: headers first, then each tensor at its offset."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType

import torch

from hfmerge.errors import OutputError, ShardWriteError
from hfmerge.tensors.dtypes import dtype_name
from hfmerge.tensors.fds import FdCache
from hfmerge.tensors.shards import INDEX_FILE, PlannedShard, PlannedTensor, ShardPlan

# Linux writes at most this many bytes per write call; larger tensors go in several calls.
_MAX_WRITE = 0x7FFFF000
# Writes at least this large start their own writeback at once (see `_start_writeback`).
_EARLY_WRITEBACK_BYTES = 1 << 20


def encode_header(shard: PlannedShard, metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length plus JSON header of `shard`, space-padded so data starts 8-byte aligned."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    for t in shard.tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [t.begin, t.end],
        }
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Write a `ShardPlan`'s tensors into `out_dir` in any order, holding one tensor at a time.

    Entering creates every shard file with its final header and size; `write` puts each tensor's
    bytes at its planned offset; a clean exit checks that every tensor arrived, syncs the files and
    writes `model.safetensors.index.json` when there are several shards.
    """

    def __init__(
        self,
        out_dir: Path,
        plan: ShardPlan,
        *,
        metadata: Mapping[str, str] | None = None,
        max_open: int = 4,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.plan = plan
        self._metadata = _checked_metadata(metadata or {})
        self._data_start: dict[str, int] = {}
        self._fds = FdCache(self.out_dir, flags=os.O_WRONLY, max_open=max_open)
        self._written: set[str] = set()
        self._parts: dict[str, int] = {}  # bytes written so far of tensors written in parts
        self._closed = False

    @property
    def written(self) -> frozenset[str]:
        """Names written so far."""
        return frozenset(self._written)

    def open(self) -> None:
        """Create every shard file with its header, sized to its final length (done by `with`)."""
        if self._data_start:
            return
        headers = {s.filename: encode_header(s, self._metadata) for s in self.plan.shards}
        with self._os_errors("the output directory"):
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._check_free_space(sum(map(len, headers.values())) + self.plan.total_bytes)
            for shard in self.plan.shards:
                self._create(shard, headers[shard.filename])

    def _check_free_space(self, needed: int) -> None:
        # Shard files start sparse, so a full disk would otherwise surface only late in a long run.
        free = shutil.disk_usage(self.out_dir).free
        if free < needed:
            raise OutputError(
                str(self.out_dir),
                f"the output needs {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free",
                "free disk space or choose an output path on another disk",
            )

    def _create(self, shard: PlannedShard, header: bytes) -> None:
        path = self.out_dir / shard.filename
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            _pwrite_all(fd, memoryview(header), 0)
            os.ftruncate(fd, len(header) + shard.nbytes)
        finally:
            os.close(fd)
        self._data_start[shard.filename] = len(header)

    @contextlib.contextmanager
    def _os_errors(self, what: str) -> Iterator[None]:
        """Turn a failed write (disk full, permissions) into a user-facing `OutputError`."""
        try:
            yield
        except OSError as exc:
            raise OutputError(
                str(self.out_dir),
                f"cannot write {what}: {exc.strerror or exc}",
                "check free disk space and permissions, or choose another output path",
            ) from exc

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write tensor `name`, which must match its planned dtype and shape, at its offset."""
        if self._closed:
            raise ShardWriteError(f"cannot write {name!r}: the writer is closed")
        self.open()
        shard, planned = self._check(name, tensor)
        offset = self._data_start[shard.filename] + planned.begin
        with self._os_errors(shard.filename):
            _write_through(self._fds.get(shard.filename), _tensor_bytes(tensor), offset)
        self._written.add(name)

    def write_part(self, name: str, start: int, tensor: torch.Tensor) -> None:
        """Write consecutive elements of tensor `name`, from flat index `start` on.

        The tensor counts as written once parts covering all its bytes have arrived (each part
        once: the engine writes disjoint chunks). `tensor` must have the planned dtype.
        """
        if self._closed:
            raise ShardWriteError(f"cannot write {name!r}: the writer is closed")
        self.open()
        shard, planned = self._check_part(name, tensor)
        size = tensor.numel() * tensor.element_size()
        begin = start * tensor.element_size()
        if start < 0 or begin + size > planned.end - planned.begin:
            raise ShardWriteError(f"part at element {start} of {name!r} overruns its plan")
        offset = self._data_start[shard.filename] + planned.begin + begin
        with self._os_errors(shard.filename):
            _write_through(self._fds.get(shard.filename), _tensor_bytes(tensor), offset)
        done = self._parts.get(name, 0) + size
        self._parts[name] = done
        if done == planned.end - planned.begin:
            self._written.add(name)

    def record_written(self, names: Iterable[str]) -> None:
        """Count `names` as written: another process wrote them into these files (a forked
        share of the merge, whose writes the page cache shares with this process)."""
        names = list(names)
        for name in names:
            self._require_planned(name)
        self._written.update(names)

    def _require_planned(self, name: str) -> None:
        if name not in self.plan:
            raise ShardWriteError(f"tensor {name!r} is not in the shard plan")

    def _locate_unwritten(self, name: str) -> tuple[PlannedShard, PlannedTensor]:
        """Where tensor `name` goes, checking that it is planned and not written yet."""
        self._require_planned(name)
        if name in self._written:
            raise ShardWriteError(f"tensor {name!r} was already written")
        return self.plan.locate(name)

    def _check_part(self, name: str, tensor: torch.Tensor) -> tuple[PlannedShard, PlannedTensor]:
        shard, planned = self._locate_unwritten(name)
        if dtype_name(tensor.dtype) != planned.dtype:
            raise ShardWriteError(
                f"tensor {name!r} part has dtype {tensor.dtype}, planned {planned.dtype}"
            )
        return shard, planned

    def _check(self, name: str, tensor: torch.Tensor) -> tuple[PlannedShard, PlannedTensor]:
        shard, planned = self._locate_unwritten(name)
        if tuple(tensor.shape) != planned.shape:
            raise ShardWriteError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, planned {planned.shape}"
            )
        try:
            got = dtype_name(tensor.dtype)
        except ValueError as exc:
            raise ShardWriteError(f"tensor {name!r}: {exc}") from None
        if got != planned.dtype:
            raise ShardWriteError(f"tensor {name!r} has dtype {got}, planned {planned.dtype}")
        return shard, planned

    def close(self) -> None:
        """Check that every planned tensor was written, sync the shards, write the index."""
        if self._closed:
            return
        self._closed = True
        self._fds.close()
        missing = [name for name in self.plan.names if name not in self._written]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ShardWriteError(
                f"{len(missing)} planned tensors were never written: {shown}{more}"
            )
        with self._os_errors("the shard files"):
            for filename in self.plan.filenames:
                _fsync_path(self.out_dir / filename)
            if len(self.plan.shards) > 1:
                self._write_index()

    def abort(self) -> None:
        """Release files without checks; the caller discards the partial output."""
        self._closed = True
        self._fds.close()

    def _write_index(self) -> None:
        document = {
            "metadata": {
                "total_size": self.plan.total_bytes,
                "total_parameters": self.plan.total_parameters,
            },
            "weight_map": self.plan.weight_map(),
        }
        path = self.out_dir / INDEX_FILE
        with path.open("x", encoding="utf-8") as handle:
            handle.write(json.dumps(document, indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def __enter__(self) -> ShardWriter:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _checked_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map strings to strings")
    if metadata.get("format", "pt") != "pt":
        raise ValueError("metadata 'format' must be 'pt': transformers refuses other formats")
    return {"format": "pt", **metadata}


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian bytes, as safetensors stores them."""
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise ShardWriteError("writing safetensors needs a little-endian machine")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    data = data.cast("B")
    while data:
        written = os.pwrite(fd, data[:_MAX_WRITE], offset)
        data = data[written:]
        offset += written


def _write_through(fd: int, data: memoryview, offset: int) -> None:
    """`pwrite` the bytes, then start their writeback so `close`'s fsync has little left to do."""
    _pwrite_all(fd, data, offset)
    if data.nbytes >= _EARLY_WRITEBACK_BYTES:
        _start_writeback(fd, offset, data.nbytes)


def _start_writeback(fd: int, offset: int, length: int) -> None:
    # On Linux, POSIX_FADV_DONTNEED on dirty pages queues their writeback without waiting for it
    # (and drops pages already clean). Without it the kernel may hold gigabytes of dirty output
    # until the final fsync, which then waits for all of it after the merge is done; with it the
    # disk works while the merge computes. Elsewhere this is a no-op: fsync still makes it durable.
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def overwrite_tensors(
    model_dir: Path,
    values: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    *,
    label: str,
) -> None:
    """Overwrite tensors of a written checkpoint in place: same names, shapes and dtypes.

    Each value is cast to the dtype in the shard header and written over the old bytes at its
    header offset, so no shard is rewritten or held in memory. `values` may be a stream of (name,
    value) pairs: each is written as it comes, so only one need exist at a time. For a checkpoint
    still being assembled (a staging directory): a crash mid-way would leave mixed values in the
    file.
    """
    from hfmerge.tensors.checkpoint import read_checkpoint_index
    from hfmerge.tensors.dtypes import torch_dtype

    index = read_checkpoint_index(model_dir, label=label)
    pairs = values.items() if isinstance(values, Mapping) else values
    fds: dict[str, int] = {}
    try:
        for name, value in pairs:
            info = index.info(name)
            if tuple(value.shape) != info.shape:
                raise ShardWriteError(
                    f"{name}: shape {list(value.shape)} does not match the "
                    f"checkpoint's {list(info.shape)}"
                )
            if info.shard not in fds:
                fds[info.shard] = os.open(model_dir / info.shard, os.O_WRONLY)
            _pwrite_all(
                fds[info.shard], _tensor_bytes(value.to(torch_dtype(info.dtype))), info.offset
            )
        for fd in fds.values():
            os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)

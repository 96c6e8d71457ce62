"""The merge engine's two I/O threads: one reads chunks ahead, one writes merged chunks behind.

`pread`/`pwrite` and torch's kernels release the GIL, so reading the next chunk (and converting it
to float32) and writing the previous one overlap the arithmetic on the current one. Both queues are
bounded in bytes (`ByteGate`), so overlap never costs more memory than the budget allows. Errors in
a thread reach the main thread; leaving either context stops and joins its thread, so no thread
touches a file after the engine closes it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, TypeVar, cast

import torch

T = TypeVar("T")
_POLL = 0.1  # seconds between checks of the stop flag while blocked
_END = object()


class _Stopped(Exception):  # noqa: N818 -- a signal that ends the producer, not an error
    """The consumer went away: the producer thread stops quietly."""


class ByteGate:
    """Admits work while the bytes in flight stay within `limit`; a single item larger than the
    limit is admitted only when nothing else is in flight (so it cannot deadlock)."""

    def __init__(self, limit: int, stop: threading.Event) -> None:
        self.limit = limit
        self._stop = stop
        self._in_flight = 0
        self._cond = threading.Condition()

    def acquire(self, size: int) -> None:
        """Wait until `size` more bytes may be in flight; `_Stopped` when stopping."""
        with self._cond:
            while self._in_flight and self._in_flight + size > self.limit:
                if self._stop.is_set():
                    raise _Stopped
                self._cond.wait(_POLL)
            self._in_flight += size

    def release(self, size: int) -> None:
        """`size` bytes are done with."""
        with self._cond:
            self._in_flight -= size
            self._cond.notify_all()


Acquire = Callable[[int], None]


class Prefetcher(Generic[T]):
    """Runs `produce` in a thread, at most `read_bytes` ahead of the consumer.

    `produce(acquire)` yields (item, bytes) pairs and calls `acquire(bytes)` before reading each
    one. Iterate for the items in order; call `done(bytes)` once an item's memory is freed.
    """

    def __init__(
        self, produce: Callable[[Acquire], Iterator[tuple[T, int]]], read_bytes: int
    ) -> None:
        self._stop = threading.Event()
        self._gate = ByteGate(read_bytes, self._stop)
        self._queue: queue.Queue[object] = queue.Queue()
        self._produce = produce
        self._thread = threading.Thread(target=self._run, name="hfmerge-read", daemon=True)

    def _run(self) -> None:
        try:
            for pair in self._produce(self._gate.acquire):
                self._queue.put(pair)
        except _Stopped:
            return
        except BaseException as exc:  # handed to the main thread, which raises it
            self._queue.put(exc)
            return
        self._queue.put(_END)

    def __iter__(self) -> Iterator[tuple[T, int]]:
        while True:
            got = self._queue.get()
            if got is _END:
                return
            if isinstance(got, BaseException):
                raise got
            yield got  # type: ignore[misc]

    def done(self, size: int) -> None:
        """An item of `size` bytes was consumed and freed."""
        self._gate.release(size)

    def __enter__(self) -> Prefetcher[T]:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a producer waiting on a full gate
            self._gate.release(0)
            self._thread.join(_POLL)


@dataclass(frozen=True)
class _Part:
    name: str
    first: int
    tensor: torch.Tensor
    size: int


class WriteBehind:
    """Writes (name, first element, tensor) parts through `write` in a thread, `write_bytes`
    behind the caller. `close()` waits for every write and raises the first error."""

    def __init__(self, write: Callable[[str, int, torch.Tensor], None], write_bytes: int) -> None:
        self._write = write
        self._stop = threading.Event()
        self._gate = ByteGate(write_bytes, self._stop)
        self._queue: queue.Queue[object] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hfmerge-write", daemon=True)

    def put(self, name: str, first: int, tensor: torch.Tensor) -> None:
        """Queue a part for writing; raises a write error from an earlier part."""
        self._raise_error()
        size = tensor.numel() * tensor.element_size()
        try:
            self._gate.acquire(size)
        except _Stopped:
            self._raise_error()
            raise
        self._queue.put(_Part(name, first, tensor, size))

    def _run(self) -> None:
        while True:
            got = self._queue.get()
            if got is _END:
                return
            part = cast(_Part, got)
            try:
                if self._error is None:
                    self._write(part.name, part.first, part.tensor)
            except BaseException as exc:  # raised in the main thread by put/close
                self._error = exc
                self._stop.set()
            finally:
                self._gate.release(part.size)
            del part, got  # the tensor's memory goes now, not at the next get

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait for every queued write; raise the first error any of them hit."""
        self._queue.put(_END)
        self._thread.join()
        self._raise_error()

    def __enter__(self) -> WriteBehind:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
            return
        self._error = self._error or exc  # skip the queued writes: the output is discarded
        self._stop.set()
        self._queue.put(_END)
        self._thread.join()

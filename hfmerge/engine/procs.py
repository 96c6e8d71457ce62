"""Element-wise merges in two processes, each merging its share of the tensors into the same shard
files at their planned offsets.

Why processes: an element-wise merge (linear, task arithmetic) is a few torch ops per 64K-element
piece. torch drops the GIL inside each op and takes it back between them, so two threads hand the
GIL over at every op and gained nothing but CPU time. Two processes share only the output files,
not a GIL, so both cores merge at once (benchmarks/NOTES.md has the measurement).

How: once the shard files exist, the engine forks. The child merges its share, reports each
finished tensor and then its result (the names it wrote, what it found) or its error through a
pipe, and ends in `os._exit`
whatever happens, so it never returns into its caller's clean-up. The parent merges the rest and
advances one progress bar for both. A parent that fails kills the child before its caller
discards the output. Linux only (`fork` with torch loaded); elsewhere, and on a GPU, one process.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import pickle
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from multiprocessing import Pipe
from types import TracebackType
from typing import Generic, TypeVar

import torch

from hfmerge.engine.plan import TensorJob
from hfmerge.engine.tuning import EngineTuning
from hfmerge.errors import HfMergeError

_PR_SET_PDEATHSIG = 1  # linux/prctl.h

R = TypeVar("R")
# Merges `jobs`, calling `on_job()` after each; returns what the parent needs to know (the names
# of the tensors it wrote, ...), which must pickle.
RunShare = Callable[[list[TensorJob], Callable[[], None]], R]


def process_count(*, elementwise: bool, device: torch.device, tuning: EngineTuning) -> int:
    """Processes for a merge: up to `tuning.max_processes` (one per core) for element-wise
    merges on a multi-core Linux CPU, else one."""
    if not elementwise or device.type != "cpu" or not sys.platform.startswith("linux"):
        return 1
    cores = len(os.sched_getaffinity(0))
    return max(1, min(tuning.max_processes, cores))


def split_jobs(jobs: Sequence[TensorJob], shares: int) -> list[list[TensorJob]]:
    """`jobs` dealt into `shares` lists of about equal elements (largest first, each to the
    lightest share), every list in plan order so each process reads its files front to back."""
    loads = [0] * shares
    owner: dict[str, int] = {}
    for job in sorted(jobs, key=lambda job: math.prod(job.shape), reverse=True):
        lightest = loads.index(min(loads))
        owner[job.name] = lightest
        loads[lightest] += math.prod(job.shape)
    return [[job for job in jobs if owner[job.name] == share] for share in range(shares)]


class ForkedShare(Generic[R]):
    """One share of the jobs, merged by a child process while the `with` block runs.

    `on_job(1)` is called (on a listener thread) for each tensor the child finishes; `check()`
    raises the child's error as soon as it is known; `wait()` returns what `run` returned.
    """

    def __init__(
        self, jobs: list[TensorJob], run: RunShare[R], on_job: Callable[[int], None]
    ) -> None:
        self._jobs = jobs
        self._run = run
        self._on_job = on_job
        self._pid = 0
        self._result: R | None = None
        self._error: BaseException | None = None
        self._listener = threading.Thread(target=self._listen, name="hfmerge-share", daemon=True)
        self._receive, self._send = Pipe(duplex=False)

    def __enter__(self) -> ForkedShare[R]:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            self._child(parent)  # never returns
        self._pid = pid
        self._send.close()
        self._listener.start()
        return self

    def _child(self, parent: int) -> None:
        status = 1
        try:
            _die_with(parent)
            self._receive.close()
            result = self._run(self._jobs, lambda: self._send.send(("job", None)))
            self._send.send(("done", result))
            status = 0
        except BaseException as exc:  # handed to the parent, which raises it
            with contextlib.suppress(BaseException):
                self._send.send(("error", _portable(exc)))
        finally:
            os._exit(status)

    def _listen(self) -> None:
        try:
            while True:
                kind, value = self._receive.recv()
                if kind == "job":
                    self._on_job(1)
                    continue
                if kind == "done":
                    self._result = value
                else:
                    self._error = value
                return
        except (EOFError, OSError):  # the child died without a word (killed, out of memory)
            self._error = RuntimeError("the merge's worker process ended without finishing")

    def check(self) -> None:
        """Raise the child's error if it has failed already."""
        if self._error is not None:
            raise self._error

    def wait(self) -> R:
        """Wait for the child; what its `run` returned, or its error raised here."""
        self._listener.join()
        self._reap()
        self.check()
        assert self._result is not None
        return self._result

    def _reap(self) -> None:
        if self._pid:
            os.waitpid(self._pid, 0)
            self._pid = 0

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._pid:  # leaving early: the output is discarded, so the child stops writing now
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            self._reap()
        self._listener.join()
        self._receive.close()


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (a parent killed outright has no
    chance to), so no child keeps writing into an output nobody will use. Linux sends the signal
    when the forking thread ends: the engine forks from the thread that waits for the child."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


def _portable(exc: BaseException) -> BaseException:
    """The child's error in a form that crosses the pipe: the same exception wherever it pickles,
    so the caller catches an `OSError` (a full disk) or an `HfMergeError` just as it would from
    one process. Any other error carries the child's traceback as a note, since the parent's
    traceback only shows the wait; one that does not pickle becomes a RuntimeError with it."""
    text = "".join(traceback.format_exception(exc))
    if not isinstance(exc, (HfMergeError, KeyboardInterrupt)):
        exc.add_note(f"raised in the merge's worker process:\n{text}")
    with contextlib.suppress(Exception):
        pickle.loads(pickle.dumps(exc))  # some pickle but cannot be rebuilt (odd constructors)
        return exc
    return RuntimeError(f"the merge's worker process failed:\n{text}")

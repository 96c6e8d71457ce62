"""Element-wise merges in two processes: the same output as one, tensors dealt evenly, the budget
shared, and every failure (the child's or the parent's) ends both processes with a clear error."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from hfmerge.engine import budget as engine_budget
from hfmerge.engine import stream as engine
from hfmerge.engine.plan import TensorJob
from hfmerge.engine.procs import ForkedShare, process_count, split_jobs
from hfmerge.engine.tuning import DEFAULT_TUNING
from hfmerge.errors import ModelSourceError
from tests.support.engine import make_models, merge

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_models(tmp_path_factory.mktemp("procs"))


@pytest.fixture
def two_processes(monkeypatch: pytest.MonkeyPatch) -> list[frozenset[str]]:
    """Forces two processes whatever the core count; collects the names each child wrote."""
    monkeypatch.setattr(engine, "process_count", lambda **_: 2)
    from_children: list[frozenset[str]] = []
    wait = ForkedShare.wait

    def spy(self: ForkedShare[Any]) -> Any:
        result = wait(self)
        from_children.append(result.written)
        return result

    monkeypatch.setattr(ForkedShare, "wait", spy)
    return from_children


def _fail_in_child(monkeypatch: pytest.MonkeyPatch, error: BaseException | None) -> None:
    """The child raises `error` before merging (None: it dies without a word); the parent runs."""
    parent = os.getpid()
    run = engine._Share.run

    def failing(self: Any, *args: Any) -> Any:
        if os.getpid() != parent:
            if error is None:
                os._exit(3)
            raise error
        return run(self, *args)

    monkeypatch.setattr(engine._Share, "run", failing)


class UnrebuildableError(Exception):
    """Pickles (as its one message argument) but cannot be rebuilt from it."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


def _assert_no_children() -> None:
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_two_processes_write_what_one_does(
    models: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    two_processes: list[frozenset[str]],
    method: str,
) -> None:
    both = merge(models, tmp_path / "two", method)
    monkeypatch.setattr(engine, "process_count", lambda **_: 1)
    one = merge(models, tmp_path / "one", method)
    [child] = two_processes
    assert child
    assert child < set(one)  # the child wrote a share, the parent the rest
    assert both.keys() == one.keys()
    for name, tensor in one.items():
        assert torch.equal(tensor, both[name]), name
    _assert_no_children()


def test_split_jobs_deals_even_shares_in_plan_order() -> None:
    sizes = [(7, 3), (100,), (2, 2), (50,), (1,), (60,), ()]
    jobs = [TensorJob(f"t{i}", shape, "BF16", "merge", "") for i, shape in enumerate(sizes)]
    shares = split_jobs(jobs, 2)
    assert sorted(j.name for share in shares for j in share) == sorted(j.name for j in jobs)
    for share in shares:
        assert share == sorted(share, key=jobs.index)  # plan order within each share
    loads = [sum(torch.Size(j.shape).numel() for j in share) for share in shares]
    assert abs(loads[0] - loads[1]) <= 100  # within the largest tensor
    assert split_jobs(jobs, 1) == [jobs]


def test_process_count_only_splits_elementwise_cpu_merges() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    tuning = DEFAULT_TUNING
    assert process_count(elementwise=False, device=cpu, tuning=tuning) == 1
    assert process_count(elementwise=True, device=gpu, tuning=tuning) == 1
    cores = len(os.sched_getaffinity(0))
    expected = min(tuning.max_processes, cores)
    assert process_count(elementwise=True, device=cpu, tuning=tuning) == expected
    one = dataclasses.replace(tuning, max_processes=1)
    assert process_count(elementwise=True, device=cpu, tuning=one) == 1


def test_processes_share_the_budget_or_fall_back_to_one(
    models: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    two_processes: list[frozenset[str]],
) -> None:
    monkeypatch.setattr(engine_budget, "current_rss", lambda: 0)
    seen: list[engine_budget.ChunkPolicy] = []
    real = engine_budget.chunk_policy

    def spy(*args: Any, **kwargs: Any) -> engine_budget.ChunkPolicy:
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(engine, "chunk_policy", spy)
    reserve = DEFAULT_TUNING.reserve_bytes
    merge(models, tmp_path / "roomy", "linear", max_memory=2 * (reserve + 300_000))
    merge(models, tmp_path / "tight", "linear", max_memory=reserve + 300_000)
    roomy, tight = seen
    # 2 inputs, bf16 out: 8 + 2 bytes per element held, 16 + 4 queued
    assert (roomy.processes, roomy.chunk_elements) == (2, 300_000 // 30)
    assert (tight.processes, tight.chunk_elements) == (1, 300_000 // 30)
    assert len(two_processes) == 1  # only the roomy budget forked


def test_a_childs_error_reaches_the_caller_and_nothing_is_left(
    models: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    two_processes: list[frozenset[str]],
) -> None:
    _fail_in_child(monkeypatch, ModelSourceError("m1", "cannot read tensor 'x'", "download it"))
    with pytest.raises(ModelSourceError, match="cannot read tensor 'x'") as info:
        merge(models, tmp_path / "out", "linear")
    assert "Fix: download it" in info.value.message()  # the same error, fields and all
    assert not (tmp_path / "out").exists()
    _assert_no_children()


def test_a_bug_in_the_child_arrives_as_itself_with_the_childs_traceback(
    models: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    two_processes: list[frozenset[str]],
) -> None:
    _fail_in_child(monkeypatch, ZeroDivisionError("bad arithmetic"))
    with pytest.raises(ZeroDivisionError, match="bad arithmetic") as info:
        merge(models, tmp_path / "out", "linear")
    (note,) = info.value.__notes__
    assert note.startswith("raised in the merge's worker process")
    assert "in failing" in note  # the child's own frames
    assert not (tmp_path / "out").exists()
    _assert_no_children()


def test_a_full_disk_in_the_child_is_an_oserror_for_the_caller(
    models: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    two_processes: list[frozenset[str]],
) -> None:
    """Callers catch OSError (ENOSPC, EACCES) whichever process met it."""
    import errno

    _fail_in_child(monkeypatch, OSError(errno.ENOSPC, "No space left on device", "/out/x"))
    with pytest.raises(OSError, match="No space left") as info:
        merge(models, tmp_path / "out", "linear")
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, "/out/x")
    assert not (tmp_path / "out").exists()
    _assert_no_children()


def test_an_error_that_cannot_be_rebuilt_arrives_as_text(
    models: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    two_processes: list[frozenset[str]],
) -> None:
    _fail_in_child(monkeypatch, UnrebuildableError(1, 2))
    with pytest.raises(RuntimeError, match="worker process failed") as info:
        merge(models, tmp_path / "out", "linear")
    assert "UnrebuildableError: 1/2" in str(info.value)
    _assert_no_children()


def test_a_child_that_dies_silently_is_an_error(
    models: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    two_processes: list[frozenset[str]],
) -> None:
    _fail_in_child(monkeypatch, None)
    with pytest.raises(RuntimeError, match="ended without finishing"):
        merge(models, tmp_path / "out", "linear")
    assert not (tmp_path / "out").exists()
    _assert_no_children()


def test_a_failing_parent_kills_the_child_at_once(
    models: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    two_processes: list[frozenset[str]],
) -> None:
    parent = os.getpid()
    run = engine._Share.run

    def slow_child_failing_parent(self: Any, *args: Any) -> Any:
        if os.getpid() != parent:
            time.sleep(60)  # still merging when the parent fails
            return run(self, *args)
        raise ModelSourceError("m0", "the parent's share failed", "retry")

    monkeypatch.setattr(engine._Share, "run", slow_child_failing_parent)
    started = time.monotonic()
    with pytest.raises(ModelSourceError, match="the parent's share failed"):
        merge(models, tmp_path / "out", "linear")
    assert time.monotonic() - started < 30  # the child was killed, not waited for
    assert not (tmp_path / "out").exists()
    _assert_no_children()


def test_every_kind_of_error_crosses_the_pipe_intact() -> None:
    """Errors pickle by their fields, whatever their constructors take."""
    import pickle

    from hfmerge import errors

    cases = [
        errors.ModelSourceError("m", "problem", "fix it"),
        errors.OutputError("/out", "disk full", "free space"),
        errors.UnknownNameError("method", "liner", ["linear", "ties"]),
        errors.PreflightError([errors.ModelSourceError("m", "p", "f")]),
        errors.OptionError("--device-map", "everywhere", "is no device", fix="use cpu"),
        errors.CkaGateError("a", "b", layer="block.1", value=0.5, threshold=0.9, route_block="r"),
        errors.CkaBelowThresholdError(
            "a", "b", threshold=0.9, failing=[("block.1", 0.5), ("block.2", 0.7)], layers=3
        ),
        errors.HfMergeError("what", why="why", fix="fix"),
    ]
    for error in cases:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert vars(copy).keys() == vars(error).keys()
        assert (copy.what, copy.why, copy.fix) == (error.what, error.why, error.fix)
        assert copy.message() == error.message()
        assert str(copy) == str(error)


def test_a_child_dies_with_its_parent(tmp_path: Path) -> None:
    """A parent killed outright (no clean-up runs) takes its child along."""
    import signal
    import subprocess
    import sys

    probe = f"""
import os, sys, time
from hfmerge.engine.procs import ForkedShare
share = ForkedShare([], lambda jobs, on_job: time.sleep(60) or [], lambda steps: None)
share.__enter__()
open({str(tmp_path / "child")!r}, "w").write(str(share._pid))
time.sleep(60)
"""
    parent = subprocess.Popen([sys.executable, "-c", probe])
    pid_file = tmp_path / "child"
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        assert parent.poll() is None
        time.sleep(0.05)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False

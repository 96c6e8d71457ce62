"""A run killed mid-merge leaves nothing that the next run, or `hfmerge clean`, does not remove.

The child process below merges tiny models with its reads slowed down, says when it has begun,
and is then killed from outside: the way a user's Ctrl-C, a `kill` or the OOM killer lands.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hfmerge.cli.app import main
from hfmerge.tensors import remove_stale, stale_staging
from hfmerge.tensors.output import atomic_output_dir
from hfmerge.tensors.staging import StagingDir
from tests.support.engine import make_models
from tests.support.staging import staging_leftovers

SLOW_MERGE = """
import sys, time
from pathlib import Path
from hfmerge.tensors.checkpoint import LazyCheckpoint

started = Path(sys.argv[2])
real = LazyCheckpoint.get_rows

def slow(self, name, start, stop):
    started.touch()  # the staging folder exists by the first read
    time.sleep(0.2)
    return real(self, name, start, stop)

LazyCheckpoint.get_rows = slow
from hfmerge.cli.entry import console_main
sys.argv = ["hfmerge", "run", sys.argv[1]]
console_main()
"""


def recipe(path: Path, models: list[Path], out: Path) -> Path:
    base, *others = models
    lines = ["models:", *(f"  - {{model: {m}, weight: 0.5}}" for m in others)]
    lines += [f"base: {base}", "merge: {method: linear}", f"output: {{path: {out}}}", ""]
    path.write_text("\n".join(lines))
    return path


def start_slow_run(tmp_path: Path, out: Path) -> tuple[subprocess.Popen[str], Path]:
    path = recipe(tmp_path / "r.yaml", make_models(tmp_path / "models"), out)
    started = tmp_path / "started"
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_MERGE, str(path), str(started)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not started.exists():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the merge never started"
        time.sleep(0.05)
    return child, path


@pytest.mark.slow  # a second interpreter runs a slowed-down merge
def test_after_kill_9_the_next_run_removes_the_leftover(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    child, path = start_slow_run(tmp_path, out)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    (left,) = staging_leftovers(tmp_path)  # nothing can clean up after SIGKILL
    assert left.name.startswith(".out.hfmerge-tmp-")
    assert not out.exists()
    assert main(["run", str(path)]) == 0
    assert staging_leftovers(tmp_path) == []
    assert (out / "config.json").is_file()


@pytest.mark.slow  # a second interpreter runs a slowed-down merge
def test_a_live_runs_staging_folder_is_never_taken_for_stale(tmp_path: Path) -> None:
    out = tmp_path / "out"
    child, _ = start_slow_run(tmp_path, out)
    try:
        (live,) = staging_leftovers(tmp_path)
        assert stale_staging(out) == []  # its flock is held by the child
        assert remove_stale(out) == []
        assert live.is_dir()
    finally:
        child.kill()
        child.communicate(timeout=60)
    assert [entry.path for entry in stale_staging(out)] == [live]  # the child is gone now


@pytest.mark.slow  # a second interpreter runs a slowed-down merge
@pytest.mark.parametrize(
    ("signum", "status"),
    [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
)
def test_a_signal_mid_run_exits_non_zero_and_leaves_nothing(
    signum: signal.Signals, status: int, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    child, _ = start_slow_run(tmp_path, out)
    child.send_signal(signum)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == status, stderr
    assert f"interrupted ({signum.name})" in stderr
    assert "Traceback" not in stderr
    assert stdout == ""  # nothing that a `&& hfmerge push` could take for a result
    assert staging_leftovers(tmp_path) == []
    assert not out.exists()


@pytest.mark.slow  # a second interpreter runs a slowed-down merge
def test_clean_removes_what_a_killed_run_left_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    child, _ = start_slow_run(tmp_path, out)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    (left,) = staging_leftovers(tmp_path)
    assert main(["clean", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"removed {left} (")
    assert printed.endswith(" MB)\n")
    assert staging_leftovers(tmp_path) == []
    assert main(["clean", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no staging folders" in captured.err


def test_clean_of_a_folder_of_outputs_removes_the_stale_ones_inside(tmp_path: Path) -> None:
    (tmp_path / ".a.hfmerge-tmp-0123abcd").mkdir()
    (tmp_path / ".b.hfmerge-old-89abcdef").mkdir()  # b is missing: put back as b
    assert main(["clean", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_stale_old_output_is_put_back_when_the_output_is_missing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").write_text("previous output")
    # A run killed between moving the old output aside and renaming the new one in.
    aside = tmp_path / ".out.hfmerge-old-0123abcd"
    os.rename(out, aside)
    (entry,) = stale_staging(out)
    assert entry.restores
    assert entry.size == len("previous output")
    remove_stale(out)
    assert (out / "weights").read_text() == "previous output"
    assert staging_leftovers(tmp_path) == []


def test_a_stale_old_output_is_deleted_when_the_new_one_is_in(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / ".out.hfmerge-old-0123abcd").mkdir()
    (entry,) = stale_staging(out)
    assert not entry.restores
    remove_stale(out)
    assert out.is_dir()
    assert staging_leftovers(tmp_path) == []


def test_foreign_hidden_folders_and_other_outputs_leftovers_are_left_alone(
    tmp_path: Path,
) -> None:
    (tmp_path / ".out.hfmerge-tmp-nothex!").mkdir()  # not a name hfmerge makes
    (tmp_path / ".other.hfmerge-tmp-0123abcd").mkdir()  # another output's
    (tmp_path / ".git").mkdir()
    assert remove_stale(tmp_path / "out") == []
    assert len(list(tmp_path.iterdir())) == 3


def _interrupt_half_way(out: Path) -> None:
    """Write half of `out` into its staging folder, then stop as Ctrl-C does."""
    with atomic_output_dir(out, force=False) as tmp:
        (tmp / "half").write_text("x")
        raise KeyboardInterrupt


def test_an_interrupted_body_removes_its_staging_folder(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        _interrupt_half_way(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_staging_folder_is_held_until_released(tmp_path: Path) -> None:
    staging = StagingDir(tmp_path / "out", "tmp")
    assert stale_staging(tmp_path / "out") == []
    staging.release()
    assert [entry.path for entry in stale_staging(tmp_path / "out")] == [staging.path]

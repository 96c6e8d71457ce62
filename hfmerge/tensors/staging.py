"""Hidden staging folders beside an output, and the removal of those a killed run left behind.

An output is built in `.NAME.hfmerge-tmp-XXXXXXXX` and renamed into place; a replaced output
waits as `.NAME.hfmerge-old-XXXXXXXX` until the new one is in. A run killed outright (SIGKILL,
a crash, a power cut) cannot remove its folder, so each live folder is marked by an exclusive
`flock` on it, held by the process that made it: the kernel drops the lock when that process
dies, however it dies. A folder whose lock can be taken is therefore stale, and the next run to
the same output (or `hfmerge clean`) removes it. A stale `-old-` folder whose output is missing
is the only copy of the previous output, so it is put back instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_KINDS = ("tmp", "old")
_STAGING = re.compile(r"^\.(?P<name>.+)\.hfmerge-(?P<kind>tmp|old)-[0-9a-f]{8}$")


@dataclass(frozen=True)
class StaleStaging:
    """One staging folder that no live process holds, and what cleaning does with it."""

    path: Path
    output: Path  # the output it was staging
    restores: bool  # an `-old-` folder whose output is gone: renamed back, not deleted
    size: int  # bytes of the files in it


class StagingDir:
    """A fresh hidden folder beside `final`, locked while this object is open."""

    def __init__(self, final: Path, kind: str) -> None:
        if kind not in _KINDS:
            raise ValueError(f"staging kind must be one of {_KINDS}, got {kind!r}")
        while True:
            path = final.parent / f".{final.name}.hfmerge-{kind}-{secrets.token_hex(4)}"
            try:
                path.mkdir()  # honours the umask, unlike tempfile.mkdtemp's private 0o700
            except FileExistsError:
                continue
            break
        self.path = path
        self._fd: int | None = _lock(path)

    @classmethod
    def hold(cls, path: Path) -> StagingDir:
        """Mark an existing folder (an output moved aside) as held by this process."""
        held = cls.__new__(cls)
        held.path = path
        held._fd = _lock(path)
        return held

    def release(self) -> None:
        """Drop the lock (the folder has been renamed into place or removed)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def stale_staging(place: Path) -> list[StaleStaging]:
    """Stale staging folders of the output `place`, and inside it when it is a folder."""
    place = Path(place).expanduser().absolute()
    found = [entry for entry in _candidates(place.parent) if entry[1] == place.name]
    if place.is_dir() and not place.is_symlink():
        found += _candidates(place)
    stale = []
    for path, name, kind in found:
        if _is_held(path):
            continue
        output = path.parent / name
        restores = kind == "old" and not os.path.lexists(output)
        stale.append(StaleStaging(path, output, restores, _size(path)))
    return stale


def remove_stale(place: Path) -> list[StaleStaging]:
    """Remove (or put back) every stale staging folder of `place`; what was done."""
    done = []
    for entry in stale_staging(place):
        fd = _try_lock(entry.path)
        if fd is None:  # taken meanwhile by another cleaner or run
            continue
        try:
            if entry.restores and not os.path.lexists(entry.output):
                os.rename(entry.path, entry.output)
            else:
                shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            os.close(fd)
        done.append(entry)
    return done


def _candidates(folder: Path) -> Iterator[tuple[Path, str, str]]:
    """Staging folders in `folder`: (path, the output's name, "tmp" or "old")."""
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            match = _STAGING.match(entry.name)
            if match and entry.is_dir() and not entry.is_symlink():
                yield entry, match["name"], match["kind"]


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a fresh folder: nobody else holds it
    return fd


def _try_lock(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _is_held(path: Path) -> bool:
    fd = _try_lock(path)
    if fd is None:
        return True
    os.close(fd)
    return False


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total

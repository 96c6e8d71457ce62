"""A small least-recently-used cache of open file descriptors, shared by the reader and writer."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path


class FdCache:
    """Keeps at most `max_open` files of one directory open, closing the least recently used."""

    def __init__(self, root: Path, *, flags: int, max_open: int) -> None:
        self.root = root
        self.flags = flags
        self.max_open = max(1, max_open)
        self._fds: OrderedDict[str, int] = OrderedDict()

    def get(self, name: str) -> int:
        """The descriptor of `root / name`, opening it (and closing the oldest) when needed."""
        fd = self._fds.get(name)
        if fd is not None:
            self._fds.move_to_end(name)
            return fd
        while len(self._fds) >= self.max_open:
            _, oldest = self._fds.popitem(last=False)
            os.close(oldest)
        fd = os.open(self.root / name, self.flags)
        self._fds[name] = fd
        return fd

    def close(self) -> None:
        """Close every open descriptor."""
        while self._fds:
            _, fd = self._fds.popitem()
            os.close(fd)

    def __len__(self) -> int:
        return len(self._fds)

"""`hfmerge clean`: staging folders that killed runs left behind."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hfmerge.tensors.staging import StaleStaging


def clean(path: str | Path) -> list[StaleStaging]:
    """Remove the staging folders that killed runs left beside `path` (and inside it).

    A run builds its output in a hidden `.NAME.hfmerge-tmp-*` folder beside it and renames it
    into place; killed outright (SIGKILL, a crash), it cannot remove that folder. Folders of runs
    still alive are left alone. A previous output that was moved aside (`-old-`) and whose place
    is empty is put back rather than deleted. The next run to the same output does this too.

    Args:
        path: an output path (the folder a run writes), or a folder that holds outputs.

    Returns:
        What was removed or put back, with each folder's size in bytes.
    """
    from hfmerge.tensors.staging import remove_stale

    return remove_stale(Path(path))

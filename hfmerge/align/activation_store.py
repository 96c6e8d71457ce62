"""Activation matching with the two models run one at a time: each one's features go to disk.

When both models and every group's statistics do not fit at once (`hfmerge align --method
activation --max-memory`), A runs over every probe batch with its features written to float32
files in a temporary folder, one per captured feature set (each hidden state, each probe), then A
is freed and B does the same. A group's statistics are then summed from the two files batch by
batch, and dropped once the group is matched: memory holds one model (or its resident share, with
the rest offloaded to disk) and then one group's float64 [n, n] sums, never every group's, and
never a whole [tokens, width] feature matrix. The sums are those of the paired run, batch for
batch, so the permutations are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from hfmerge.align.cross_stats import CrossStats
from hfmerge.progress import track
from hfmerge.tensors.malloc import return_freed_blocks, trim_heap

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# A model and a batch -> (key, [tokens, width] rows) for every feature set, one at a time.
Features = Callable[
    ["PreTrainedModel", dict[str, torch.Tensor]], Iterator[tuple[str, torch.Tensor]]
]


class FeatureFiles:
    """One model's features on every batch: file `key` holds float32 rows [tokens, width]."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.widths: dict[str, int] = {}
        self.batch_rows: list[int] = []  # tokens each batch added, the same for every key

    def append(self, key: str, rows: torch.Tensor) -> None:
        """Add one batch's [tokens, width] rows to file `key`."""
        width = int(rows.shape[1])
        if self.widths.setdefault(key, width) != width:
            raise ValueError(f"feature set {key} changed width: {self.widths[key]} -> {width}")
        with open(self.folder / key, "ab") as handle:
            handle.write(rows.to(torch.float32).contiguous().numpy().tobytes())

    def batches(self, key: str) -> Iterator[torch.Tensor]:
        """File `key` back, batch by batch, as float32 [tokens, width]."""
        width, total = self.widths[key], sum(self.batch_rows)
        rows = np.memmap(self.folder / key, dtype=np.float32, mode="r", shape=(total, width))
        start = 0
        for count in self.batch_rows:
            yield torch.from_numpy(np.array(rows[start : start + count]))  # a copy, not the map
            start += count


def record(
    model: PreTrainedModel,
    batches: Sequence[dict[str, torch.Tensor]],
    features: Features,
    folder: Path,
    *,
    description: str,
    progress: bool,
) -> FeatureFiles:
    """Run `model` on every batch and write the [tokens, width] feature sets `features` yields
    (one at a time: only the model's captured activations are held whole)."""
    files = FeatureFiles(folder)
    for batch in track(batches, description=description, enabled=progress):
        counts = set()
        for key, rows in features(model, batch):
            files.append(key, rows)
            counts.add(int(rows.shape[0]))
        if len(counts) != 1:
            raise ValueError(f"feature sets of one batch hold different token counts: {counts}")
        files.batch_rows.append(counts.pop())
    return files


def record_one_at_a_time(
    loaders: tuple[Callable[[], PreTrainedModel], Callable[[], PreTrainedModel]],
    batches: Sequence[dict[str, torch.Tensor]],
    features: Features,
    folder: Path,
    *,
    progress: bool,
) -> tuple[FeatureFiles, FeatureFiles]:
    """A's feature files, then B's, each model loaded, run and freed before the next."""
    return_freed_blocks()  # offloaded layers come and go: see tensors/malloc.py
    recorded = []
    for side, load in zip("ab", loaders, strict=True):
        model = load()
        recorded.append(
            record(
                model,
                batches,
                features,
                folder / side,
                description=f"activations of {side.upper()}",
                progress=progress,
            )
        )
        del model
        trim_heap()
    return recorded[0], recorded[1]


def cross_stats(files_a: FeatureFiles, files_b: FeatureFiles, keys: Sequence[str]) -> CrossStats:
    """The float64 sums of A's against B's feature sets `keys` (one statistic, fed by each),
    added batch by batch in the paired run's order."""
    stats = CrossStats(files_a.widths[keys[0]], files_b.widths[keys[0]])
    streams = [zip(files_a.batches(k), files_b.batches(k), strict=True) for k in keys]
    for rows in zip(*streams, strict=True):  # one batch of every key
        for rows_a, rows_b in rows:
            stats.update(rows_a, rows_b)
    return stats


class StoredParts(Mapping[tuple[str, str], CrossStats]):
    """(group, part) -> its statistics, summed from the files when asked for (not kept)."""

    def __init__(
        self,
        files: tuple[FeatureFiles, FeatureFiles],
        keys: Mapping[tuple[str, str], Sequence[str]],
    ) -> None:
        self._files = files
        self._keys = keys

    def __getitem__(self, part: tuple[str, str]) -> CrossStats:
        return cross_stats(*self._files, self._keys[part])

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class StoredResidual(Sequence[CrossStats]):
    """Hidden state i -> its statistics, summed from the files when asked for (not kept)."""

    def __init__(self, files: tuple[FeatureFiles, FeatureFiles], keys: list[str]) -> None:
        self._files = files
        self._keys = keys

    def __getitem__(self, index: int) -> CrossStats:  # type: ignore[override]
        return cross_stats(*self._files, [self._keys[index]])

    def __len__(self) -> int:
        return len(self._keys)


__all__ = [
    "FeatureFiles",
    "Features",
    "StoredParts",
    "StoredResidual",
    "cross_stats",
    "record",
    "record_one_at_a_time",
]

"""One model's tensors as weight matching reads them: by name, one at a time, in float64 chunks.

Weight matching never holds a model whole. A `Weights` reads a tensor when asked for it, in its
stored dtype (from a checkpoint on disk, or from a state dict already in memory), and knows every
tensor's shape and size beforehand, so the memory a matching needs is known before any weight is
read. Products of two tensors convert them to float64 a block of columns at a time
(`row_chunks`), so the float64 working set is a few `CHUNK_ELEMENTS` blocks, whatever the tensor.
Blocks are float64 arithmetic on the stored values, and the LAPs' similarities stay float64.
float32 products would be about twice as fast (a 5632 x 2048 x 5632 product: 1.1 s against 2.1 s
in float64 on the 2-core development VM), but a 1.1B sweep's products, about 13 TFLOP, take about
four minutes in float64 at that rate, inside the 15-minute target, so float32 is not used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

from hfmerge.tensors import TensorInfo

# float64 elements of one side's converted block (32 MiB): large enough for full-speed GEMMs, small
# beside the similarity matrices they are summed into.
CHUNK_ELEMENTS = 1 << 22
F64 = 8


class Weights(Mapping[str, torch.Tensor]):
    """Tensors by name, each read when asked for: on the CPU, in its stored dtype.

    Build one with `of` (a state dict) or `from_headers` (a checkpoint's reader and headers).
    Reading the same name twice reads it twice; nothing is cached.
    """

    def __init__(
        self,
        read: Callable[[str], torch.Tensor],
        shapes: Mapping[str, tuple[int, ...]],
        nbytes: Mapping[str, int],
    ) -> None:
        self._read = read
        self._shapes = dict(shapes)
        self._nbytes = dict(nbytes)

    @classmethod
    def of(cls, params: Mapping[str, torch.Tensor]) -> Weights:
        """`params` itself if it is a `Weights`, else a view of the state dict (nothing copied)."""
        if isinstance(params, Weights):
            return params
        return cls(
            lambda name: params[name].detach().to(device="cpu"),
            {name: tuple(t.shape) for name, t in params.items()},
            {name: t.numel() * t.element_size() for name, t in params.items()},
        )

    @classmethod
    def from_headers(
        cls,
        read: Callable[[str], torch.Tensor],
        info: Callable[[str], TensorInfo],
        names: Iterable[str],
    ) -> Weights:
        """Tensors `names`, each read by `read`; shapes and sizes from the headers (`info`)."""
        infos = [info(name) for name in names]
        return cls(
            read,
            {i.name: tuple(i.shape) for i in infos},
            {i.name: i.nbytes for i in infos},
        )

    def subset(self, names: Iterable[str]) -> Weights:
        """The tensors `names` only, read as these are (nothing read now)."""
        kept = list(names)
        return Weights(
            self._read, {n: self._shapes[n] for n in kept}, {n: self._nbytes[n] for n in kept}
        )

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name`, without reading it."""
        return self._shapes[name]

    def nbytes(self, name: str) -> int:
        """Bytes of tensor `name` in its stored dtype, without reading it."""
        return self._nbytes[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._shapes:
            raise KeyError(name)
        return self._read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, name: object) -> bool:
        return name in self._shapes


def axis_rows(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    """The tensor with `axis` first, flattened behind it: [axis_len, rest] (a view for 2-d)."""
    moved = tensor.movedim(axis, 0)  # [..., axis_len, ...] -> [axis_len, ...]
    return moved.reshape(tensor.shape[axis], -1)  # [axis_len, ...] -> [axis_len, rest]


def column_blocks(rows: torch.Tensor) -> Iterator[torch.Tensor]:
    """A [axis_len, rest] matrix as float64 blocks of columns [axis_len, cols], one at a time."""
    length, rest = rows.shape
    step = max(1, CHUNK_ELEMENTS // max(1, length))
    for start in range(0, rest, step):
        yield rows[:, start : start + step].to(torch.float64)  # [axis_len, cols]


def row_chunks(
    rows_a: torch.Tensor, rows_b: torch.Tensor
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Two [axis_len, rest] matrices as matching float64 blocks of columns [axis_len, cols].

    Anything linear in the columns (a Gram matrix `a @ b.T`, a sum of products) is the sum of its
    values over the blocks.
    """
    return zip(column_blocks(rows_a), column_blocks(rows_b), strict=True)


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """`sum(a * b)` over every element, in float64, a chunk at a time."""
    flat_a, flat_b = a.reshape(1, -1), b.reshape(1, -1)  # [...] -> [1, numel]
    return sum(
        float(torch.dot(chunk_a[0], chunk_b[0])) for chunk_a, chunk_b in row_chunks(flat_a, flat_b)
    )


def square_sums(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    """Squared entries summed over every axis but `axis`, in float64: [axis_len]."""
    rows = axis_rows(tensor, axis)  # [axis_len, rest]
    total = torch.zeros(rows.shape[0], dtype=torch.float64)
    for chunk in column_blocks(rows):
        total += chunk.square().sum(dim=1)  # [axis_len, cols] -> [axis_len]
    return total

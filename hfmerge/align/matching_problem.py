"""Weight matching's similarities, summed from both models' tensors read one at a time.

A group's similarity sums, over every (tensor, axis) of B it acts on (a `Touch`), the Gram matrix
of A's rows against B's rows on that axis, B's other axes gathered by the other groups' current
permutations. Each touched tensor is read in its stored dtype, its other axes gathered (exact in
any dtype), and multiplied in float64 blocks of columns (`weights.row_chunks`), added in place
into the similarity; then it is dropped. No model is ever held whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from hfmerge.align.attention import HeadBlocks, head_blocks, head_slices, part_heads
from hfmerge.align.expert_order import slot_name
from hfmerge.align.weights import Weights, axis_rows, dot, row_chunks
from hfmerge.arch.permute import permute_tensor, read_permuted, unit_rows
from hfmerge.arch.spec import ArchSpec, AxisRole, PermGroup, Permutations

# part -> [units_a, units_b] head-major similarity (heads*head_dim on each side) of one group
HeadGrams = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Touch:
    """One axis of one of B's tensors that a group acts on."""

    tensor: str
    axis: int
    role: AxisRole
    static: bool  # no other axis is permuted, nor is it an expert's: its contribution never changes


def group_touches(spec: ArchSpec, names: list[str]) -> dict[str, list[Touch]]:
    """Every (tensor, axis) that each group acts on, by group name."""
    out: dict[str, list[Touch]] = {name: [] for name in spec.groups}
    for name in names:
        tensor = spec.tensors[name]
        for axis, role in enumerate(tensor.axes):
            if role is None:
                continue
            others = [r for i, r in enumerate(tensor.axes) if i != axis and r is not None]
            static = not others and tensor.expert is None
            out[role.group].append(Touch(name, axis, role, static=static))
    return out


def plain_zeros(size: int) -> torch.Tensor:
    """An empty [size, size] similarity to add into."""
    return torch.zeros(size, size, dtype=torch.float64)


def grams_to_blocks(group: PermGroup, grams: HeadGrams) -> HeadBlocks:
    """Each part's head-major similarity as the attention solver's per-head blocks."""
    return {
        part: head_blocks(gram, heads=part_heads(group, part), head_dim=group.head_dim)
        for part, gram in grams.items()
    }


@dataclass
class Problem:
    """Both models' tensors (read on demand) and the spec; B is permuted on the fly, never stored.

    `names` are the matched tensors (buffers left out).
    """

    spec: ArchSpec
    a: Weights
    b: Weights
    names: list[str]

    def a_rows(self, touch: Touch, perms: Permutations) -> torch.Tensor:
        """A's tensor that B's touched one meets (an expert's: its slot's): [axis_len, rest]."""
        return axis_rows(self.a[slot_name(touch.tensor, self.spec, perms)], touch.axis)

    def b_rows(self, touch: Touch, perms: Permutations) -> torch.Tensor:
        """B's tensor with every axis but the touched one permuted: [axis_len, rest]."""
        tensor_spec = self.spec.tensors[touch.tensor]
        others = tuple(None if i == touch.axis else r for i, r in enumerate(tensor_spec.axes))
        moved = permute_tensor(
            self.b[touch.tensor], replace(tensor_spec, axes=others), self.spec, perms
        )
        return axis_rows(moved, touch.axis)

    def chunks(
        self, touch: Touch, perms: Permutations
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A's and B's rows of one touch in matching float64 blocks of columns."""
        return row_chunks(self.a_rows(touch, perms), self.b_rows(touch, perms))

    def add_plain(self, total: torch.Tensor, touches: list[Touch], perms: Permutations) -> None:
        """Add the touches' [size, size] similarity of A's units (rows) to B's (columns)."""
        for touch in touches:
            for chunk_a, chunk_b in row_chunks(
                self.a_rows(touch, perms), self.b_rows(touch, perms)
            ):
                rows_a = unit_rows(chunk_a, touch.role.layout)  # [units, cols']
                rows_b = unit_rows(chunk_b, touch.role.layout)  # [units, cols']
                total.addmm_(rows_a, rows_b.T)

    def add_heads(
        self, grams: HeadGrams, group: PermGroup, touches: list[Touch], perms: Permutations
    ) -> None:
        """Add the touches' head-major similarity of each attention part into `grams`."""
        for touch in touches:
            where = {
                part: rows.reshape(-1)  # [heads, head_dim] -> [heads*head_dim]
                for part, rows in head_slices(group, touch.role.layout).items()
            }
            for chunk_a, chunk_b in row_chunks(
                self.a_rows(touch, perms), self.b_rows(touch, perms)
            ):
                for part, index in where.items():
                    if part not in grams:
                        grams[part] = plain_zeros(len(index))
                    grams[part].addmm_(chunk_a[index], chunk_b[index].T)

    def objective(self, perms: Permutations) -> float:
        """<W_A, P(W_B)> over every matched tensor."""
        return sum(
            dot(self.a[name], read_permuted(name, self.b.__getitem__, self.spec, perms))
            for name in self.names
        )

"""A `slices:` merge planned tensor by tensor: output blocks stacked from the models' block ranges.

Output block `k` comes from one block of each source of the slice that covers it: its tensors are
read under the source's block index and written under `k`. Tensors outside the blocks come from
the first slice's sources (embeddings: the input side) or the last slice's (final norm, head), as
mergekit takes them. Every name and shape is checked from the headers, before any weight is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hfmerge.arch.layers import layer_of
from hfmerge.engine.plan import (
    DTYPE_CODES,
    FLOAT_CODES,
    MergePlan,
    TensorJob,
    TensorRead,
)
from hfmerge.errors import ArchitectureError, IncompatibleModelsError, RecipeError, RecipeProblem
from hfmerge.methods import MergeMethod
from hfmerge.methods.schedule import ParamSchedule
from hfmerge.sources.inspection import InspectedModel
from hfmerge.tensors import plan_shards

# Names of the tensors on the input side of the blocks (token and position embeddings).
_INPUT_SIDE = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type")


@dataclass(frozen=True)
class SliceSourceRange:
    """One source of a slice: a model (an index into `MergePlan.readers`) and its blocks
    `[start, stop)`."""

    model: int
    start: int
    stop: int


@dataclass(frozen=True)
class PlannedSlice:
    """One slice: its sources, which of them is the base (None without one), its settings."""

    sources: tuple[SliceSourceRange, ...]
    base: int | None
    schedule: ParamSchedule

    @property
    def length(self) -> int:
        """How many output blocks the slice makes."""
        return self.sources[0].stop - self.sources[0].start


@dataclass(frozen=True)
class _Stack:
    """The block stack of the models: its name prefix and each model's blocks' name suffixes."""

    prefix: str  # "model.layers"
    suffixes: list[dict[int, list[str]]]  # per reader: block index -> suffixes, in header order


def build_slice_plan(
    method: MergeMethod,
    slices: Sequence[PlannedSlice],
    *,
    base: InspectedModel,
    inputs: Sequence[InspectedModel],
    out_dtype: str | None,
    max_shard_bytes: int,
) -> MergePlan:
    """Plan every output tensor of a `slices:` merge.

    Raises:
        RecipeError: a block range goes past a model's last block.
        IncompatibleModelsError: the sources of a slice differ in a tensor's name or shape.
        ArchitectureError: the models have no block stack, or more than one.
    """
    readers = [base, *inputs]
    stack = _block_stack(readers)
    _check_ranges(slices, readers, stack)
    first, last = slices[0], slices[-1]
    outside = [n for n in base.index.names if layer_of(n) is None]
    jobs = [_job(readers, first, n, n, 0.0, out_dtype) for n in outside if _input_side(n)]
    block = 0
    for planned in slices:
        for offset in range(planned.length):
            t = offset / (planned.length - 1) if planned.length > 1 else 1.0
            jobs += _block_jobs(readers, stack, planned, offset, block, t, out_dtype)
            block += 1
    jobs += [_job(readers, last, n, n, 0.0, out_dtype) for n in outside if not _input_side(n)]
    shards = plan_shards(jobs, max_shard_bytes=max_shard_bytes)
    return MergePlan(method=method, base=base, inputs=list(inputs), jobs=jobs, shards=shards)


def output_blocks(slices: Sequence[PlannedSlice]) -> list[tuple[int, int]]:
    """(reader, block index) that each output block comes from (the slice's first source)."""
    return [
        (planned.sources[0].model, planned.sources[0].start + offset)
        for planned in slices
        for offset in range(planned.length)
    ]


def _input_side(name: str) -> bool:
    return any(part in name for part in _INPUT_SIDE)


def _block_stack(readers: Sequence[InspectedModel]) -> _Stack:
    prefixes = set()
    suffixes: list[dict[int, list[str]]] = []
    for model in readers:
        blocks: dict[int, list[str]] = {}
        for name in model.index.names:
            where = layer_of(name)
            if where is not None:
                prefixes.add(where[0])
                blocks.setdefault(where[1], []).append(name[len(f"{where[0]}.{where[1]}.") :])
        suffixes.append(blocks)
    if len(prefixes) != 1:
        found = ", ".join(sorted(prefixes)) or "none"
        raise ArchitectureError(
            readers[0].label,
            f"`slices:` stack blocks of one block stack, and these models have {found}",
            fix="use `models:` to merge whole models of this architecture",
        )
    return _Stack(prefixes.pop(), suffixes)


def _check_ranges(
    slices: Sequence[PlannedSlice], readers: Sequence[InspectedModel], stack: _Stack
) -> None:
    problems = []
    for index, planned in enumerate(slices):
        for number, source in enumerate(planned.sources):
            depth = len(stack.suffixes[source.model])
            if source.stop > depth:
                label = readers[source.model].label
                problems.append(
                    RecipeProblem(
                        f"slices.{index}.sources.{number}.layer_range",
                        f"[{source.start}, {source.stop}] goes past {label}'s last block: it has "
                        f"{depth} (0 to {depth - 1}); give a STOP of at most {depth}",
                    )
                )
    if problems:
        raise RecipeError("the recipe's slices", problems)


def _block_jobs(
    readers: Sequence[InspectedModel],
    stack: _Stack,
    planned: PlannedSlice,
    offset: int,
    block: int,
    t: float,
    out_dtype: str | None,
) -> list[TensorJob]:
    """The jobs of output block `block`: block `start + offset` of each source."""
    indices = [source.start + offset for source in planned.sources]
    suffix_sets = [
        stack.suffixes[s.model][i] for s, i in zip(planned.sources, indices, strict=True)
    ]
    reference = suffix_sets[0]
    for source, index, suffixes in zip(planned.sources, indices, suffix_sets, strict=True):
        if set(suffixes) != set(reference):
            first = planned.sources[0]
            raise IncompatibleModelsError(
                f"{readers[first.model].label} block {indices[0]}",
                f"{readers[source.model].label} block {index}",
                [f"tensor {s} only in one of them" for s in sorted(set(suffixes) ^ set(reference))],
            )
    return [
        _job(
            readers,
            planned,
            f"{stack.prefix}.{block}.{suffix}",
            [f"{stack.prefix}.{i}.{suffix}" for i in indices],
            t,
            out_dtype,
        )
        for suffix in reference
    ]


def _job(
    readers: Sequence[InspectedModel],
    planned: PlannedSlice,
    out_name: str,
    read_names: str | Sequence[str],
    t: float,
    out_dtype: str | None,
) -> TensorJob:
    """One output tensor from the slice's sources (the names each is read under)."""
    names = [read_names] * len(planned.sources) if isinstance(read_names, str) else read_names
    reads = [TensorRead(s.model, n) for s, n in zip(planned.sources, names, strict=True)]
    infos = [readers[r.model].index.info(r.name) for r in reads]
    shapes = {tuple(info.shape) for info in infos}
    if len(shapes) > 1:
        listing = [
            f"{readers[r.model].label} {r.name}: {list(i.shape)}"
            for r, i in zip(reads, infos, strict=True)
        ]
        raise IncompatibleModelsError(
            readers[reads[0].model].label,
            readers[reads[1].model].label,
            [
                f"output tensor {out_name} would merge tensors of different shapes: "
                + "; ".join(listing)
            ],
        )
    shape, dtype = tuple(infos[0].shape), infos[0].dtype
    base_read = reads[planned.base] if planned.base is not None else None
    if dtype not in FLOAT_CODES:
        return TensorJob(
            out_name, shape, dtype, "copy", f"{dtype} is not a float type", base_read=reads[0]
        )
    others = tuple(r for i, r in enumerate(reads) if i != planned.base)
    return TensorJob(
        out_name,
        shape,
        DTYPE_CODES[out_dtype] if out_dtype else dtype,
        "merge",
        "parameter",
        params=planned.schedule.at(out_name, t),
        reads=others,
        base_read=base_read,
    )

"""Runs a merge plan: tensor by tensor, chunk by chunk, from every input through the method into
the shards, with reads ahead and writes behind on their own threads (`engine/io_threads.py`).

Each tensor is cut into row chunks (`engine/budget.py` sizes them; whole tensors for methods with
no chunked form). A method that needs per-tensor statistics (TIES's magnitude cut) sees the chunks
once per statistics pass before the pass that produces output. Nothing holds a whole model, and
the float32 temporaries are bounded by the chunk size, not the tensor size. Element-wise merges on
a multi-core CPU split the tensors between two processes (`engine/procs.py`); the others split
each chunk's rows between two threads (`engine/compute.py`). Every float chunk read and every
merged chunk is checked for NaN and Inf on the way (`engine/finite.py`): an error at the end of the
tensor, before the output is renamed into place, unless the run allows them.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from hfmerge.arch.residual import FOLDED, BasisMap
from hfmerge.engine import finite
from hfmerge.engine.aligned import AlignedReader
from hfmerge.engine.budget import ChunkPolicy, chunk_policy
from hfmerge.engine.compute import RowSplitter, apply_in_pieces
from hfmerge.engine.io_threads import Acquire, Prefetcher, WriteBehind
from hfmerge.engine.plan import MergePlan, TensorJob, TensorRead
from hfmerge.engine.procs import ForkedShare, process_count, split_jobs
from hfmerge.engine.tuning import DEFAULT_TUNING, EngineTuning
from hfmerge.errors import MethodParameterError
from hfmerge.methods.chunks import Chunk, TensorMerge
from hfmerge.progress import counter
from hfmerge.runtime import capped_threads, resolve_device
from hfmerge.sources.readers import open_reader
from hfmerge.tensors import ShardWriter, TensorReader, element_size, torch_dtype
from hfmerge.tensors.malloc import keep_chunk_buffers


def execute_plan(
    plan: MergePlan,
    out_dir: Path,
    *,
    seed: int = 0,
    input_bases: Sequence[BasisMap | None] | None = None,
    progress: bool = True,
    max_memory_bytes: int | None = None,
    device: str | torch.device | None = None,
    tuning: EngineTuning = DEFAULT_TUNING,
    allow_non_finite: bool = False,
) -> list[finite.NonFiniteFinding]:
    """Write every planned tensor into `out_dir` (shards + index); what non-finite values were
    found, when allowed (each also listed in a warning on stderr).

    Args:
        plan: the merge plan; each merged tensor's job holds its parameters.
        out_dir: directory to write the shards into.
        seed: seed of random methods (DARE, DELLA); each tensor draws from its own generator.
        input_bases: `input_bases[i]`, when given, maps input i's tensors on read (alignment
            into the base's basis), so aligned copies of the inputs are never materialised. When
            one folds the norm gains (orthogonal alignment), the base is read folded too.
        progress: draw a progress bar on stderr.
        max_memory_bytes: peak resident memory to stay within, summed over the merging
            processes; chunks and queues are sized from it. None: `tuning`'s chunk sizes (by
            default 1M elements, 4M for element-wise merges), about 100 MB of buffers per
            process for two models.
        device: where the arithmetic runs; None picks CUDA when available, else the CPU.
        tuning: chunk, queue, piece, thread and process sizes (`engine/tuning.py`).
        allow_non_finite: merge NaN and Inf values (inputs or output) with a warning instead of
            raising `NonFiniteWeightsError`.

    Raises:
        HfMergeError: `max_memory_bytes` is too small for one chunk of some tensor.
        NonFiniteWeightsError: an input tensor, or a merged one, holds NaN or Inf values (and
            `allow_non_finite` is False); raised once that tensor is done, so its counts are
            whole, and before the caller renames the output into place.
    """
    compute_device = resolve_device(device)
    elementwise = _merges_elementwise(plan)
    processes = process_count(elementwise=elementwise, device=compute_device, tuning=tuning)
    policy = chunk_policy(
        plan, max_memory_bytes, tuning=tuning, elementwise=elementwise, processes=processes
    )
    keep_chunk_buffers()
    bases = list(input_bases) if input_bases is not None else [None] * len(plan.inputs)
    share = _Share(
        plan,
        policy,
        seed=seed,
        device=compute_device,
        bases=bases,
        tuning=tuning,
        allow_non_finite=allow_non_finite,
    )
    own, *others = split_jobs(plan.jobs, policy.processes)
    with (
        ShardWriter(out_dir, plan.shards, metadata={"merged_by": "hfmerge"}) as writer,
        counter(description="merging tensors", total=len(plan.jobs), enabled=progress) as advance,
        ExitStack() as children,
    ):
        run = functools.partial(share.run, writer)
        forked = [
            children.enter_context(ForkedShare(jobs, run, advance)) for jobs in others if jobs
        ]

        def on_job() -> None:
            advance(1)
            for child in forked:
                child.check()  # a child's error stops the parent too

        found = list(run(own, on_job).non_finite)
        for child in forked:
            result = child.wait()
            writer.record_written(result.written)
            found += result.non_finite
    finite.warn_non_finite(found)  # after the progress bar, not through it
    return found


@dataclass(frozen=True)
class _ShareResult:
    """What one process's share reports: the names it wrote and the non-finite values it
    found (allowed ones; otherwise it raised)."""

    written: frozenset[str]
    non_finite: tuple[finite.NonFiniteFinding, ...]


@dataclass(frozen=True)
class _Share:
    """Merges a share of the plan's tensors into the writer's files: the whole plan in one
    process, or one process's share (`engine/procs.py`)."""

    plan: MergePlan
    policy: ChunkPolicy
    seed: int
    device: torch.device
    bases: Sequence[BasisMap | None]
    tuning: EngineTuning
    allow_non_finite: bool

    def run(
        self, writer: ShardWriter, jobs: list[TensorJob], on_job: Callable[[], None]
    ) -> _ShareResult:
        """Merge `jobs` (in plan order) into `writer`, calling `on_job()` after each; the names
        `writer` holds as written, and the non-finite values found."""
        plan = replace(self.plan, jobs=jobs)
        steps = _Steps(
            plan,
            self.policy,
            seed=self.seed,
            device=self.device,
        )
        with ExitStack() as stack:
            # Folded inputs only add up with a folded base (task vectors, copied tensors).
            folds = any(b is not None and b.fold for b in self.bases)
            steps.readers = [
                AlignedReader(open_reader(stack, plan.base), plan.base.spec, FOLDED)
                if folds
                else open_reader(stack, plan.base),
                *(
                    AlignedReader(open_reader(stack, m), m.spec, b)
                    for m, b in zip(plan.inputs, self.bases, strict=True)
                ),
            ]
            # The reader and writer threads take the other core's share on small machines, and
            # two teams spinning on two cores slow each other down: the main thread and its
            # helpers share a chunk's rows instead (`engine/compute.py`).
            stack.enter_context(capped_threads(self.tuning.compute_threads))
            splitter = stack.enter_context(RowSplitter.for_device(steps.device, self.tuning))
            behind = stack.enter_context(WriteBehind(writer.write_part, self.policy.write_bytes))
            ahead = stack.enter_context(Prefetcher(steps.produce, self.policy.read_bytes))
            tally = finite.FiniteTally(allow=self.allow_non_finite, method=plan.method.name)
            pending = iter(ahead)
            for job in jobs:
                for step, size in pending:
                    job_end = step.job_end
                    _run_step(step, behind, splitter, self.tuning, tally)
                    del step  # free the chunk before the reader may read the next one
                    ahead.done(size)
                    if job_end:
                        break
                tally.end_tensor(job.name)  # raises for non-finite values, unless allowed
                on_job()
        return _ShareResult(writer.written, tuple(tally.found))


def _merges_elementwise(plan: MergePlan) -> bool:
    """Whether every merged tensor of the plan merges element-wise (linear, task arithmetic).

    Asked of each tensor, not only the first: a method's parameters may change a tensor's kind
    (a task-vector method with `rank` merges its matrices whole, its norms element-wise), and
    `ChunkPolicy.rows_per_chunk` refuses a merge with temporaries under an element-wise policy.
    """
    merged = [job for job in plan.jobs if job.action == "merge" and job.params is not None]
    return bool(merged) and all(_job_elementwise(plan, job) for job in merged)


def _job_elementwise(plan: MergePlan, job: TensorJob) -> bool:
    assert job.params is not None
    merge = plan.method.tensor_merge(
        job.shape,
        model_params=job.params.models,
        params=job.params.method,
        generator=torch.Generator(),
        device=torch.device("cpu"),
    )
    return merge.elementwise


@dataclass
class _Step:
    """One chunk of one pass over one tensor, read and ready for the main thread."""

    job: TensorJob
    merge: TensorMerge | None  # None: a copy, `tensors` holds the base's raw rows
    pass_index: int
    tensors: list[torch.Tensor]
    base: torch.Tensor | None
    first: int  # flat index of the chunk's first element
    whole: bool
    pass_end: bool
    job_end: bool
    # Non-finite counts of the chunk's inputs, found on the reader thread, by model label.
    non_finite: tuple[tuple[str, finite.NonFiniteCount], ...] = ()
    labels: Sequence[str] = ()  # the models of `tensors` and then `base`


class _Steps:
    """Produces every step of the plan in order, on the reader thread."""

    def __init__(
        self,
        plan: MergePlan,
        policy: ChunkPolicy,
        *,
        seed: int,
        device: torch.device,
    ) -> None:
        self.plan = plan
        self.policy = policy
        self.seed = seed
        # Random methods stay on the CPU: their masks come from a CPU generator, so the merged
        # model is the same on every machine.
        self.device = device if plan.method.deterministic else torch.device("cpu")
        # Indexed by `TensorRead.model`: the base, then the inputs (set by `_Share.run`).
        self.readers: list[TensorReader | AlignedReader] = []
        self._vocab: tuple[str, dict[int, torch.Tensor]] | None = None  # the last remapped job

    def produce(self, acquire: Acquire) -> Iterator[tuple[_Step, int]]:
        """Every step with its input bytes, reading each chunk after `acquire` admits it."""
        for job in self.plan.jobs:
            if job.action == "copy":
                yield from self._copy(job, acquire)
            else:
                yield from self._merge(job, acquire)

    def _ranges(self, job: TensorJob, *, whole: bool, elementwise: bool) -> list[tuple[int, int]]:
        rows = job.shape[0] if job.shape else 1
        step = self.policy.rows_per_chunk(job, whole=whole, elementwise=elementwise)
        return [(s, min(s + step, rows)) for s in range(0, rows, step)] or [(0, 0)]

    def _labels(self, job: TensorJob) -> list[str]:
        """The models of `_read`'s tensors for `job`, then the base's."""
        readers = self.plan.readers
        labels = [readers[read.model].label for read in job.sources(len(self.plan.inputs))]
        base = [readers[job.base_source().model].label] if self.plan.method.needs_base else []
        return [*labels, *base]

    def _copy(self, job: TensorJob, acquire: Acquire) -> Iterator[tuple[_Step, int]]:
        source = job.base_source()
        label = self.plan.readers[source.model].label
        ranges = self._ranges(job, whole=False, elementwise=True)  # a copy has no temporaries
        row_bytes = _row_elements(job) * element_size(job.dtype)
        for start, stop in ranges:
            size = (stop - start) * row_bytes
            acquire(size)
            # as stored, or in float32 where the model's adapter changes it
            rows = self.readers[source.model].get_rows(source.name, start, stop)
            raw = rows.to(torch_dtype(job.dtype))
            last = stop == ranges[-1][1]
            step = _Step(job, None, 0, [raw], None, start * _row_elements(job), False, last, last)
            step.non_finite = finite.check_sources([label], [raw])  # copied as it is
            yield step, size

    def _merge(self, job: TensorJob, acquire: Acquire) -> Iterator[tuple[_Step, int]]:
        method = self.plan.method
        assert job.params is not None  # the plan gives every merged tensor its parameters
        merge = method.tensor_merge(
            job.shape,
            model_params=job.params.models,
            params=job.params.method,
            # A per-tensor seed keeps random methods reproducible in any tensor order.
            generator=torch.Generator().manual_seed(self.seed + zlib.crc32(job.name.encode())),
            device=self.device,
        )
        ranges = self._ranges(job, whole=merge.whole_only, elementwise=merge.elementwise)
        rows = job.shape[0] if job.shape else 1
        labels = self._labels(job)
        loaded = len(labels)
        for pass_index in range(merge.passes + 1):
            for start, stop in ranges:
                size = (stop - start) * _row_elements(job) * loaded * 4
                acquire(size)
                tensors, base = self._read(job, start, stop, raw=merge.elementwise)
                end = stop == ranges[-1][1]
                # Element-wise merges check their float32 pieces (`apply_in_pieces`); the
                # others the float32 chunk here, once, beside the main thread's math.
                check = pass_index == 0 and not merge.elementwise
                sources = [*tensors, *([] if base is None else [base])]
                step = _Step(
                    job,
                    merge,
                    pass_index,
                    tensors,
                    base,
                    first=start * _row_elements(job),
                    whole=start == 0 and stop == rows,
                    pass_end=end,
                    job_end=end and pass_index == merge.passes,
                    non_finite=finite.check_sources(labels, sources) if check else (),
                    labels=labels,
                )
                yield step, size

    def _read(
        self, job: TensorJob, start: int, stop: int, *, raw: bool
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        # float32 on the compute device, converted here so the cast overlaps the main thread's
        # math; element-wise merges convert piece by piece themselves (`raw`).
        convert = self._on_device if raw else self._float
        reads = list(job.sources(len(self.plan.inputs)))
        if self.plan.method.needs_base:
            reads.append(job.base_source())
        if job.vocab:
            remapped = self._remapped(job, reads)
            rows = [convert(remapped[read.model][start:stop]) for read in reads]
        else:
            rows = [
                convert(self.readers[read.model].get_rows(read.name, start, stop)) for read in reads
            ]
        if self.plan.method.needs_base:
            return rows[:-1], rows[-1]
        return rows, None

    def _remapped(self, job: TensorJob, reads: Sequence[TensorRead]) -> dict[int, torch.Tensor]:
        """Every read model's whole tensor on the output vocabulary, float32 (kept for the
        job's next chunks)."""
        if self._vocab is None or self._vocab[0] != job.name:
            assert self.plan.vocab is not None  # the plan flags vocab jobs only with a plan
            self._vocab = None  # free the last one first
            whole = {}
            for read in reads:
                model = self.plan.readers[read.model]  # a tied head has the rows of its tensor
                rows = model.index.info(model.spec.tied.get(read.name, read.name)).shape[0]
                tensor = self.readers[read.model].get_rows(read.name, 0, rows)
                whole[read.model] = tensor.to(torch.float32)
            self._vocab = (job.name, self.plan.vocab.remap(whole))
        return self._vocab[1]

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device)

    def _float(self, tensor: torch.Tensor) -> torch.Tensor:
        # Arithmetic in float32 whatever the storage dtype: bf16 sums lose digits fast.
        return tensor.to(self.device).to(torch.float32)


def _run_step(
    step: _Step,
    behind: WriteBehind,
    splitter: RowSplitter,
    tuning: EngineTuning,
    tally: finite.FiniteTally,
) -> None:
    """Merge, observe or copy one chunk; merged and copied rows go to the writer thread, their
    non-finite values (and the inputs') to `tally`."""
    name = step.job.name
    for label, count in step.non_finite:
        tally.add(label, count)
    if step.merge is None:
        behind.put(name, step.first, step.tensors[0])
        return
    chunk = Chunk(step.tensors, step.base, step.first, step.whole)
    if step.pass_index < step.merge.passes:
        splitter.observe(step.merge, step.pass_index, chunk)
        if step.pass_end:
            step.merge.end_pass(step.pass_index)
        return
    dtype = torch_dtype(step.job.dtype)
    if step.merge.elementwise:  # read in its storage dtype (`_Steps._read`); flat parts
        sources = [*chunk.tensors, *([] if chunk.base is None else [chunk.base])]
        on_non_finite = functools.partial(tally.add_part, step.labels, sources)
        for first, part in apply_in_pieces(step.merge, chunk, dtype, tuning, on_non_finite):
            behind.put(name, first, part.cpu())
        return
    try:
        parts = splitter.apply(step.merge, chunk, dtype)
    except MethodParameterError as error:  # e.g. multislerp's cancelling directions
        raise error.in_tensor(name) from None
    expected = tuple(step.tensors[0].shape) if step.tensors else step.job.shape
    got = _joined_shape([part for _, part in parts])
    if got != expected:
        raise RuntimeError(f"method returned shape {got} for {name}, expected {expected}")
    for first, part in parts:
        tally.add(None, finite.check_chunk(part))
        behind.put(name, first, part.cpu())


def _joined_shape(parts: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """The shape of `parts` stacked along rows (one part: its own shape, 0-d included)."""
    if len(parts) == 1:
        return tuple(parts[0].shape)
    return (sum(p.shape[0] for p in parts), *parts[0].shape[1:])


def _row_elements(job: TensorJob) -> int:
    return math.prod(job.shape[1:]) if job.shape else 1

"""Recipe + inspected models -> a per-tensor merge plan (pure data), printed by `--dry-run`.

The plan is made from headers alone: for every output tensor, its shape, its output dtype and what
happens to it (merged by the method, or copied from the base), plus the output shard layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from hfmerge.arch.layers import layer_of
from hfmerge.engine.vocab import VocabPlan
from hfmerge.methods import MergeMethod
from hfmerge.methods.params import MergeParams
from hfmerge.methods.schedule import ParamSchedule
from hfmerge.methods.settings import layer_positions
from hfmerge.sources.inspection import InspectedModel
from hfmerge.sources.refs import ModelSource
from hfmerge.tensors import ShardPlan, plan_shards

# Recipe dtype names -> safetensors dtype codes.
DTYPE_CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
FLOAT_CODES = frozenset({"BF16", "F16", "F32", "F64"})

Action = Literal["merge", "copy"]


@dataclass(frozen=True)
class TensorRead:
    """One tensor a job reads: the model (an index into `MergePlan.readers`: the base, then the
    inputs) and the tensor's name in that model."""

    model: int
    name: str


@dataclass(frozen=True)
class TensorJob:
    """What happens to one output tensor.

    A plain merge reads the tensor of the same name from every input (and the base); a job of a
    `slices:` merge names what it reads in `reads` (the method's tensors) and `base_read`.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code of the output tensor
    action: Action  # "merge": through the method; "copy": taken from the base unchanged
    why: str  # one phrase for the dry-run table: why this action
    params: MergeParams | None = None  # what a "merge" job is merged with (None for a copy)
    reads: tuple[TensorRead, ...] = ()  # the method's tensors; () = every input's `name`
    base_read: TensorRead | None = None  # the base tensor, or what a copy copies; None: `name`
    vocab: bool = False  # token-indexed: each model's rows are remapped by `MergePlan.vocab`

    def sources(self, inputs: int) -> tuple[TensorRead, ...]:
        """The method's tensors, given the plan's number of inputs."""
        return self.reads or tuple(TensorRead(i + 1, self.name) for i in range(inputs))

    def base_source(self) -> TensorRead:
        """The base tensor this job reads (for a copy: the tensor it copies)."""
        return self.base_read or TensorRead(0, self.name)


@dataclass(frozen=True)
class MergePlan:
    """Every output tensor's job, the method, the inputs and the shard layout."""

    method: MergeMethod
    base: InspectedModel
    inputs: list[InspectedModel]  # the models the method combines, in recipe order
    jobs: list[TensorJob]
    shards: ShardPlan
    vocab: VocabPlan | None = None  # how token-indexed tensors follow the output vocabulary
    notes: tuple[str, ...] = ()  # what the plan does that a user should know (dropped tokens...)

    @property
    def total_bytes(self) -> int:
        """Size of the output weights."""
        return self.shards.total_bytes

    @property
    def readers(self) -> list[InspectedModel]:
        """The models that `TensorRead.model` indexes: the base, then the inputs."""
        return [self.base, *self.inputs]

    @property
    def most_reads(self) -> int:
        """The most tensors one job reads (the method's, and the base for task-vector ones)."""
        base = 1 if self.method.needs_base else 0
        return max((len(job.sources(len(self.inputs))) + base for job in self.jobs), default=base)

    @property
    def models(self) -> list[ModelSource]:
        """Every input's pinned source, the base first (as `RoutePlan.models` lists experts)."""
        return [self.base.source, *(model.source for model in self.inputs)]


def build_plan(
    schedule: ParamSchedule,
    *,
    base: InspectedModel,
    inputs: Sequence[InspectedModel],
    out_dtype: str | None,
    max_shard_bytes: int,
) -> MergePlan:
    """Plan every tensor of the base checkpoint, in the base's order.

    Args:
        schedule: the merge method with its settings; each merged tensor gets its parameters
            from it, at the tensor's relative depth in its layer stack.
        base: the model whose config, tokenizer and buffers the output takes.
        inputs: the models the method combines.
        out_dtype: recipe dtype (`bfloat16`, ...) for float tensors; None keeps the base's.
        max_shard_bytes: output shard size cap.

    Raises:
        MethodParameterError: the settings give some tensor values that do not work together.
    """
    depth = layer_positions({name: layer_of(name) for name in base.index.names})
    jobs = []
    for name in base.index.names:
        job = _job(base, name, out_dtype)
        if job.action == "merge":
            job = replace(job, params=schedule.at(name, depth[name]))
        jobs.append(job)
    shards = plan_shards(jobs, max_shard_bytes=max_shard_bytes)  # a job is TensorLike
    return MergePlan(
        method=schedule.method, base=base, inputs=list(inputs), jobs=jobs, shards=shards
    )


def untie_heads(plan: MergePlan, heads: Sequence[str], *, max_shard_bytes: int) -> MergePlan:
    """The plan with each of `heads` (tied in the base: `ArchSpec.tied`) written as a tensor of its
    own, after the others: the job of the tensor it is tied to, reading the head's name instead.

    For the orthogonal alignments, which fold the final norm's gain into the head and not into
    the embedding; every reader then reads the head through `read_in_basis`, which takes a tied
    head from the tensor it shares (the same shape and dtype).
    """
    if not heads:
        return plan
    tied, jobs = plan.base.spec.tied, {job.name: job for job in plan.jobs}
    every = [*plan.jobs, *(_untied_job(jobs[tied[head]], head) for head in heads)]
    return replace(plan, jobs=every, shards=plan_shards(every, max_shard_bytes=max_shard_bytes))


def _untied_job(shared: TensorJob, head: str) -> TensorJob:
    """The job of the tensor `head` shares, writing and reading `head` (a `slices:` job names
    what it reads; a plain one reads its own name)."""
    base_read = shared.base_read
    return replace(
        shared,
        name=head,
        why=f"tied to {shared.name}, untied by the norm fold",
        reads=tuple(replace(read, name=head) for read in shared.reads),
        base_read=None if base_read is None else replace(base_read, name=head),
    )


def _job(base: InspectedModel, name: str, out_dtype: str | None) -> TensorJob:
    info = base.index.info(name)
    shape = tuple(info.shape)
    tensor_spec = base.spec.tensors.get(name)
    if tensor_spec is not None and tensor_spec.buffer:
        return TensorJob(name, shape, info.dtype, "copy", "buffer, not a parameter")
    if info.dtype not in FLOAT_CODES:
        return TensorJob(name, shape, info.dtype, "copy", f"{info.dtype} is not a float type")
    dtype = DTYPE_CODES[out_dtype] if out_dtype else info.dtype
    return TensorJob(name, shape, dtype, "merge", "parameter")


def format_plan(plan: MergePlan) -> str:
    """A plain-text table of the plan, one line per tensor, for `--dry-run`."""
    shard_of = plan.shards.weight_map()
    width = max(len(j.name) for j in plan.jobs)
    lines = [
        f"method {plan.method.name} over {_count(len(plan.inputs), 'model')} "
        f"({', '.join(m.label for m in plan.inputs)}), base {plan.base.label}",
        f"{len(plan.jobs)} tensors, {plan.total_bytes / 1e6:.1f} MB in "
        f"{len(plan.shards.shards)} shard(s)",
        f"{'tensor':<{width}}  {'shape':<18} {'dtype':<5} {'action':<6} shard",
    ]
    for job in plan.jobs:
        shape = "x".join(str(d) for d in job.shape) or "scalar"
        lines.append(
            f"{job.name:<{width}}  {shape:<18} {job.dtype:<5} {job.action:<6} "
            f"{shard_of[job.name]}  ({job.why})"
        )
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"

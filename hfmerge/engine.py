"""Runs a merge plan: one tensor at a time from every input, through the method, into the shards.

Peak memory is the inputs' copies of the largest tensor plus the method's temporaries; nothing holds
a whole model, and the output is streamed into pre-planned shard files.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from hfmerge.arch.permute import permute_tensor
from hfmerge.arch.spec import ArchSpec, Permutations
from hfmerge.methods import MethodParams, ModelParams
from hfmerge.plan import MergePlan, TensorJob
from hfmerge.progress import track
from hfmerge.tensors import LazyCheckpoint, ShardWriter, torch_dtype


def execute_plan(
    plan: MergePlan,
    out_dir: Path,
    *,
    params: MethodParams,
    model_params: Sequence[ModelParams],
    seed: int = 0,
    input_perms: Sequence[Permutations | None] | None = None,
    progress: bool = True,
) -> None:
    """Write every planned tensor into `out_dir` (shards + index).

    `input_perms[i]`, when given, permutes input i's tensors on read (alignment into the base's
    basis), so aligned copies of the inputs are never materialised.
    """
    perms = list(input_perms) if input_perms is not None else [None] * len(plan.inputs)
    with ExitStack() as stack:
        base = stack.enter_context(LazyCheckpoint(plan.base.source.path))
        inputs = [
            _AlignedReader(stack.enter_context(LazyCheckpoint(m.source.path)), m.spec, p)
            for m, p in zip(plan.inputs, perms, strict=True)
        ]
        writer = stack.enter_context(
            ShardWriter(out_dir, plan.shards, metadata={"merged_by": "hfmerge"})
        )
        for job in track(plan.jobs, description="merging tensors", enabled=progress):
            if job.action == "copy":
                tensor = base.get(job.name)
            else:
                tensor = _merge_one(job, plan, base, inputs, params, model_params, seed)
            writer.write(job.name, tensor)


@dataclass(frozen=True)
class _AlignedReader:
    """One input's tensors, permuted on read into the base's basis when `perms` is set."""

    checkpoint: LazyCheckpoint
    spec: ArchSpec
    perms: Permutations | None

    def get(self, name: str) -> torch.Tensor:
        tensor = self.checkpoint.get(name)
        if self.perms is None:
            return tensor
        return permute_tensor(tensor, self.spec.tensors[name], self.spec, self.perms)


def _merge_one(
    job: TensorJob,
    plan: MergePlan,
    base: LazyCheckpoint,
    inputs: Sequence[_AlignedReader],
    params: MethodParams,
    model_params: Sequence[ModelParams],
    seed: int,
) -> torch.Tensor:
    # Arithmetic in float32 whatever the storage dtype: bf16 sums lose digits fast.
    tensors = [reader.get(job.name).to(torch.float32) for reader in inputs]
    base_tensor = base.get(job.name).to(torch.float32) if plan.method.needs_base else None
    # A per-tensor seed keeps random methods (DARE, DELLA) reproducible in any tensor order.
    generator = torch.Generator().manual_seed(seed + zlib.crc32(job.name.encode()))
    merged = plan.method.fn(
        tensors, base=base_tensor, model_params=model_params, params=params, generator=generator
    )
    if tuple(merged.shape) != job.shape:
        raise RuntimeError(
            f"method {plan.method.name} returned shape {tuple(merged.shape)} "
            f"for {job.name}, expected {job.shape}"
        )
    return merged.to(torch_dtype(job.dtype))

"""Streamed interpolation: one loaded model set to (1-λ)·A + λ·π(B), read per tensor.

The loss barrier scores such points along the line; REPAIR measures the inputs with it (λ = 1 is
π(B) itself). Only one model is ever loaded: each checkpoint tensor is read from both files and
written into the model's own storage (`lm/checkpoint_views.py`: fused experts slice by slice).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from transformers import PreTrainedModel

from hfmerge.arch.config import read_config
from hfmerge.arch.spec import ArchSpec, Permutations
from hfmerge.errors import IncompatibleModelsError
from hfmerge.lm.checkpoint_views import checkpoint_targets
from hfmerge.sources.inspection import inspect_downloaded, tensor_differences
from hfmerge.sources.readers import open_reader
from hfmerge.sources.refs import ModelSource
from hfmerge.tensors import TensorReader, read_checkpoint_index


def check_same_tensors(path_a: Path, path_b: Path, *, label_a: str, label_b: str) -> None:
    """Same tensor names and shapes in both checkpoints (from headers; no weights read)."""
    problems = tensor_differences(
        read_checkpoint_index(path_a, label=label_a),
        read_checkpoint_index(path_b, label=label_b),
        label_a=label_a,
        label_b=label_b,
    )
    if problems:
        raise IncompatibleModelsError(label_a, label_b, problems)


class Interpolator:
    """Sets one loaded model's weights to (1-λ)·A + λ·π(B), reading both checkpoints per tensor
    (each with its LoRA adapter applied on read, when its source has one)."""

    def __init__(self, model: PreTrainedModel, a: ModelSource, b: ModelSource) -> None:
        self.model = model
        self.a, self.b = inspect_downloaded(a), inspect_downloaded(b)
        self.targets = checkpoint_targets(model, self.a.index, label=a.label)

    def load(
        self, lam: float, *, spec: ArchSpec | None = None, perms: Permutations | None = None
    ) -> None:
        """Write the interpolated weights into the model; B is permuted by `perms` on read."""
        with ExitStack() as stack, torch.no_grad():
            a, b = open_reader(stack, self.a), open_reader(stack, self.b)
            for name, target in self.targets.items():
                floating = self.a.index.info(name).dtype.startswith(("F", "BF"))
                target.copy_(_value(name, lam, a, b, spec, perms, floating=floating))


def _value(
    name: str,
    lam: float,
    a: TensorReader,
    b: TensorReader,
    spec: ArchSpec | None,
    perms: Permutations | None,
    *,
    floating: bool,
) -> torch.Tensor:
    # Endpoints read one checkpoint only, so λ=0 is exactly A and λ=1 exactly π(B).
    if lam == 0.0 or not floating:
        return a.get(name)  # integer buffers (position ids) are A's, never averaged
    if spec is not None and perms is not None and name in spec.tensors:
        other = _permuted(name, b, spec, perms)
    else:
        other = b.get(name)
    if lam == 1.0:
        return other
    # lerp is exact when both sides agree, so a model interpolated with itself stays itself.
    return torch.lerp(a.get(name).float(), other.float(), lam)


def _permuted(name: str, b: TensorReader, spec: ArchSpec, perms: Permutations) -> torch.Tensor:
    from hfmerge.arch.permute import read_permuted

    return read_permuted(name, b.get, spec, perms)


def spec_of(path: Path, *, label: str) -> ArchSpec:
    """The architecture spec of the model directory `path`, from its config and tensor names."""
    from hfmerge.arch import spec_for

    index = read_checkpoint_index(path, label=label)
    shapes = {name: index.info(name).shape for name in index.names}
    return spec_for(read_config(path, label=label), index.names, label=label, shapes=shapes)


__all__ = ["Interpolator", "check_same_tensors", "spec_of"]

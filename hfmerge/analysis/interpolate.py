"""Streamed interpolation: one loaded model set to (1-λ)·A + λ·π(B), read per tensor.

The loss barrier scores such points along the line; REPAIR measures the inputs with it (λ = 1 is
π(B) itself). Only one model is ever loaded: each checkpoint tensor is read from both files and
written into the model's own storage (`lm/checkpoint_views.py`: fused experts slice by slice).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from hfmerge.arch.config import read_config
from hfmerge.arch.spec import ArchSpec, Permutations
from hfmerge.errors import IncompatibleModelsError
from hfmerge.lm.checkpoint_views import checkpoint_targets
from hfmerge.sources.inspection import tensor_differences
from hfmerge.tensors import LazyCheckpoint, read_checkpoint_index


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
    """Sets one loaded model's weights to (1-λ)·A + λ·π(B), reading both checkpoints per tensor."""

    def __init__(
        self, model: PreTrainedModel, path_a: Path, path_b: Path, *, label_a: str, label_b: str
    ) -> None:
        self.model = model
        self.path_a, self.path_b = path_a, path_b
        self.label_a, self.label_b = label_a, label_b
        index = read_checkpoint_index(path_a, label=label_a)
        self.targets = checkpoint_targets(model, index, label=label_a)

    def load(
        self, lam: float, *, spec: ArchSpec | None = None, perms: Permutations | None = None
    ) -> None:
        """Write the interpolated weights into the model; B is permuted by `perms` on read."""
        with (
            LazyCheckpoint(self.path_a, label=self.label_a) as a,
            LazyCheckpoint(self.path_b, label=self.label_b) as b,
            torch.no_grad(),
        ):
            for name, target in self.targets.items():
                target.copy_(self._value(name, lam, a, b, spec, perms))

    @staticmethod
    def _value(
        name: str,
        lam: float,
        a: LazyCheckpoint,
        b: LazyCheckpoint,
        spec: ArchSpec | None,
        perms: Permutations | None,
    ) -> torch.Tensor:
        # Endpoints read one checkpoint only, so λ=0 is exactly A and λ=1 exactly π(B).
        if lam == 0.0 or not a.info(name).dtype.startswith(("F", "BF")):
            return a.get(name)  # integer buffers (position ids) are A's, never averaged
        if spec is not None and perms is not None and name in spec.tensors:
            other = _permuted(name, b, spec, perms)
        else:
            other = b.get(name)
        if lam == 1.0:
            return other
        # lerp is exact when both sides agree, so a model interpolated with itself stays itself.
        return torch.lerp(a.get(name).float(), other.float(), lam)


def _permuted(name: str, b: LazyCheckpoint, spec: ArchSpec, perms: Permutations) -> torch.Tensor:
    from hfmerge.arch.permute import read_permuted

    return read_permuted(name, b.get, spec, perms)


def spec_of(path: Path, *, label: str) -> ArchSpec:
    """The architecture spec of the model directory `path`, from its config and tensor names."""
    from hfmerge.arch import spec_for

    index = read_checkpoint_index(path, label=label)
    shapes = {name: index.info(name).shape for name in index.names}
    return spec_for(read_config(path, label=label), index.names, label=label, shapes=shapes)


__all__ = ["Interpolator", "check_same_tensors", "spec_of"]

"""Streamed interpolation: one loaded model set to (1-λ)·A + λ·π(B), read per tensor.

π is B's map into A's basis (`arch/residual.py`): permutations, and for the orthogonal methods the
norm fold and a residual rotation, which read A folded too.

The loss barrier scores such points along the line; REPAIR measures the inputs with it (λ = 1 is
π(B) itself). Only one model is ever loaded: each checkpoint tensor is read from both files and
written into the model's own storage.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel

from hfmerge.arch.config import read_config
from hfmerge.arch.residual import FOLDED, BasisMap, read_in_basis
from hfmerge.arch.spec import ArchSpec
from hfmerge.errors import ArchitectureError, IncompatibleModelsError
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


def checkpoint_targets(
    model: PreTrainedModel, names: Sequence[str], *, label: str
) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name -> the model tensor (a view of its storage) that name loads into.

    transformers may rename tensors between file and module (GPT-NeoX `embed_out` is `lm_head`);
    its own save-time renaming maps module names back to file names. A tied weight appears once in
    the file, so writing through the file's names updates every tensor that shares it.
    """
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x stores module names unchanged
        by_file = state
    else:
        by_file = revert_weight_conversion(model, dict(state))
    storages = {t.untyped_storage().data_ptr() for t in state.values()}
    unknown = [n for n in names if n not in by_file]
    converted = [
        n for n in names if n in by_file and by_file[n].untyped_storage().data_ptr() not in storages
    ]
    if unknown or converted:
        raise ArchitectureError(
            label,
            "its checkpoint tensors do not map one-to-one onto the "
            f"loaded model ({', '.join((unknown + converted)[:5])})",
            fix="re-save the model with transformers' save_pretrained",
        )
    targets = {n: by_file[n] for n in names}
    _check_coverage(model, targets, label=label)
    return targets


def _check_coverage(
    model: PreTrainedModel, targets: dict[str, torch.Tensor], *, label: str
) -> None:
    """Every parameter is written by some checkpoint tensor (else it would stay A's forever)."""
    written = {t.untyped_storage().data_ptr() for t in targets.values()}
    missed = [
        name
        for name, param in model.named_parameters()
        if param.untyped_storage().data_ptr() not in written
    ]
    if missed:
        raise ArchitectureError(
            label,
            f"parameters {', '.join(missed[:5])} are not in its checkpoint",
            fix="re-save the model with its full weights",
        )


class Interpolator:
    """Sets one loaded model's weights to (1-λ)·A + λ·π(B), reading both checkpoints per tensor."""

    def __init__(
        self, model: PreTrainedModel, path_a: Path, path_b: Path, *, label_a: str, label_b: str
    ) -> None:
        self.model = model
        self.path_a, self.path_b = path_a, path_b
        self.label_a, self.label_b = label_a, label_b
        names = read_checkpoint_index(path_a, label=label_a).names
        self.targets = checkpoint_targets(model, names, label=label_a)

    def load(
        self, lam: float, *, spec: ArchSpec | None = None, basis: BasisMap | None = None
    ) -> None:
        """Write the interpolated weights into the model; B is read through `basis` (and A
        folded when `basis` folds)."""
        with (
            LazyCheckpoint(self.path_a, label=self.label_a) as a,
            LazyCheckpoint(self.path_b, label=self.label_b) as b,
            torch.no_grad(),
        ):
            for name, target in self.targets.items():
                target.copy_(self._value(name, lam, a, b, spec, basis))

    @staticmethod
    def _value(
        name: str,
        lam: float,
        a: LazyCheckpoint,
        b: LazyCheckpoint,
        spec: ArchSpec | None,
        basis: BasisMap | None,
    ) -> torch.Tensor:
        if not a.info(name).dtype.startswith(("F", "BF")):
            return a.get(name)  # integer buffers (position ids) are A's, never averaged
        if spec is None or name not in spec.tensors:
            basis = None
        own = _read(name, a, spec, FOLDED if basis is not None and basis.fold else None)
        # Endpoints read one checkpoint only, so λ=0 is exactly A and λ=1 exactly π(B).
        if lam == 0.0:
            return own
        other = _read(name, b, spec, basis)
        if lam == 1.0:
            return other
        # lerp is exact when both sides agree, so a model interpolated with itself stays itself.
        return torch.lerp(own.float(), other.float(), lam)


def _read(
    name: str, checkpoint: LazyCheckpoint, spec: ArchSpec | None, basis: BasisMap | None
) -> torch.Tensor:
    """Tensor `name` of `checkpoint`, through `basis` when there is one."""
    if spec is None or basis is None:
        return checkpoint.get(name)
    return read_in_basis(name, checkpoint.get, spec, basis)


def spec_of(path: Path, *, label: str) -> ArchSpec:
    """The architecture spec of the model directory `path`, from its config and tensor names."""
    from hfmerge.arch import spec_for

    index = read_checkpoint_index(path, label=label)
    shapes = {name: index.info(name).shape for name in index.names}
    return spec_for(read_config(path, label=label), index.names, label=label, shapes=shapes)


__all__ = ["Interpolator", "check_same_tensors", "checkpoint_targets", "spec_of"]

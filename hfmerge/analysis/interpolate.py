"""Streamed interpolation: one loaded model set to (1-λ)·A + λ·π(B), read per tensor.

π is B's map into A's basis (`arch/residual.py`): permutations, and for the orthogonal methods the
norm fold and a residual rotation, which read A folded too.

The loss barrier scores such points along the line; REPAIR measures the inputs with it (λ = 1 is
π(B) itself). Only one model is ever loaded: each checkpoint tensor is read from both files and
written into the model's own storage (`lm/checkpoint_views.py`: fused experts slice by slice).
A tied head is untied while the weights loaded are folded (the fold gives the head values of its
own) and tied back for a map that does not fold (`lm/tied_head.py`).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from transformers import PreTrainedModel

from hfmerge.arch.config import CONFIG_FILE, mark_untied, read_config
from hfmerge.arch.residual import FOLDED, BasisMap, mapped_infos, mapped_names, read_in_basis
from hfmerge.arch.spec import ArchSpec
from hfmerge.errors import IncompatibleModelsError
from hfmerge.lm.checkpoint_views import checkpoint_targets, file_views
from hfmerge.lm.tied_head import head_is_tied, tie_head, untie_head
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
        names = list(self.a.index.names)
        # Tied heads absent from the checkpoint, which a fold writes as tensors of their own.
        self.heads = [n for n in mapped_names(self.a.spec, names, FOLDED) if n not in names]
        if self.heads:
            tie_head(model)  # as loaded: another interpolation may have left it untied
        self.tied = head_is_tied(model)
        self.targets = checkpoint_targets(model, self.a.index, label=a.label)
        self._untied_targets: dict[str, torch.Tensor] | None = None

    def load(
        self, lam: float, *, spec: ArchSpec | None = None, basis: BasisMap | None = None
    ) -> None:
        """Write the interpolated weights into the model; B is read through `basis` (and A
        folded when `basis` folds, the model's tied head untied first)."""
        targets = self._targets(folded=basis is not None and basis.fold)
        with ExitStack() as stack, torch.no_grad():
            a, b = open_reader(stack, self.a), open_reader(stack, self.b)
            for name, target in targets.items():
                stored = self.a.spec.tied.get(name, name)  # a tied head is stored as its tensor
                floating = self.a.index.info(stored).dtype.startswith(("F", "BF"))
                target.copy_(_value(name, lam, a, b, spec, basis, floating=floating))

    def _targets(self, *, folded: bool) -> dict[str, torch.Tensor]:
        """Checkpoint name -> the model's view it loads into, the head untied when `folded` (a
        head the checkpoint lacks is then written too) and tied as loaded otherwise."""
        if not self.tied:
            return self.targets
        if not folded:
            tie_head(self.model)  # the loaded embedding parameter: `targets` still write it
            self._untied_targets = None
            return self.targets
        if self._untied_targets is None:
            untie_head(self.model)
            views = file_views(self.model, label=self.a.label)
            self._untied_targets = {n: views[n] for n in [*self.a.index.names, *self.heads]}
        return self._untied_targets


def write_point(
    a: ModelSource,
    b: ModelSource,
    lam: float,
    out_dir: Path,
    *,
    spec: ArchSpec | None = None,
    basis: BasisMap | None = None,
    max_shard_bytes: int,
    progress: bool = False,
) -> None:
    """Write (1-λ)·A + λ·π(B) to the new folder `out_dir` as a checkpoint with A's tensor names,
    dtypes and config: what `Interpolator.load` puts in a loaded model, for a model that must load
    with its layers placed by accelerate instead. An interior point is rounded to A's dtypes; a
    tied head that `basis` folds is written untied (as `hfmerge align` writes it)."""
    from hfmerge.progress import track
    from hfmerge.tensors import ShardWriter, copy_side_files, plan_shards, torch_dtype

    first, other = inspect_downloaded(a), inspect_downloaded(b)
    folds = spec is not None and basis is not None and basis.fold
    infos = mapped_infos(first.spec, first.index, FOLDED if folds else None)
    out_dir.mkdir()
    with ExitStack() as stack, torch.no_grad():
        reader_a, reader_b = open_reader(stack, first), open_reader(stack, other)
        shards = plan_shards(infos, max_shard_bytes=max_shard_bytes)
        writer = stack.enter_context(ShardWriter(out_dir, shards))
        for info in track(infos, description=f"writing {b.label} at λ={lam:g}", enabled=progress):
            floating = info.dtype.startswith(("F", "BF"))
            value = _value(info.name, lam, reader_a, reader_b, spec, basis, floating=floating)
            writer.write(info.name, value.to(torch_dtype(info.dtype)))
    copy_side_files(a.path, out_dir)
    if len(infos) > len(first.index.names):  # a tied head the fold gave values of its own
        mark_untied(out_dir / CONFIG_FILE)


def _value(
    name: str,
    lam: float,
    a: TensorReader,
    b: TensorReader,
    spec: ArchSpec | None,
    basis: BasisMap | None,
    *,
    floating: bool,
) -> torch.Tensor:
    if not floating:
        return a.get(name)  # integer buffers (position ids) are A's, never averaged
    if spec is None or (name not in spec.tensors and name not in spec.tied):
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
    name: str, reader: TensorReader, spec: ArchSpec | None, basis: BasisMap | None
) -> torch.Tensor:
    """Tensor `name` of `reader`, through `basis` when there is one."""
    if spec is None or basis is None:
        return reader.get(name)
    return read_in_basis(name, reader.get, spec, basis)


def spec_of(path: Path, *, label: str) -> ArchSpec:
    """The architecture spec of the model directory `path`, from its config and tensor names."""
    from hfmerge.arch import spec_for

    index = read_checkpoint_index(path, label=label)
    shapes = {name: index.info(name).shape for name in index.names}
    return spec_for(read_config(path, label=label), index.names, label=label, shapes=shapes)


__all__ = ["Interpolator", "check_same_tensors", "spec_of", "write_point"]

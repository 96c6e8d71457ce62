"""One model's tensors read in another's basis: permutations, then the norm-gain fold, an
orthogonal map of the residual stream and within-head maps of attention (`arch/head_maps.py`).
Every reader of aligned tensors (the merge engine, `hfmerge align`, the barrier's interpolation)
goes through `read_in_basis`.

Computational invariance (RMSNorm families, `ArchSpec.norm_readers`): rms(x) ⊙ g read by W equals
rms(x) read by W·diag(g), so each gain folds into the layers that read it and becomes 1. With every
gain 1, rms(Q h) = Q rms(h) for an orthogonal Q, so the residual stream may be rotated: every tensor
axis on the residual stream is multiplied by Q (writes Q·W, reads W·Qᵀ, embeddings E·Qᵀ, write
biases Q·b) and the function is unchanged. A tied head reads the final norm, the embedding does
not: folding unties them (`lm_head.weight` becomes a tensor of its own).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from hfmerge.arch.common import RESIDUAL
from hfmerge.arch.head_maps import HeadMaps, map_heads
from hfmerge.arch.permute import read_permuted
from hfmerge.arch.spec import ArchSpec, AxisRole, Permutations
from hfmerge.errors import AlignmentError

Reader = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class BasisMap:
    """How one model's tensors are read into the base's basis.

    Attributes:
        perms: permutations applied first (None: none).
        fold: fold every norm gain into its readers (norms read as 1); needed by `rotation`,
            and by the base itself when the other inputs are rotated.
        rotation: [hidden, hidden] orthogonal Q applied to every residual axis after the
            permutations: h_base ≈ Q h_model. None: no rotation.
        head_maps: within-head maps of attention groups, per KV slot after the permutations
            (`arch/head_maps.py`); they act on head axes only. None: none.
    """

    perms: Permutations | None = None
    fold: bool = False
    rotation: torch.Tensor | None = None
    head_maps: HeadMaps | None = None

    def __post_init__(self) -> None:
        if self.rotation is not None and not self.fold:
            raise ValueError("an orthogonal residual map is exact only with the norms folded")


FOLDED = BasisMap(fold=True)  # the base of an orthogonal alignment: folded, not moved


def require_foldable(spec: ArchSpec, *, label: str, feature: str) -> None:
    """Refuse a model whose norm gains do not fold exactly (LayerNorm or unusual RMSNorms)."""
    if not spec.foldable:
        raise AlignmentError(
            f"{feature} needs {label}'s norm gains folded into the layers that read them, and "
            f"that is not exact for the {spec.family} family ({spec.model_type})",
            why="an orthogonal map of the residual stream keeps the function only for plain "
            "RMSNorms in front of each block (Llama, Mistral, Qwen2, Qwen3); LayerNorm's mean "
            "subtraction, Gemma's 1 + gain and post-block norms do not commute with it",
            fix="use the `weight` or `activation` permutation alignment for this model",
        )


def reader_norms(spec: ArchSpec) -> dict[str, str]:
    """Reader tensor -> the norm gain it reads (the inverse of `ArchSpec.norm_readers`)."""
    return {reader: norm for norm, readers in spec.norm_readers.items() for reader in readers}


def mapped_names(spec: ArchSpec, names: list[str], basis: BasisMap | None) -> list[str]:
    """The tensor names a model read through `basis` holds: a folded tied head becomes its own."""
    if basis is None or not basis.fold:
        return list(names)
    untied = [n for n in spec.tied if n in reader_norms(spec) and n not in names]
    return list(names) + untied


def read_in_basis(name: str, get: Reader, spec: ArchSpec, basis: BasisMap | None) -> torch.Tensor:
    """Tensor `name` read through `basis`, in the checkpoint's dtype (`get` reads one tensor).

    A tied head (in `spec.tied`, absent from the checkpoint) is read from the tensor it shares.
    """
    if basis is None:
        return get(name)
    source = spec.tied.get(name, name)
    tensor = _read(source, get, spec, basis)
    if not basis.fold and basis.head_maps is None:
        return tensor
    if basis.fold and name in spec.norm_readers:
        return torch.ones_like(tensor)  # its gain now lives in its readers
    axes = spec.tensors[source].axes
    wide = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    out = tensor.to(wide)
    if basis.fold:
        norm = reader_norms(spec).get(name)
        if norm is not None:
            out = out * _along(_read(norm, get, spec, basis).to(wide), axes)
        if basis.rotation is not None:
            out = rotate_residual(out, axes, basis.rotation.to(wide))
    if basis.head_maps is not None:
        out = map_heads(out, axes, spec, basis.head_maps)
    return out.to(tensor.dtype)


def _read(name: str, get: Reader, spec: ArchSpec, basis: BasisMap) -> torch.Tensor:
    return get(name) if basis.perms is None else read_permuted(name, get, spec, basis.perms)


def residual_axes(axes: tuple[AxisRole | None, ...]) -> list[int]:
    """The axes of a tensor that the residual permutation (or rotation) acts on."""
    return [i for i, role in enumerate(axes) if role is not None and role.group == RESIDUAL]


def _along(gain: torch.Tensor, axes: tuple[AxisRole | None, ...]) -> torch.Tensor:
    """A [hidden] gain shaped to scale a reader's residual (input) axis by broadcasting."""
    (axis,) = residual_axes(axes)
    shape = [1] * len(axes)
    shape[axis] = gain.shape[0]
    return gain.reshape(shape)


def rotate_residual(
    tensor: torch.Tensor, axes: tuple[AxisRole | None, ...], rotation: torch.Tensor
) -> torch.Tensor:
    """Multiply every residual axis of `tensor` by `rotation` (Q): rows u ↦ Σ_v Q[u, v] row v."""
    for axis in residual_axes(axes):
        moved = tensor.movedim(axis, 0)  # [..., hidden, ...] -> [hidden, ...]
        rows = moved.reshape(moved.shape[0], -1)  # [hidden, ...] -> [hidden, rest]
        turned = (rotation @ rows).reshape(moved.shape)  # [hidden, rest] -> [hidden, ...]
        tensor = turned.movedim(0, axis)  # [hidden, ...] -> [..., hidden, ...]
    return tensor


def map_state_dict(
    params: Mapping[str, torch.Tensor], spec: ArchSpec, basis: BasisMap
) -> dict[str, torch.Tensor]:
    """Every tensor of `params` read through `basis` (a folded tied head added untied)."""
    names = mapped_names(spec, list(params), basis)
    return {n: read_in_basis(n, params.__getitem__, spec, basis) for n in names}


__all__ = [
    "FOLDED",
    "BasisMap",
    "map_state_dict",
    "mapped_names",
    "read_in_basis",
    "reader_norms",
    "require_foldable",
    "residual_axes",
    "rotate_residual",
]

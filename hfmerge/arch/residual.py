"""One model's tensors read in another's basis: permutations, then the norm fold, an orthogonal
map of the residual stream and within-head maps of attention (`arch/head_maps.py`). Every reader
of aligned tensors (the merge engine, `hfmerge align`, the barrier's interpolation) goes through
`read_in_basis`.

Computational invariance (`ArchSpec.norm_readers`). RMSNorm: rms(x) ⊙ g read by W equals rms(x)
read by W·diag(g), so each gain folds into the layers that read it and becomes 1. With every gain
1, rms(Q h) = Q rms(h) for an orthogonal Q, so the residual stream may be rotated: every tensor
axis on the residual stream is multiplied by Q (writes Q·W, reads W·Qᵀ, embeddings E·Qᵀ, write
biases Q·b) and the function is unchanged. A tied head reads the final norm, the embedding does
not: folding unties them (`lm_head.weight` becomes a tensor of its own).

LayerNorm (`ArchSpec.centred_norms`): LN(x) = g ⊙ n(x) + b with n(x) = (x − mean(x)·1)/std(x).

- The gain folds as above: W·(g ⊙ n + b) = (W·diag(g))·n + W·b.
- The bias: where every reader has a bias c, it absorbs W·b (c ← c + W·b, with W before the
  fold) and the norm's bias becomes 0: W·(g ⊙ n + b) + c = (W·diag(g))·n + (c + W·b), exactly.
  Where a reader has none (GPT-2's head), the bias stays in the norm divided by the gain it no
  longer gets: g ⊙ n + b = g ⊙ (n + b/g), so the norm keeps gain 1 and bias b/g and its readers
  take W·diag(g). A unit whose gain is 0 and bias is not cannot be written so: refused.
- With gain 1, n commutes with an orthogonal Q that fixes the all-ones direction (Q·1 = 1, so
  Qᵀ·1 = 1): mean(Qx) = 1ᵀQx/d = mean(x), so Qx − mean(Qx)·1 = Q(x − mean(x)·1), whose norm,
  and so std, is that of x − mean(x)·1. Hence n(Qx) = Q·n(x); a bias kept in the norm is a
  residual vector and is rotated with the rest (b/g ← Q·b/g), so the norm's output is Q times
  what it was, and its readers W·Qᵀ read what they read before. A Q that does not fix 1 changes
  the mean, and the function. `rotation_space` gives the directions a Q may turn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from hfmerge.arch.common import RESIDUAL
from hfmerge.arch.head_maps import HeadMaps, map_heads
from hfmerge.arch.permute import read_permuted
from hfmerge.arch.spec import ArchSpec, AxisRole, Permutations
from hfmerge.errors import AlignmentError
from hfmerge.tensors import CheckpointIndex, TensorInfo

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
    """Refuse a model whose norms do not fold exactly (post-block norms, unusual RMSNorms)."""
    if not spec.foldable:
        raise AlignmentError(
            f"{feature} needs {label}'s norm gains folded into the layers that read them, and "
            f"that is not exact for the {spec.family} family ({spec.model_type})",
            why=spec.fold_refusal
            or "an orthogonal map of the residual stream keeps the function only for plain "
            "norms in front of each block and of the head (RMSNorm: Llama, Mistral, Qwen2, "
            "Qwen3; LayerNorm: GPT-2, GPT-NeoX); Gemma's 1 + gain, post-block norms and a bare "
            "model's final norm do not fold",
            fix="use the `weight` or `activation` permutation alignment for this model",
        )


def reader_norms(spec: ArchSpec) -> dict[str, str]:
    """Reader tensor -> the norm gain it reads (the inverse of `ArchSpec.norm_readers`)."""
    return {reader: norm for norm, readers in spec.norm_readers.items() for reader in readers}


def absorbs_bias(spec: ArchSpec, norm: str) -> bool:
    """Whether every reader of norm gain `norm` has a bias, which takes the norm's bias."""
    return all(reader in spec.reader_biases for reader in spec.norm_readers[norm])


def rotation_space(spec: ArchSpec) -> torch.Tensor | None:
    """[hidden, k] orthonormal basis of the residual directions a rotation may turn (it fixes the
    rest); None: all of them. Centred norms: the complement of the all-ones direction."""
    if not spec.centred_norms:
        return None
    return ones_complement(spec.groups[RESIDUAL].size)


def ones_complement(hidden: int) -> torch.Tensor:
    """[hidden, hidden − 1] float64 orthonormal basis of the vectors summing to 0 (Helmert's):
    column k − 1 is (1, ..., 1, −k, 0, ..., 0)/√(k(k + 1)), with k ones."""
    rows = torch.arange(hidden, dtype=torch.float64)[:, None]  # [hidden, 1]
    k = torch.arange(1, hidden, dtype=torch.float64)[None, :]  # [1, hidden − 1]
    basis = (rows < k).double() - k * (rows == k).double()  # [hidden, hidden − 1]
    return basis / torch.sqrt(k * (k + 1))


def lift_rotation(space: torch.Tensor | None, inner: torch.Tensor) -> torch.Tensor:
    """[hidden, hidden] orthogonal map turning `space` ([hidden, k]) by `inner` ([k, k]) and fixing
    its complement: U·R·Uᵀ + (I − U·Uᵀ). `space` None: `inner` is the map itself."""
    if space is None:
        return inner
    eye = torch.eye(space.shape[0], dtype=inner.dtype)
    basis = space.to(inner.dtype)
    lifted: torch.Tensor = basis @ inner @ basis.T + (eye - basis @ basis.T)
    return lifted


def mapped_names(spec: ArchSpec, names: list[str], basis: BasisMap | None) -> list[str]:
    """The tensor names a model read through `basis` holds: a folded tied head becomes its own."""
    if basis is None or not basis.fold:
        return list(names)
    untied = [n for n in spec.tied if n in reader_norms(spec) and n not in names]
    return list(names) + untied


def mapped_infos(
    spec: ArchSpec, index: CheckpointIndex, basis: BasisMap | None
) -> list[TensorInfo]:
    """The header records of the tensors `mapped_names` gives: an untied head takes the record
    of the tensor it was tied to (its dtype and shape) under its own name."""
    names = mapped_names(spec, list(index.names), basis)
    return [dataclasses.replace(index.info(spec.tied.get(n, n)), name=n) for n in names]


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
        out = _folded(name, out, axes, lambda n: _read(n, get, spec, basis).to(wide), spec)
        if basis.rotation is not None:
            out = rotate_residual(out, axes, basis.rotation.to(wide))
    if basis.head_maps is not None:
        out = map_heads(out, axes, spec, basis.head_maps)
    return out.to(tensor.dtype)


def _folded(
    name: str, tensor: torch.Tensor, axes: tuple[AxisRole | None, ...], get: Reader, spec: ArchSpec
) -> torch.Tensor:
    """Tensor `name` (`tensor`, wide) after the norm fold; `get` reads others (permuted, wide).

    A norm's reader takes its gain; a LayerNorm's bias goes to its readers' biases or, where one
    has none, stays in the norm as b/g (the module docstring says why each is exact)."""
    norm = reader_norms(spec).get(name)
    if norm is not None:
        return tensor * _along(get(norm), axes)
    gains = {bias: gain for gain, bias in spec.norm_biases.items()}
    if name in gains:
        norm = gains[name]
        if absorbs_bias(spec, norm):
            return torch.zeros_like(tensor)  # its readers' biases took it
        return _bias_over_gain(norm, tensor, get(norm))
    readers = {bias: reader for reader, bias in spec.reader_biases.items()}
    reader = readers.get(name)
    if reader is None:
        return tensor
    norm = reader_norms(spec)[reader]
    if norm not in spec.norm_biases or not absorbs_bias(spec, norm):
        return tensor
    weight = get(reader)  # before the fold: c + W·b reads the unscaled b
    (axis,) = residual_axes(spec.tensors[spec.tied.get(reader, reader)].axes)
    # Contract W's residual (input) axis with b: Linear [out, in] or Conv1D [in, out] -> [out].
    absorbed: torch.Tensor = torch.tensordot(
        weight, get(spec.norm_biases[norm]), dims=([axis], [0])
    )
    return tensor + absorbed


GAIN_FLOOR = 1e-6  # relative to the largest |gain|: below it, b/g is refused (a zero gain)


def _bias_over_gain(norm: str, bias: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """A LayerNorm bias kept in the norm after its gain folds away: b/g (0 where b is 0).

    Raises:
        AlignmentError: a unit whose gain is ~0 has a bias (its readers' columns are then 0).
    """
    small = gain.abs() <= GAIN_FLOOR * gain.abs().max()
    stuck = small & (bias != 0)
    if bool(stuck.any()):
        unit = int(stuck.nonzero()[0, 0])
        raise AlignmentError(
            f"norm {norm} has gain {float(gain[unit]):.3g} and bias {float(bias[unit]):.3g} on "
            f"unit {unit}: its gain cannot be folded into a reader without a bias",
            why="folding leaves the bias in the norm as bias/gain, and a gain of ~0 multiplies "
            "that unit's input to every reader by ~0",
            fix="use the `weight` or `activation` permutation alignment for this model",
        )
    return torch.where(small, torch.zeros_like(bias), bias / torch.where(small, 1.0, gain))


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
    "GAIN_FLOOR",
    "BasisMap",
    "absorbs_bias",
    "lift_rotation",
    "map_state_dict",
    "mapped_infos",
    "mapped_names",
    "ones_complement",
    "read_in_basis",
    "reader_norms",
    "require_foldable",
    "residual_axes",
    "rotate_residual",
    "rotation_space",
]

"""Permutation-invariant fingerprints of checkpoints, from weights alone, and their comparison.

A fingerprint reads config.json, the safetensors headers and every tensor once (no probe text, no
transformers model). It probes the residual basis with a fixed sample of the token embedding's
rows, X = E[S] ([k, hidden]): X itself is written in the residual basis, so any product that
contracts the residual axis with X, and sums over the other permuted axis (a Gram matrix), does
not depend on any permutation group of the spec:

- a matrix reading or writing the residual stream, W [g, hidden] or [hidden, g] with g permuted
  (FF units, attention rows): Y = X W^T or X W, [k, g]; its entry is Y Y^T, [k, k];
- the residual axis against an unpermuted one (embeddings, positions): W[rows] X^T, [rows, k];
- residual on both axes (a pooler): X W X^T; a residual vector w (norm gains, biases): X w;
- anything else: its singular values (a matrix) or sorted values (a vector), which no
  permutation changes.

A mixture of experts' expert order moves whole tensors between names, so the entries of one
tensor across the experts of a block are summed into one: the Gram of all the experts' units
together, which neither the expert order nor any expert's FF order changes.

Two fingerprints compare entry by entry when their entries have the same shapes: the similarity
of an entry is the correlation of its values, the model's is the mean over the entries that probe
the residual basis (singular and sorted values only decide whether the weights are the same).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import torch

from hfmerge.arch.experts import expert_tensor_name
from hfmerge.arch.spec import ArchSpec, AxisRole, TensorSpec
from hfmerge.errors import FingerprintError
from hfmerge.progress import track
from hfmerge.sources.inspection import InspectedModel
from hfmerge.tensors import LazyCheckpoint

PROBE_ROWS = 128  # vocabulary rows probing the residual basis: [k, k] Grams stay small
PROBE_SEED = 0  # the same rows for every model with the same vocabulary size
# A model and a permuted copy differ only by float rounding (sums in another order), which is
# ~1e-7 relative in float32; a fine-tune moves every entry by far more than 1e-4.
SAME_TOLERANCE = 1e-4
# Calibrated on the zoo (README): fine-tunes, their merge and their base score 0.94-0.99 with each
# other; models trained apart from different seeds 0.30 (Llama-style) and 0.63 (GPT-2-style, whose
# token geometry converges across seeds). 0.8 sits between with a margin of >= 0.14 either side.
DERIVED_MIN = 0.8
SAME, DERIVED, UNRELATED = "same weights up to permutation", "derived from", "unrelated"
DIFFERENT_SHAPES = "unrelated (different shapes)"


@dataclass(frozen=True)
class Fingerprint:
    """One model's invariant entries, in its spec's tensor order."""

    label: str
    family: str
    entries: tuple[torch.Tensor, ...]  # float64
    probes: tuple[bool, ...]  # per entry: it probes the residual basis (counts for similarity)

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """The entries' shapes: fingerprints compare only when these agree."""
        return tuple(tuple(e.shape) for e in self.entries)


@dataclass(frozen=True)
class PairResult:
    """Two fingerprints compared: similarity (None: different shapes), largest change, verdict."""

    a: str
    b: str
    similarity: float | None
    max_relative_change: float | None
    verdict: str

    def to_json(self) -> dict[str, Any]:
        """The pair as a JSON object."""
        return {
            "a": self.a,
            "b": self.b,
            "similarity": self.similarity,
            "max_relative_change": self.max_relative_change,
            "verdict": self.verdict,
        }


def _residual(spec: ArchSpec) -> str:
    names = [g.name for g in spec.groups.values() if g.kind == "residual"]
    return names[0] if names else ""


def _embedding(spec: ArchSpec, shapes: dict[str, tuple[int, ...]]) -> str:
    """The token embedding: the (unpermuted, residual) matrix with the most rows."""
    residual = _residual(spec)
    candidates = [
        name
        for name, t in spec.tensors.items()
        if not t.buffer
        and len(t.axes) == 2
        and t.axes[0] is None
        and t.axes[1] is not None
        and t.axes[1].group == residual
    ]
    if not candidates:
        raise FingerprintError(
            spec.model_type, "its spec has no token embedding to probe the residual basis with"
        )
    return max(candidates, key=lambda name: shapes[name][0])


def probe_rows(count: int) -> torch.Tensor:
    """The sampled row indices (sorted) out of `count`: a fixed function of `count`."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randperm(count, generator=generator)[: min(count, PROBE_ROWS)].sort().values


def _gram(y: torch.Tensor) -> torch.Tensor:
    """[k, g] -> the k*(k-1)/2 entries above the diagonal of Y Y^T (summed over the permuted g).

    The diagonal (each probe row's own norm) follows token frequency, which models trained apart
    share; the cross terms are what tells them apart.
    """
    rows, cols = torch.triu_indices(y.shape[0], y.shape[0], offset=1)
    centred = y - y.mean(dim=0)  # [k, g]: a direction every probe row shares says little
    return (centred @ centred.T)[rows, cols]


def _entry(
    tensor: torch.Tensor, spec: TensorSpec, residual: str, x: torch.Tensor
) -> tuple[torch.Tensor, bool]:
    """The invariant entry of one tensor (float64), and whether it probes the residual basis.

    `x` [k, hidden] probes the residual axis. Entries that do not (singular or sorted values)
    only say whether weights are the same: models trained apart share their distributions.
    """
    w = tensor.to(torch.float64)
    kinds = tuple(_kind(role, residual) for role in spec.axes)
    rules: dict[tuple[str, ...], Callable[[], torch.Tensor]] = {
        ("none", "res"): lambda: w[probe_rows(w.shape[0])] @ x.T,  # [rows, k]
        ("res", "none"): lambda: x @ w[:, probe_rows(w.shape[1])],  # [k, cols]
        ("perm", "res"): lambda: _gram(x @ w.T),
        ("res", "perm"): lambda: _gram(x @ w),
        ("res", "res"): lambda: x @ w @ x.T,
        ("res",): lambda: x @ w,  # [k]: each probe row's projection on the vector
    }
    rule = rules.get(kinds)
    if rule is not None:
        return rule(), True
    if kinds == ("none",):
        return w, True  # nothing permutes it: the values themselves
    if w.dim() == 2:
        return torch.linalg.svdvals(w), False  # no permutation of either axis moves them
    return w.reshape(-1).sort(descending=True).values, False


def _kind(role: AxisRole | None, residual: str) -> str:
    if role is None:
        return "none"
    return "res" if role.group == residual else "perm"


def fingerprint(model: InspectedModel, *, progress: bool = False) -> Fingerprint:
    """The fingerprint of one inspected model: one pass over its tensors.

    Raises:
        FingerprintError: the spec has no token embedding to probe the residual basis with.
    """
    spec = model.spec
    shapes = {info.name: tuple(info.shape) for info in model.index}
    embedding = _embedding(spec, shapes)
    residual = _residual(spec)
    names = [name for name, t in spec.tensors.items() if not t.buffer]
    entries: list[tuple[torch.Tensor, bool]] = []
    summed: dict[str, int] = {}  # one tensor of every expert of a block -> its entry's index
    with LazyCheckpoint(model.source.path, label=model.label) as reader:
        x = reader.get(embedding)[probe_rows(shapes[embedding][0])].to(torch.float64)  # [k, d]
        for name in track(names, description=f"fingerprint {model.label}", enabled=progress):
            if name == embedding:
                entries.append((_gram(x), True))  # E[S] E[S]^T, its diagonal left out
                continue
            entry = _entry(reader.get(name), spec.tensors[name], residual, x)
            slot = spec.tensors[name].expert
            key = None if slot is None else expert_tensor_name(name, slot, 0)
            if key is None or key not in summed:
                summed.update({} if key is None else {key: len(entries)})
                entries.append(entry)
            else:
                total, probes = entries[summed[key]]
                entries[summed[key]] = (total + entry[0], probes)
    return Fingerprint(
        model.label, spec.family, tuple(e for e, _ in entries), tuple(p for _, p in entries)
    )


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1) - a.mean(), b.reshape(-1) - b.mean()
    scale = float(a.norm() * b.norm())
    return float(a @ b) / scale if scale > 0 else float(torch.equal(a, b))


def _relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(torch.maximum(a.norm(), b.norm()))
    return float((a - b).norm()) / scale if scale > 0 else 0.0


def compare(a: Fingerprint, b: Fingerprint) -> PairResult:
    """Similarity, largest relative change of an entry and the verdict of one pair."""
    if a.shapes != b.shapes:
        return PairResult(a.label, b.label, None, None, DIFFERENT_SHAPES)
    pairs = list(zip(a.entries, b.entries, strict=True))
    probed = [pair for pair, probes in zip(pairs, a.probes, strict=True) if probes]
    similarity = sum(_correlation(x, y) for x, y in probed) / len(probed)
    change = max(_relative_change(x, y) for x, y in pairs)
    return PairResult(a.label, b.label, similarity, change, verdict(similarity, change))


def verdict(similarity: float, max_relative_change: float) -> str:
    """SAME when no entry moved beyond float rounding, DERIVED above DERIVED_MIN, else UNRELATED."""
    if max_relative_change <= SAME_TOLERANCE:
        return SAME
    return DERIVED if similarity >= DERIVED_MIN else UNRELATED


def compare_all(prints: Sequence[Fingerprint]) -> list[PairResult]:
    """Every pair, in input order."""
    return [compare(a, b) for a, b in combinations(prints, 2)]


def format_pairs(results: Sequence[PairResult]) -> str:
    """A plain-text table: one row per pair."""
    width_a = max([5, *(len(r.a) for r in results)])
    width_b = max([5, *(len(r.b) for r in results)])
    lines = [f"{'model':<{width_a}}  {'model':<{width_b}}  {'similarity':>10}  verdict"]
    for r in results:
        value = "-" if r.similarity is None else f"{r.similarity:.6f}"
        lines.append(f"{r.a:<{width_a}}  {r.b:<{width_b}}  {value:>10}  {r.verdict}")
    return "\n".join(lines)

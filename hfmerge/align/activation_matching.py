"""Activation matching: one assignment per group on Pearson correlations of A's and B's features.

Features are captured with forward hooks and reduced to streaming float64 sums (never stored);
padding is masked out of every statistic. Attention groups use the head-aware solver.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import nn

from hfmerge.align.activation_probes import Probe, Where, check_coverage, in_experts, probes_of
from hfmerge.align.attention import (
    HeadBlocks,
    attention_objective,
    head_blocks,
    part_heads,
    solve_attention,
)
from hfmerge.align.cross_stats import CrossStats
from hfmerge.align.lap import assignment_value, solve_lap
from hfmerge.align.orthogonal import residual_factor
from hfmerge.align.weight_matching import MatchResult
from hfmerge.arch.common import RESIDUAL
from hfmerge.arch.permute import identity_permutations
from hfmerge.arch.spec import (
    ArchSpec,
    GroupPerm,
    PermGroup,
    Permutations,
)
from hfmerge.errors import AlignmentError
from hfmerge.progress import track

if TYPE_CHECKING:  # transformers is imported when matching runs, not when hfmerge.align loads
    from transformers import PreTrainedModel


ResidualMap = Literal["permute", "rotate"]


Captured = dict[int, torch.Tensor]  # probe index -> captured activations [batch, seq, width]
Hidden = tuple[torch.Tensor, ...]  # hidden states, each [batch, seq, hidden]


def _hooks(
    model: nn.Module, probes: list[Probe], store: Captured
) -> list[torch.utils.hooks.RemovableHandle]:
    """Register one hook per probe that writes the probed tensor into `store`."""
    modules = dict(model.named_modules())
    handles = []
    for index, probe in enumerate(probes):
        module = modules.get(probe.module)
        if module is None:
            raise AlignmentError(
                f"one model has no module {probe.module}",
                fix="align two models of the same class and size",
            )
        handles.append(_hook(module, probe.where, index, store))
    return handles


def _hook(
    module: nn.Module, where: Where, index: int, store: Captured
) -> torch.utils.hooks.RemovableHandle:
    if where == "input":

        def pre_hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            store[index] = args[0].detach()

        return module.register_forward_pre_hook(pre_hook)

    def post_hook(_: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        store[index] = output.detach()

    return module.register_forward_hook(post_hook)


def _tokens(features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Non-padding positions of [batch, seq, width] features as [tokens, width] float64."""
    if features.dim() != 3 or tuple(features.shape[:2]) != tuple(keep.shape):
        raise AlignmentError(
            f"a captured activation has shape {tuple(features.shape)}, expected "
            f"[batch, seq, width] with [batch, seq] = {tuple(keep.shape)}",
            fix="pass batches of input_ids with a matching attention_mask",
        )
    flat = features.reshape(-1, features.shape[-1])  # [batch, seq, width] -> [batch*seq, width]
    rows = keep.reshape(-1).to(flat.device)  # [batch, seq] -> [batch*seq]
    return flat[rows].to(device="cpu", dtype=torch.float64)  # [tokens, width]


class _Statistics:
    """Every group's running sums, fed one batch of both models at a time."""

    def __init__(self, probes: list[Probe]) -> None:
        self.probes = probes
        self.parts: dict[tuple[str, str], CrossStats] = {}
        self.residual: list[CrossStats] = []

    def add(
        self, keep: torch.Tensor, hidden: tuple[Hidden, Hidden], stores: tuple[Captured, Captured]
    ) -> None:
        """One batch: both models' hidden states and hooked activations, `keep` [batch, seq]."""
        hidden_a, hidden_b = hidden
        if not self.residual:
            width = hidden_a[0].shape[-1]
            self.residual = [CrossStats(width, width) for _ in hidden_a]
        # Every residual position (embeddings and each block's output) shares one permutation.
        for stats, a, b in zip(self.residual, hidden_a, hidden_b, strict=True):
            stats.update(_tokens(a, keep), _tokens(b, keep))
        for index, probe in enumerate(self.probes):
            a, b = (_tokens(_take(store, index, probe), keep)[:, probe.columns] for store in stores)
            key = (probe.group, probe.part)
            if key not in self.parts:
                self.parts[key] = CrossStats(a.shape[1], b.shape[1])
            self.parts[key].update(a, b)


class _Sums(Protocol):
    """What matching reads: every (group, part)'s statistics and each hidden state's."""

    @property
    def parts(self) -> Mapping[tuple[str, str], CrossStats]: ...

    @property
    def residual(self) -> Sequence[CrossStats]: ...


@dataclass(frozen=True)
class _StoredSums:
    """The statistics of models run one at a time, summed from their feature files on demand."""

    parts: Mapping[tuple[str, str], CrossStats]
    residual: Sequence[CrossStats]


def _take(store: Captured, index: int, probe: Probe) -> torch.Tensor:
    if index not in store:
        raise AlignmentError(
            f"module {probe.module} did not run in the forward pass",
            why="its activations are what the group is matched on",
            fix="use weight matching for this model",
        )
    return store.pop(index)


def _hidden_states(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> Hidden:
    """Run the model (its hooks fire) and return every residual-stream hidden state."""
    from hfmerge.lm.load import input_device  # offloaded weights sit on `meta`: inputs go to cpu

    inputs = {k: v.to(input_device(model)) for k, v in batch.items()}
    hidden: Hidden = model(**inputs, output_hidden_states=True).hidden_states
    return hidden


def _keep(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[batch, seq] True at real tokens, False at padding."""
    if "input_ids" not in batch:
        raise AlignmentError(
            "a batch has no input_ids", fix="pass tokenized batches (input_ids, attention_mask)"
        )
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones_like(batch["input_ids"], dtype=torch.bool, device="cpu")
    return mask.bool().cpu()


def _collect(
    spec: ArchSpec,
    model_a: PreTrainedModel,
    model_b: PreTrainedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    progress: bool,
) -> _Statistics:
    probes = probes_of(spec, dict(model_a.named_modules()))
    check_coverage(spec, probes)
    stores: tuple[Captured, Captured] = ({}, {})
    handles = _hooks(model_a, probes, stores[0]) + _hooks(model_b, probes, stores[1])
    stats = _Statistics(probes)
    try:
        with torch.inference_mode():
            for batch in track(batches, description="activation statistics", enabled=progress):
                keep = _keep(batch)
                hidden = (_hidden_states(model_a, batch), _hidden_states(model_b, batch))
                stats.add(keep, hidden, stores)
    finally:
        for handle in handles:
            handle.remove()
    if not stats.residual or stats.residual[0].count < 2:
        raise AlignmentError(
            "the batches hold fewer than two non-padding tokens",
            fix="pass probe text with more tokens",
        )
    return stats


def _attention_blocks(group: PermGroup, stats: _Sums) -> HeadBlocks:
    blocks: HeadBlocks = {}
    for part in ("q", "k", "o"):
        if (group.name, part) in stats.parts:
            correlation = stats.parts[group.name, part].correlation()
            blocks[part] = head_blocks(
                correlation, heads=part_heads(group, part), head_dim=group.head_dim
            )
    return blocks


def _match_group(group: PermGroup, stats: _Sums) -> tuple[GroupPerm, float]:
    """One group's assignment and the mean correlation of the units it matches."""
    if group.kind == "attention":
        blocks = _attention_blocks(group, stats)
        perm = solve_attention(group, blocks)
        matched = sum(part_heads(group, p) * group.head_dim for p in blocks)
        return perm, attention_objective(group, blocks, perm) / matched
    if group.kind == "residual":
        # One permutation serves every residual position: average their correlations (summed
        # one at a time: with the models run one at a time each is read from disk as it comes).
        total = torch.zeros(group.size, group.size, dtype=torch.float64)
        for residual_stats in stats.residual:
            total += residual_stats.correlation()
        similarity = total / len(stats.residual)  # [d, d]
    else:
        similarity = stats.parts[group.name, "units"].correlation()
    order = solve_lap(similarity)
    return order, assignment_value(similarity, order) / group.size


def _residual_rotation(spec: ArchSpec, stats: _Sums) -> torch.Tensor:
    """[hidden, hidden] orthogonal Q maximising Σ ⟨h_A, Q h_B⟩ over the non-padding tokens of
    every hidden state but the last (float64 sums C = Σ h_A h_Bᵀ, streamed per batch).

    transformers returns the last hidden state after the final norm, whose gain (A's is not
    folded) does not commute with Q; the others are the residual stream itself, which folding
    leaves unchanged, so Q read on the loaded models holds for the folded ones.
    """
    cross = sum(stats.residual[i].cross for i in range(len(stats.residual) - 1))  # [d, d]
    assert isinstance(cross, torch.Tensor)
    return residual_factor(spec, cross)  # fixing 1 where the norms centre


def activation_matching(
    spec: ArchSpec,
    model_a: PreTrainedModel,
    model_b: PreTrainedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    residual: ResidualMap = "permute",
    progress: bool = False,
) -> MatchResult:
    """Permutations of B's units that maximise the correlation of matched activations with A's.

    Residual: correlation averaged over every hidden state (embeddings and each block's output);
    FF: the input of the FF down-projection; attention: the input of the output projection (per
    head), plus the Q/K projection outputs where within-head Q/K dims are free; mixture-of-experts
    blocks: router logits for the expert order, and each expert's FF units on the tokens routed
    to it (`align/expert_activations.py`; the batches are run twice more). Memory: one float64
    [n, n] matrix per group and part (n = its width; the residual one per hidden state),
    whatever the amount of data.

    `spec` names the modules: the loaded model's tensor names, or for a mixture of experts the
    checkpoint's (its fused expert parameters are found through `lm/checkpoint_views.py`).

    `residual="rotate"` (`activation+orthogonal`, models to be read folded): the residual group
    is left as it is and `MatchResult.rotation` is the orthogonal Q of `_residual_rotation`
    instead. The FF and attention statistics are read inside blocks, where a map of the residual
    stream changes nothing, so they are those of B already rotated: no alternation is needed.
    """
    batches = list(batches)  # a mixture of experts reads them again
    stats = _collect(spec, model_a, model_b, batches, progress=progress)
    result = _matched(spec, stats, residual=residual)
    if not spec.has_experts:
        return result
    from hfmerge.align.expert_activations import expert_permutations

    keeps = [_keep(batch) for batch in batches]
    moe_perms, moe_correlation = expert_permutations(
        spec, model_a, model_b, batches, keeps, label=spec.model_type
    )
    correlation = {**(result.correlation or {}), **moe_correlation}
    return dataclasses.replace(
        result,
        perms={**result.perms, **moe_perms},
        objective=[sum(correlation.values())],
        correlation=correlation,
    )


def activation_matching_one_at_a_time(
    spec: ArchSpec,
    probes: list[Probe],
    loaders: tuple[Callable[[], PreTrainedModel], Callable[[], PreTrainedModel]],
    batches: Iterable[dict[str, torch.Tensor]],
    folder: Path,
    *,
    residual: ResidualMap = "permute",
    progress: bool = False,
) -> MatchResult:
    """`activation_matching` with A, then B, loaded, run and freed, their features kept in
    files under `folder` (`align/activation_store.py`): the same permutations, for models that
    do not fit together. `probes`: what to hook (`probes_of` on the model's modules; a model on
    the meta device will do, so they are known before any weight loads).

    Raises:
        AlignmentError: a mixture of experts (its expert statistics pair both models at once).
    """
    from hfmerge.align.activation_store import (
        StoredParts,
        StoredResidual,
        record_one_at_a_time,
    )

    if spec.has_experts:
        raise AlignmentError(
            "activation matching of a mixture of experts runs both models at once",
            why="each expert's statistics pair the tokens A and B route to it",
            fix="give --max-memory room for both models, or use weight matching",
        )
    check_coverage(spec, probes)
    store: Captured = {}

    def hooked(load: Callable[[], PreTrainedModel]) -> Callable[[], PreTrainedModel]:
        def loaded() -> PreTrainedModel:
            model = load()
            _hooks(model, probes, store)  # the model is freed after its run, hooks with it
            return model

        return loaded

    def features(
        model: PreTrainedModel, batch: dict[str, torch.Tensor]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        keep = _keep(batch)
        with torch.inference_mode():
            hidden = _hidden_states(model, batch)
        for i, h in enumerate(hidden):
            yield f"h{i}", _tokens(h, keep)
        for index, probe in enumerate(probes):
            yield f"p{index}", _tokens(_take(store, index, probe), keep)[:, probe.columns]

    files = record_one_at_a_time(
        (hooked(loaders[0]), hooked(loaders[1])), list(batches), features, folder, progress=progress
    )
    if not files[0].batch_rows or sum(files[0].batch_rows) < 2:
        raise AlignmentError(
            "the batches hold fewer than two non-padding tokens",
            fix="pass probe text with more tokens",
        )
    keys: dict[tuple[str, str], list[str]] = {}
    for index, probe in enumerate(probes):
        keys.setdefault((probe.group, probe.part), []).append(f"p{index}")
    depth = len([k for k in files[0].widths if k.startswith("h")])
    sums = _StoredSums(
        StoredParts(files, keys), StoredResidual(files, [f"h{i}" for i in range(depth)])
    )
    return _matched(spec, sums, residual=residual)


def _matched(spec: ArchSpec, stats: _Sums, *, residual: ResidualMap) -> MatchResult:
    """Every group but the experts' matched on `stats` (the residual one rotated or permuted)."""
    rotate = residual == "rotate"
    perms: Permutations = {}
    correlation: dict[str, float] = {}
    for group in spec.groups.values():
        if rotate and group.name == RESIDUAL:
            perms[group.name] = identity_permutations(spec)[RESIDUAL]  # Q takes its place
        elif not in_experts(group):
            perms[group.name], correlation[group.name] = _match_group(group, stats)
    return MatchResult(
        perms=perms,
        iterations=1,
        objective=[sum(correlation.values())],
        correlation=correlation,
        rotation=_residual_rotation(spec, stats) if rotate else None,
    )

"""Activation matching: one assignment per group on Pearson correlations of A's and B's features.

Features are captured with forward hooks and reduced to streaming float64 sums (never stored);
padding is masked out of every statistic. Attention groups use the head-aware solver.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from hfmerge.align.attention import (
    HeadBlocks,
    attention_objective,
    head_blocks,
    head_slices,
    part_heads,
    solve_attention,
)
from hfmerge.align.cross_stats import CrossStats
from hfmerge.align.lap import assignment_value, solve_lap
from hfmerge.align.orthogonal import orthogonal_factor
from hfmerge.align.weight_matching import MatchResult
from hfmerge.arch.common import RESIDUAL
from hfmerge.arch.permute import identity_permutations
from hfmerge.arch.spec import (
    ArchSpec,
    AxisRole,
    GroupPerm,
    Layout,
    PermGroup,
    Permutations,
)
from hfmerge.errors import AlignmentError
from hfmerge.progress import track

if TYPE_CHECKING:  # transformers is imported when matching runs, not when hfmerge.align loads
    from transformers import PreTrainedModel


Where = Literal["input", "output"]
ResidualMap = Literal["permute", "rotate"]


@dataclass(frozen=True)
class _Probe:
    """One captured feature set: a module's input or output, restricted to one group's part."""

    module: str
    where: Where
    group: str
    part: str  # "units" (FF), or an attention part: "o" (input of O), "q" or "k" (outputs)
    columns: torch.Tensor  # [features]: positions on the captured axis, head-major for parts


def _linear_axes(module: nn.Module) -> tuple[int, int] | None:
    """(output axis, input axis) of the module's weight; None if it is not a linear map."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return 0, 1  # [out, in]
    if isinstance(module, Conv1D):
        return 1, 0  # GPT-2 Conv1D stores [in, out]
    return None


def _input_probe(spec: ArchSpec, module: str, role: AxisRole | None) -> _Probe | None:
    """A module reading an FF group's units, or the per-head outputs of attention (O input)."""
    if role is None:
        return None
    group = spec.groups[role.group]
    if group.kind == "ff":
        return _Probe(module, "input", group.name, "units", torch.arange(group.size))
    if role.layout is Layout.O:
        where = head_slices(group, Layout.O)["o"].reshape(-1)  # -> [heads*head_dim]
        return _Probe(module, "input", group.name, "o", where)
    return None


def _output_probes(spec: ArchSpec, module: str, role: AxisRole | None) -> list[_Probe]:
    """A module writing queries and/or keys, when the group lets Q/K dims move at all."""
    if role is None or spec.groups[role.group].kind != "attention":
        return []
    group = spec.groups[role.group]
    start, end = group.qk_free_dims
    if end - start < 2:  # Q/K dims are pinned (RoPE): nothing to learn from them
        return []
    return [
        _Probe(module, "output", group.name, part, where.reshape(-1))  # [heads*head_dim]
        for part, where in head_slices(group, role.layout).items()
        if part in ("q", "k")
    ]


def _probes(spec: ArchSpec, modules: dict[str, nn.Module]) -> list[_Probe]:
    """From the spec: FF inputs of down-projections, O inputs, and free Q/K projection outputs.

    A weight tensor's name minus `.weight` is its module; the module type says which weight axis
    is its input (nn.Linear [out, in], GPT-2 Conv1D [in, out]).
    """
    probes: list[_Probe] = []
    for name, tensor in spec.tensors.items():
        module_name = name.removesuffix(".weight")
        module = modules.get(module_name) if name.endswith(".weight") else None
        axes = None if module is None or tensor.buffer else _linear_axes(module)
        if axes is None:
            continue
        out_role, in_role = tensor.axes[axes[0]], tensor.axes[axes[1]]
        probe = _input_probe(spec, module_name, in_role)
        probes += ([probe] if probe else []) + _output_probes(spec, module_name, out_role)
    return probes


def _in_experts(group: PermGroup) -> bool:
    """An experts group or an expert's FF group: matched by `align/expert_activations.py`."""
    return group.kind == "experts" or group.expert is not None


def _check_coverage(spec: ArchSpec, probes: list[_Probe]) -> None:
    """Every FF and attention group is read by a probed module, else there is nothing to match."""
    seen = {p.group for p in probes if p.part in ("units", "o")}
    missing = [
        g.name
        for g in spec.groups.values()
        if g.kind != "residual" and not _in_experts(g) and g.name not in seen
    ]
    if missing:
        raise AlignmentError(
            f"no linear module reads the units of {', '.join(missing[:5])}",
            why="activation matching captures the input of the projection after each group",
            fix="use weight matching for this model, or a model class whose module names match "
            "its checkpoint",
        )


Captured = dict[int, torch.Tensor]  # probe index -> captured activations [batch, seq, width]
Hidden = tuple[torch.Tensor, ...]  # hidden states, each [batch, seq, hidden]


def _hooks(
    model: nn.Module, probes: list[_Probe], store: Captured
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

    def __init__(self, probes: list[_Probe]) -> None:
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


def _take(store: Captured, index: int, probe: _Probe) -> torch.Tensor:
    if index not in store:
        raise AlignmentError(
            f"module {probe.module} did not run in the forward pass",
            why="its activations are what the group is matched on",
            fix="use weight matching for this model",
        )
    return store.pop(index)


def _hidden_states(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> Hidden:
    """Run the model (its hooks fire) and return every residual-stream hidden state."""
    inputs = {k: v.to(model.device) for k, v in batch.items()}
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
    probes = _probes(spec, dict(model_a.named_modules()))
    _check_coverage(spec, probes)
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


def _attention_blocks(group: PermGroup, stats: _Statistics) -> HeadBlocks:
    blocks: HeadBlocks = {}
    for part in ("q", "k", "o"):
        if (group.name, part) in stats.parts:
            correlation = stats.parts[group.name, part].correlation()
            blocks[part] = head_blocks(
                correlation, heads=part_heads(group, part), head_dim=group.head_dim
            )
    return blocks


def _match_group(group: PermGroup, stats: _Statistics) -> tuple[GroupPerm, float]:
    """One group's assignment and the mean correlation of the units it matches."""
    if group.kind == "attention":
        blocks = _attention_blocks(group, stats)
        perm = solve_attention(group, blocks)
        matched = sum(part_heads(group, p) * group.head_dim for p in blocks)
        return perm, attention_objective(group, blocks, perm) / matched
    if group.kind == "residual":
        # One permutation serves every residual position: average their correlations.
        similarity = torch.stack([s.correlation() for s in stats.residual]).mean(0)  # [d, d]
    else:
        similarity = stats.parts[group.name, "units"].correlation()
    order = solve_lap(similarity)
    return order, assignment_value(similarity, order) / group.size


def _residual_rotation(stats: _Statistics) -> torch.Tensor:
    """[hidden, hidden] orthogonal Q maximising Σ ⟨h_A, Q h_B⟩ over the non-padding tokens of
    every hidden state but the last (float64 sums C = Σ h_A h_Bᵀ, streamed per batch).

    transformers returns the last hidden state after the final norm, whose gain (A's is not
    folded) does not commute with Q; the others are the residual stream itself, which folding
    leaves unchanged, so Q read on the loaded models holds for the folded ones.
    """
    cross = torch.stack([s.cross for s in stats.residual[:-1]]).sum(0)  # [hidden, hidden]
    return orthogonal_factor(cross)


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
    rotate = residual == "rotate"
    perms: Permutations = {}
    correlation: dict[str, float] = {}
    for group in spec.groups.values():
        if rotate and group.name == RESIDUAL:
            perms[group.name] = identity_permutations(spec)[RESIDUAL]  # Q takes its place
        elif not _in_experts(group):
            perms[group.name], correlation[group.name] = _match_group(group, stats)
    if spec.has_experts:
        from hfmerge.align.expert_activations import expert_permutations

        keeps = [_keep(batch) for batch in batches]
        moe_perms, moe_correlation = expert_permutations(
            spec, model_a, model_b, batches, keeps, label=spec.model_type
        )
        perms |= moe_perms
        correlation |= moe_correlation
    return MatchResult(
        perms=perms,
        iterations=1,
        objective=[sum(correlation.values())],
        correlation=correlation,
        rotation=_residual_rotation(stats) if rotate else None,
    )

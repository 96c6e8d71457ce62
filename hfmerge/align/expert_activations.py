"""Activation matching inside mixture-of-experts blocks: expert order, then each expert's FF order.

transformers 5 runs a block's experts as one fused module (`mlp.experts`: `gate_up_proj` [experts,
2 * inner, hidden], gate rows then up rows; `down_proj` [experts, hidden, inner]), so no module
reads one expert's FF units and no hook can capture them. A forward pre-hook on the fused module
captures what it is given instead, the tokens' hidden states [tokens, hidden] and the experts each
token is routed to [tokens, top_k], and the features are computed from the models' own weights:

- expert order: the router logits (hidden @ router^T, [tokens, experts]) of A and B on the same
  tokens, correlated; one assignment on that [experts, experts] correlation pairs B's experts with
  A's slots. A router logit is its expert's gate activation, and no FF order changes it.
- each expert's FF order: the units act(gate) * up of A's expert in slot s and of B's expert paired
  with it, both on the tokens that A routes to slot s (those the expert works on), correlated and
  assigned as for a dense FF block. The assignment is that of the FF group keyed by B's expert.

The FF features need the expert order, so the batches are run through both models twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from hfmerge.align.cross_stats import CrossStats
from hfmerge.align.lap import assignment_value, solve_lap
from hfmerge.arch.experts import expert_ffs
from hfmerge.arch.spec import ArchSpec, Permutations
from hfmerge.errors import AlignmentError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MoeSite:
    """One MoE block: its experts group, and where the loaded model holds it."""

    group: str  # the experts group, "layers.3.experts"
    ffs: tuple[str, ...]  # the FF group of each expert, by expert index
    experts: str  # the fused experts module, "model.layers.3.mlp.experts"
    router: str  # the router's weight parameter [experts, hidden], "model.layers.3.mlp.gate.weight"


def moe_sites(spec: ArchSpec, model: PreTrainedModel, *, label: str) -> list[MoeSite]:
    """Every MoE block of `spec`, found in `model` through the checkpoint names' loaded names."""
    from hfmerge.lm.checkpoint_views import loaded_names

    loaded = loaded_names(model, label=label)
    sites = []
    for group, ffs in expert_ffs(spec).items():
        expert = next(n for n, t in spec.tensors.items() if t.expert and t.expert.group == group)
        router = next(
            n
            for n, t in spec.tensors.items()
            if t.expert is None and t.axes and t.axes[0] is not None and t.axes[0].group == group
        )
        fused = loaded[expert].rpartition(".")[0]  # "...experts.gate_up_proj" -> its module
        sites.append(MoeSite(group, tuple(ffs), fused, loaded[router]))
    return sites


def _fused_experts(model: PreTrainedModel, site: MoeSite) -> nn.Module:
    """The fused experts module, refused unless it has the layout this module computes with."""
    module = model.get_submodule(site.experts)
    weight = getattr(module, "gate_up_proj", None)
    fits = isinstance(weight, torch.Tensor) and weight.dim() == 3 and hasattr(module, "act_fn")
    if not fits or getattr(module, "is_transposed", False):
        raise AlignmentError(
            f"module {site.experts} is not a fused experts module with gate_up_proj "
            "[experts, 2 * inner, hidden] and act_fn",
            why="activation matching computes each expert's FF units from those weights",
            fix="use weight matching or canonical order for this model",
        )
    return module


def _units(module: nn.Module, expert: int, hidden: torch.Tensor) -> torch.Tensor:
    """[tokens, hidden] -> [tokens, inner]: the FF units of one expert, as transformers computes
    them (the input of its down projection)."""
    fused: torch.Tensor = getattr(module, "gate_up_proj")  # noqa: B009 - checked by _fused_experts
    act: Callable[[torch.Tensor], torch.Tensor] = getattr(module, "act_fn")  # noqa: B009
    gate, up = nn.functional.linear(hidden, fused[expert]).chunk(2, dim=-1)  # -> 2x [tokens, inner]
    return (act(gate) * up).to(torch.float64)


@dataclass(frozen=True)
class _Routed:
    """What one fused experts module was given in one forward pass (padding already dropped)."""

    hidden: torch.Tensor  # [tokens, hidden]
    chosen: torch.Tensor  # [tokens, top_k] expert indices


Captured = dict[str, _Routed]  # experts module name -> its inputs of the last forward pass


def _pre_hook(name: str, store: Captured) -> Callable[..., None]:
    """A hook that keeps the experts module's inputs: (hidden_states, top_k_index, weights)."""

    def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        chosen = args[1] if len(args) > 1 else kwargs["top_k_index"]
        store[name] = _Routed(hidden.detach(), chosen.detach())

    return hook


def _capture(
    model: PreTrainedModel, sites: Sequence[MoeSite], store: Captured
) -> list[RemovableHandle]:
    return [
        _fused_experts(model, site).register_forward_pre_hook(
            _pre_hook(site.experts, store), with_kwargs=True
        )
        for site in sites
    ]


def _run(model: PreTrainedModel, batch: Batch, store: Captured, keep: torch.Tensor) -> Captured:
    """Run one batch; every experts module's inputs at the batch's real tokens."""
    model(**{k: v.to(model.device) for k, v in batch.items()})
    rows = keep.reshape(-1)  # [batch, seq] -> [batch*seq]: the MoE block flattens tokens alike
    out = {}
    for name, routed in store.items():
        if routed.hidden.shape[0] != rows.numel():
            raise AlignmentError(
                f"module {name} was given {routed.hidden.shape[0]} tokens, not the batch's "
                f"{rows.numel()} positions",
                fix="use weight matching or canonical order for this model",
            )
        at = rows.to(routed.hidden.device)
        out[name] = _Routed(routed.hidden[at], routed.chosen[at])
    store.clear()
    return out


def _passes(
    model_a: PreTrainedModel,
    model_b: PreTrainedModel,
    sites: Sequence[MoeSite],
    batches: Sequence[Batch],
    keeps: Sequence[torch.Tensor],
) -> Iterator[tuple[Captured, Captured]]:
    """Yield both models' captured expert inputs, batch by batch (hooks removed at the end)."""
    stores: tuple[Captured, Captured] = ({}, {})
    handles = _capture(model_a, sites, stores[0]) + _capture(model_b, sites, stores[1])
    try:
        with torch.inference_mode():
            for batch, keep in zip(batches, keeps, strict=True):
                yield _run(model_a, batch, stores[0], keep), _run(model_b, batch, stores[1], keep)
    finally:
        for handle in handles:
            handle.remove()


def _logits(model: PreTrainedModel, site: MoeSite, routed: _Routed) -> torch.Tensor:
    router = model.get_parameter(site.router)  # [experts, hidden]
    logits = nn.functional.linear(routed.hidden, router)  # [tokens, hidden] -> [tokens, experts]
    return logits.to(torch.float64)


def expert_permutations(
    spec: ArchSpec,
    model_a: PreTrainedModel,
    model_b: PreTrainedModel,
    batches: Sequence[Batch],
    keeps: Sequence[torch.Tensor],
    *,
    label: str,
) -> tuple[Permutations, dict[str, float]]:
    """Every experts group's and expert FF group's permutation, and each group's mean matched
    correlation. `keeps[i]` [batch, seq] marks the real tokens of `batches[i]`."""
    sites = moe_sites(spec, model_a, label=label)
    routers = {site.experts: CrossStats(len(site.ffs), len(site.ffs)) for site in sites}
    for captured_a, captured_b in _passes(model_a, model_b, sites, batches, keeps):
        for site in sites:
            a, b = captured_a[site.experts], captured_b[site.experts]
            routers[site.experts].update(_logits(model_a, site, a), _logits(model_b, site, b))
    orders: dict[str, torch.Tensor] = {}
    correlation: dict[str, float] = {}
    for site in sites:
        similarity = routers[site.experts].correlation()  # [A's slots, B's experts]
        orders[site.group] = solve_lap(similarity)
        correlation[site.group] = assignment_value(similarity, orders[site.group]) / len(site.ffs)
    ffs: dict[tuple[str, int], CrossStats] = {}
    for captured_a, captured_b in _passes(model_a, model_b, sites, batches, keeps):
        for site in sites:
            _add_ff_stats(
                site, orders[site.group], (model_a, model_b), (captured_a, captured_b), ffs
            )
    for site in sites:
        for slot, expert in enumerate(orders[site.group].tolist()):
            similarity = ffs[site.experts, slot].correlation()  # [A's units, B's units]
            ff = site.ffs[expert]  # the FF group keyed by B's expert
            orders[ff] = solve_lap(similarity)
            correlation[ff] = assignment_value(similarity, orders[ff]) / similarity.shape[0]
    perms: Permutations = dict(orders)
    return perms, correlation


def _add_ff_stats(
    site: MoeSite,
    order: torch.Tensor,
    models: tuple[PreTrainedModel, PreTrainedModel],
    captured: tuple[Captured, Captured],
    ffs: dict[tuple[str, int], CrossStats],
) -> None:
    """One batch of each slot's FF units: A's expert there and B's paired expert, on A's tokens."""
    a, b = captured[0][site.experts], captured[1][site.experts]
    module_a, module_b = (model.get_submodule(site.experts) for model in models)
    for slot, expert in enumerate(order.tolist()):  # slot s holds B's expert order[s]
        routed = (a.chosen == slot).any(dim=-1)  # [tokens]: A sends them to this slot
        units_a = _units(module_a, slot, a.hidden[routed])  # [routed, inner]
        units_b = _units(module_b, expert, b.hidden[routed.to(b.hidden.device)])
        key = (site.experts, slot)
        if key not in ffs:
            ffs[key] = CrossStats(units_a.shape[1], units_b.shape[1])
        ffs[key].update(units_a.cpu(), units_b.cpu())

"""REPAIR for interpolated transformers: restore each channel's scale to the endpoints' blend.

Averaging two aligned models shrinks activations: two unit-RMS channels with correlation ρ average
to RMS √((1+ρ)/2), and the loss rises with every layer that shrinks (variance collapse; Jordan et
al., "REPAIR", ICLR 2023). REPAIR measures each channel in A and in π(B) on probe text, and rescales
the interpolated model so that channel's RMS is (1-λ)·rms_A + λ·rms_πB.

This is the scale-only variant: a factor per channel (per RoPE pair for queries and keys), folded
into the weights, so the result is a plain checkpoint of the same architecture. Shifting means too
would need biases that Llama-family models do not have.

Statistics are float64 sums of squares and token counts per site, accumulated over the probe's
batches (padding masked), so the probe set never has to fit in one batch. The fit is sequential:
each site's factor is target / RMS of the model with every earlier site corrected, so no batch
can be fitted on its own. Each pass fits the factors on the first batch as it runs (a site's
estimate of the whole probe's RMS is the previous pass's whole-probe RMS times the first batch's
change since that pass), applies them by hooks to every other batch, and sums the whole probe's
statistics. With one batch the first pass is the sequential fit and settles at once. With several,
a pass only leaves the factors exact once each is target / whole-probe RMS with them applied;
passes run until every factor is within `TOLERANCE` of that, or `MAX_PASSES` ran (each pass cut the
gap about tenfold on the test models), and only then are the factors folded into the weights.
Plain fixed-point passes (every factor set to target / measured at once) need about one pass per
site, since pass k only makes the first k sites exact; the first-batch estimate cuts that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from hfmerge.align.repair_sites import RepairSite, repair_sites
from hfmerge.errors import ArchitectureError
from hfmerge.progress import say

SiteRms = dict[str, torch.Tensor]  # site module -> [factors] RMS of each tied channel group
Factors = dict[str, torch.Tensor]  # site module -> [factors] the multiplier folded at that site
# input_ids, attention_mask: [b, t] per batch; the probe set, in batches of any size.
ProbeBatches = Sequence[Mapping[str, torch.Tensor]]
# A channel whose RMS is below this keeps factor 1 (dead units: no scale to restore).
MIN_RMS = 1e-8
TOLERANCE = 1e-6  # the fit stops once every factor is this close to target / whole-probe RMS
MAX_PASSES = 12  # ... or after this many passes over the probe batches


@dataclass
class SquareSums:
    """One site's running statistics: float64 sums of squares and the sample count."""

    sums: torch.Tensor  # [n_corrected] Σ x² over every sample so far
    count: int  # samples (tokens, times heads for a per-head site)

    def add(self, other: SquareSums) -> None:
        """Fold another batch's statistics of the same site into these."""
        self.sums += other.sums
        self.count += other.count


def square_sums(activation: torch.Tensor, mask: torch.Tensor, site: RepairSite) -> SquareSums:
    """Sums of squares over the unmasked tokens of each corrected channel of `site` (float64)."""
    if site.head_axis is not None:  # per-head: [b, t, heads, c], each head a sample
        activation = activation.movedim(site.head_axis, 2)  # [b, heads, t, c] -> [b, t, heads, c]
    tokens = activation[mask].double()  # [b, t, (heads,) c] -> [n_tokens, (heads,) c]
    tokens = tokens.reshape(-1, activation.shape[-1])  # -> [n_tokens (* heads), c]
    if site.channels is not None:
        tokens = tokens[:, site.channels]  # [n_tokens, n_corrected]
    return SquareSums(tokens.pow(2).sum(0), tokens.shape[0])  # [n_corrected]


def group_rms(stats: SquareSums, site: RepairSite) -> torch.Tensor:
    """[factors] RMS of each tied channel group of `site`, from its sums of squares."""
    mean_square = stats.sums / max(stats.count, 1)  # [n_corrected]
    if site.ties is None:
        return mean_square.sqrt()
    groups = int(site.ties.max()) + 1
    sums = torch.zeros(groups, dtype=torch.float64).index_add_(0, site.ties, mean_square)
    counts = torch.bincount(site.ties, minlength=groups).double()
    return (sums / counts).sqrt()


def channel_rms(activation: torch.Tensor, mask: torch.Tensor, site: RepairSite) -> torch.Tensor:
    """[factors] RMS over the unmasked tokens of each tied channel group of `site` (float64)."""
    return group_rms(square_sums(activation, mask, site), site)


def _per_channel(site: RepairSite, factors: torch.Tensor) -> torch.Tensor:
    """[n_corrected] each corrected channel's factor, from one factor per tie group."""
    return factors if site.ties is None else factors[site.ties]


def scaled(activation: torch.Tensor, site: RepairSite, factors: torch.Tensor) -> torch.Tensor:
    """The activation with its corrected channels multiplied by their factors."""
    scale = torch.ones(activation.shape[-1], dtype=activation.dtype, device=activation.device)
    channels = site.channels if site.channels is not None else slice(None)
    scale[channels] = _per_channel(site, factors).to(activation.dtype)
    return activation * scale  # [b, t, c] * [c]


def fold_axes(module: nn.Module, site: RepairSite) -> tuple[int, bool]:
    """(weight axis that carries the site's channels, whether the bias carries them too)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ArchitectureError(site.module, "has no weight to fold a repair factor into")
    if weight.dim() == 1:  # a norm's gain: its output is gain * normalised (+ bias)
        if site.side != "output":
            raise ArchitectureError(site.module, "is a norm, so only its output can be repaired")
        return 0, True
    out_axis = 1 if isinstance(module, Conv1D) else 0  # Conv1D stores [in, out], Linear [out, in]
    return (out_axis, True) if site.side == "output" else (1 - out_axis, False)


def folded(
    tensor: torch.Tensor, dim: int, site: RepairSite, factors: torch.Tensor, *, gain: bool
) -> torch.Tensor:
    """`tensor` with its entries along `dim` that carry the site's channels multiplied by their
    factors (a new tensor). `gain`: `tensor` is a norm's gain, so an offset gain (Gemma:
    x * (1 + w)) scales as (offset + w) * f = offset + w'."""
    channels = site.channels if site.channels is not None else torch.arange(tensor.shape[dim])
    shape = [1] * tensor.dim()
    shape[dim] = len(channels)
    offset = site.gain_offset if gain else 0.0
    picked = tensor.index_select(dim, channels) + offset  # channels along `dim`
    scaled_values = picked * _per_channel(site, factors).to(tensor.dtype).view(shape) - offset
    return tensor.index_copy(dim, channels, scaled_values)


def fold(module: nn.Module, site: RepairSite, factors: torch.Tensor) -> None:
    """Multiply the weight (and bias) entries that produce or read the site's channels, in place."""
    axis, with_bias = fold_axes(module, site)
    weight = module.get_parameter("weight")
    bias = getattr(module, "bias", None)
    targets = [weight] + ([bias] if with_bias and isinstance(bias, torch.Tensor) else [])
    with torch.no_grad():
        for tensor, dim in zip(targets, (axis, 0), strict=False):
            gain = tensor is weight and weight.dim() == 1
            tensor.copy_(folded(tensor, dim, site, factors, gain=gain))


Hook = Callable[[torch.Tensor, RepairSite], torch.Tensor | None]


@contextmanager
def hooked_sites(
    model: PreTrainedModel, sites: Sequence[RepairSite], on_activation: Hook
) -> Iterator[None]:
    """Call `on_activation(activation, site)` at every site; a returned tensor replaces it."""
    modules = dict(model.named_modules())
    missing = [site.module for site in sites if site.module not in modules]
    if missing:
        raise ArchitectureError(
            type(model).__name__,
            f"has no module {', '.join(missing[:3])}",
            fix="repair a model of a supported family, loaded by transformers",
        )
    handles = []
    for site in sites:
        module = modules[site.module]
        if site.side == "output":

            def after(
                _m: nn.Module, _args: Any, out: torch.Tensor, site: RepairSite = site
            ) -> torch.Tensor | None:
                return on_activation(out, site)

            handles.append(module.register_forward_hook(after))
        else:

            def before(
                _m: nn.Module, args: tuple[Any, ...], site: RepairSite = site
            ) -> tuple[Any, ...] | None:
                new = on_activation(args[0], site)
                return None if new is None else (new, *args[1:])

            handles.append(module.register_forward_pre_hook(before))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# (index of the batch in the probe, site, that batch's statistics there) -> factor to apply or None
SiteStep = Callable[[int, RepairSite, SquareSums], torch.Tensor | None]


def _sweep(
    model: PreTrainedModel, sites: Sequence[RepairSite], probe: ProbeBatches, step: SiteStep
) -> SiteRms:
    """One pass over every probe batch: each site's RMS over all of them (float64 sums).

    At each site `step` sees the batch's statistics and may return a factor, which scales the
    activation from there on (at an input site that stands in for folding it into the weights that
    read the channel), so later sites are measured with the earlier ones corrected.
    """
    stats: dict[str, SquareSums] = {}
    mask, index = torch.ones(0, dtype=torch.bool), 0

    def record(activation: torch.Tensor, site: RepairSite) -> torch.Tensor | None:
        batch_stats = square_sums(activation, mask, site)
        factor = step(index, site, batch_stats)
        if site.module in stats:
            stats[site.module].add(batch_stats)
        else:
            stats[site.module] = batch_stats
        return None if factor is None else scaled(activation, site, factor)

    with hooked_sites(model, sites, record), torch.no_grad():
        for index, batch in enumerate(probe):  # noqa: B007 (`record` reads `index`)
            mask = batch["attention_mask"].bool()  # [b, t] real tokens; padding never counts
            model(**batch)
    by_module = {site.module: site for site in sites}
    return {module: group_rms(s, by_module[module]) for module, s in stats.items()}


def measure(model: PreTrainedModel, sites: Sequence[RepairSite], probe: ProbeBatches) -> SiteRms:
    """Each site's channel-group RMS in `model` over all probe batches (one pass)."""
    return _sweep(model, sites, probe, lambda _index, _site, _stats: None)


def blend(rms_a: SiteRms, rms_b: SiteRms, lam: float) -> SiteRms:
    """The REPAIR target: (1-λ)·rms_A + λ·rms_B per channel group."""
    return {site: torch.lerp(rms_a[site], rms_b[site], lam) for site in rms_a}


def _factor(wanted: torch.Tensor, now: torch.Tensor) -> torch.Tensor:
    """Factor target / current RMS per channel group; 1 for a dead group (nothing to restore)."""
    return torch.where(now > MIN_RMS, wanted / now.clamp_min(MIN_RMS), torch.ones_like(now))


@dataclass(frozen=True)
class _Pass:
    """One fit pass: the factors it applied, and what it measured with them."""

    factors: Factors
    pilot: SiteRms  # the first batch's RMS at each site
    rms: SiteRms  # the RMS over all batches at each site


def _fit_pass(
    model: PreTrainedModel,
    sites: Sequence[RepairSite],
    probe: ProbeBatches,
    target: SiteRms,
    previous: _Pass | None,
) -> _Pass:
    """Fit the factors on the first batch as it runs, then apply them to the rest.

    At each site the first batch's RMS (earlier sites corrected) is scaled to an estimate of the
    whole probe's: the previous pass's whole-probe RMS times the first batch's change since then.
    With one batch that is the sequential fit itself; at the fixed point the estimate is exact.
    """
    factors: Factors = {}
    pilot: SiteRms = {}

    def step(index: int, site: RepairSite, stats: SquareSums) -> torch.Tensor:
        if index == 0:
            now = pilot[site.module] = group_rms(stats, site)
            if previous is not None:
                before, whole = previous.pilot[site.module], previous.rms[site.module]
                now = torch.where(before > MIN_RMS, whole * now / before.clamp_min(MIN_RMS), whole)
            factors[site.module] = _factor(target[site.module], now)
        return factors[site.module]

    rms = _sweep(model, sites, probe, step)
    return _Pass(factors, pilot, rms)


def fit_factors(
    model: PreTrainedModel, sites: Sequence[RepairSite], probe: ProbeBatches, target: SiteRms
) -> tuple[Factors, int]:
    """(the factors that bring each site's RMS to `target`, passes over the probe it took).

    The factors are exact once each is target / RMS over the whole probe with them applied; passes
    run until no factor is off from that by more than `TOLERANCE`, or `MAX_PASSES` ran.
    """
    fitted: _Pass | None = None
    for passes in range(1, MAX_PASSES + 1):
        fitted = _fit_pass(model, sites, probe, target, fitted)
        off = max(
            float((factor - _factor(target[site], fitted.rms[site])).abs().max())
            for site, factor in fitted.factors.items()
        )
        if off <= TOLERANCE:
            return fitted.factors, passes
    assert fitted is not None  # MAX_PASSES >= 1
    # Still usable (each pass cuts the gap about tenfold), but not at the fixed point: said, so a
    # user comparing REPAIR runs knows this one stopped short.
    say(
        f"REPAIR's fit stopped after {MAX_PASSES} passes over the probe with a factor still "
        f"{off:.1e} from its target (tolerance {TOLERANCE:.0e}); fewer, larger probe batches "
        "converge in fewer passes",
        prefix="warning: ",
        prefix_style="yellow",
    )
    return fitted.factors, MAX_PASSES


def fold_factors(model: PreTrainedModel, sites: Sequence[RepairSite], factors: Factors) -> None:
    """Fold each site's factor into its weights, in place."""
    modules = dict(model.named_modules())
    for site in sites:
        if site.module in factors:
            fold(modules[site.module], site, factors[site.module])


def fit(
    model: PreTrainedModel, sites: Sequence[RepairSite], probe: ProbeBatches, target: SiteRms
) -> Factors:
    """Rescale `model` in place so each site's RMS meets `target`; returns the folded factors.

    The factors are fitted over the probe batches (`fit_factors`), then folded into each site's
    weights. (A plain pass of the result then shows the target at output sites, and
    target / factor at input sites: there the factor sits in the weights that read the channel.)
    """
    factors, _ = fit_factors(model, sites, probe, target)
    fold_factors(model, sites, factors)
    return factors


class Repairer:
    """REPAIR between two fixed endpoints: their statistics once, then `apply(model, λ)` per λ."""

    def __init__(self, model: PreTrainedModel, probe: ProbeBatches) -> None:
        self.sites = repair_sites(model)
        self.probe = probe
        self.rms_a: SiteRms = {}
        self.rms_b: SiteRms = {}

    def measure_endpoints(self, load: Callable[[float], PreTrainedModel]) -> None:
        """Record A's and π(B)'s statistics; `load(λ)` returns the model holding that point."""
        self.rms_a = measure(load(0.0), self.sites, self.probe)
        self.rms_b = measure(load(1.0), self.sites, self.probe)

    def apply(self, model: PreTrainedModel, lam: float) -> Factors:
        """Rescale the interpolated `model` (holding (1-λ)·A + λ·π(B)) to the blended statistics."""
        if not self.rms_a:
            raise RuntimeError("measure_endpoints must run before apply")
        return fit(model, self.sites, self.probe, blend(self.rms_a, self.rms_b, lam))


__all__ = [
    "MAX_PASSES",
    "TOLERANCE",
    "Factors",
    "ProbeBatches",
    "Repairer",
    "SiteRms",
    "SquareSums",
    "blend",
    "channel_rms",
    "fit",
    "fit_factors",
    "fold",
    "fold_axes",
    "fold_factors",
    "folded",
    "group_rms",
    "hooked_sites",
    "measure",
    "scaled",
    "square_sums",
]

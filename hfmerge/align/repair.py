"""REPAIR for interpolated transformers: restore each channel's scale to the endpoints' blend.

Averaging two aligned models shrinks activations: two unit-RMS channels with correlation ρ average
to RMS √((1+ρ)/2), and the loss rises with every layer that shrinks (variance collapse; Jordan et
al., "REPAIR", ICLR 2023). REPAIR measures each channel in A and in π(B) on probe text, and rescales
the interpolated model so that channel's RMS is (1-λ)·rms_A + λ·rms_πB.

This is the scale-only variant: a factor per channel (per RoPE pair for queries and keys), folded
into the weights, so the result is a plain checkpoint of the same architecture. Shifting means too
would need biases that Llama-family models do not have. The fit is sequential in one forward pass:
each site's hook sees the activations of the model with every earlier site already corrected, so
the whole probe set goes through as one batch.
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

SiteRms = dict[str, torch.Tensor]  # site module -> [factors] RMS of each tied channel group
Factors = dict[str, torch.Tensor]  # site module -> [factors] the multiplier folded at that site
# A channel whose RMS is below this keeps factor 1 (dead units: no scale to restore).
MIN_RMS = 1e-8


def channel_rms(activation: torch.Tensor, mask: torch.Tensor, site: RepairSite) -> torch.Tensor:
    """[factors] RMS over the unmasked tokens of each tied channel group of `site` (float64)."""
    if site.head_axis is not None:  # per-head: [b, t, heads, c], each head a sample
        activation = activation.movedim(site.head_axis, 2)  # [b, heads, t, c] -> [b, t, heads, c]
    tokens = activation[mask].double()  # [b, t, (heads,) c] -> [n_tokens, (heads,) c]
    tokens = tokens.reshape(-1, activation.shape[-1])  # -> [n_tokens (* heads), c]
    if site.channels is not None:
        tokens = tokens[:, site.channels]  # [n_tokens, n_corrected]
    mean_square = tokens.pow(2).mean(0)  # [n_corrected]
    if site.ties is None:
        return mean_square.sqrt()
    groups = int(site.ties.max()) + 1
    sums = torch.zeros(groups, dtype=torch.float64).index_add_(0, site.ties, mean_square)
    counts = torch.bincount(site.ties, minlength=groups).double()
    return (sums / counts).sqrt()


def _per_channel(site: RepairSite, factors: torch.Tensor) -> torch.Tensor:
    """[n_corrected] each corrected channel's factor, from one factor per tie group."""
    return factors if site.ties is None else factors[site.ties]


def scaled(activation: torch.Tensor, site: RepairSite, factors: torch.Tensor) -> torch.Tensor:
    """The activation with its corrected channels multiplied by their factors."""
    scale = torch.ones(activation.shape[-1], dtype=activation.dtype, device=activation.device)
    channels = site.channels if site.channels is not None else slice(None)
    scale[channels] = _per_channel(site, factors).to(activation.dtype)
    return activation * scale  # [b, t, c] * [c]


def _axes(module: nn.Module, site: RepairSite) -> tuple[int, bool]:
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


def fold(module: nn.Module, site: RepairSite, factors: torch.Tensor) -> None:
    """Multiply the weight (and bias) entries that produce or read the site's channels, in place."""
    axis, with_bias = _axes(module, site)
    weight = module.get_parameter("weight")
    bias = getattr(module, "bias", None)
    targets = [weight] + ([bias] if with_bias and isinstance(bias, torch.Tensor) else [])
    channels = site.channels if site.channels is not None else torch.arange(weight.shape[axis])
    per_channel = _per_channel(site, factors)
    with torch.no_grad():
        for tensor, dim in zip(targets, (axis, 0), strict=False):
            shape = [1] * tensor.dim()
            shape[dim] = len(channels)
            # An offset gain (Gemma: x * (1 + w)) scales as (offset + w) * f = offset + w'.
            offset = site.gain_offset if tensor is weight and weight.dim() == 1 else 0.0
            picked = tensor.index_select(dim, channels) + offset  # channels along `dim`
            scaled_values = picked * per_channel.to(tensor.dtype).view(shape) - offset
            tensor.index_copy_(dim, channels, scaled_values)


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


@dataclass(frozen=True)
class ProbeBatch:
    """All probe windows as one padded batch: the sequential fit needs every token at each site."""

    inputs: Mapping[str, torch.Tensor]  # input_ids, attention_mask: [b, t]

    @property
    def mask(self) -> torch.Tensor:
        """[b, t] bool: real tokens (padding never enters the statistics)."""
        return self.inputs["attention_mask"].bool()


def measure(model: PreTrainedModel, sites: Sequence[RepairSite], probe: ProbeBatch) -> SiteRms:
    """Each site's channel-group RMS in `model` on the probe batch (one forward pass)."""
    rms: SiteRms = {}

    def record(activation: torch.Tensor, site: RepairSite) -> None:
        rms[site.module] = channel_rms(activation, probe.mask, site)

    with hooked_sites(model, sites, record), torch.no_grad():
        model(**probe.inputs)
    return rms


def blend(rms_a: SiteRms, rms_b: SiteRms, lam: float) -> SiteRms:
    """The REPAIR target: (1-λ)·rms_A + λ·rms_B per channel group."""
    return {site: torch.lerp(rms_a[site], rms_b[site], lam) for site in rms_a}


def fit(
    model: PreTrainedModel, sites: Sequence[RepairSite], probe: ProbeBatch, target: SiteRms
) -> Factors:
    """Rescale `model` in place so each site's RMS meets `target`; returns the folded factors.

    One forward pass: at each site (in execution order) the factor is target / current RMS and
    is folded into the site's weights, so later sites are fitted on the already corrected model.
    An output site's module has already run, so its output is rescaled on the way out; an input
    site's module has not, so its folded weights apply the factor themselves. (A plain pass of the
    result then shows the target at output sites, and target / factor at input sites: there the
    factor sits in the weights that read the channel.)
    """
    modules = dict(model.named_modules())
    factors: Factors = {}

    def correct(activation: torch.Tensor, site: RepairSite) -> torch.Tensor | None:
        now = channel_rms(activation, probe.mask, site)
        wanted = target[site.module]
        factor = torch.where(now > MIN_RMS, wanted / now.clamp_min(MIN_RMS), torch.ones_like(now))
        factors[site.module] = factor
        fold(modules[site.module], site, factor)
        return scaled(activation, site, factor) if site.side == "output" else None

    with hooked_sites(model, sites, correct), torch.no_grad():
        model(**probe.inputs)
    return factors


class Repairer:
    """REPAIR between two fixed endpoints: their statistics once, then `apply(model, λ)` per λ."""

    def __init__(self, model: PreTrainedModel, probe: ProbeBatch) -> None:
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
    "Factors",
    "ProbeBatch",
    "Repairer",
    "SiteRms",
    "blend",
    "channel_rms",
    "fit",
    "fold",
    "hooked_sites",
    "measure",
    "scaled",
]

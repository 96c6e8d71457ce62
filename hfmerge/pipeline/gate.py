"""The recipe's `check:` gate: CKA per block between the base and each input, before merging.

The gate uses `hfmerge cka`'s default, token pooling with at most 16 random tokens per window:
mean-pooled windows read close to 1 even against a random init of the same shape (they are near
bag-of-words averages), token samples do not (see `hfmerge.lm.probe`). Below `check.cka_min` the
run stops before anything is written and shows the `route:` block that would serve the models
instead. CKA is blind to permutations, so aligned or not, the values are the same; alignment
changes whether averaging works, CKA says whether the models still share features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from hfmerge.analysis.cka import CkaReport, compute_cka, failing_layers, pooling_label
from hfmerge.engine.plan import MergePlan
from hfmerge.errors import CkaGateError
from hfmerge.recipe.schema import Recipe


@dataclass(frozen=True)
class CkaCheck:
    """The gate's reports (one per input other than the base) for the card."""

    threshold: float | None
    reports: list[CkaReport] = field(default_factory=list)

    def card_section(self) -> str:
        """Markdown: the per-layer CKA of every input against the base ('' when not run)."""
        if not self.reports:
            return ""
        layers = self.reports[0].layers_a
        lines = [
            "## CKA compatibility",
            "",
            f"Debiased linear CKA per layer against the base, {pooling_label(self.reports[0])} "
            f"(gate: `cka_min` {self.threshold:g}).",
            "",
            "| input | " + " | ".join(layers) + " |",
            "|---|" + "---|" * len(layers),
        ]
        for report in self.reports:
            values = " | ".join(f"{v:.3f}" for v in report.diagonal)
            lines.append(f"| `{report.model_b}` | {values} |")
        return "\n".join(lines)


def cka_gate(recipe: Recipe, plan: MergePlan, *, force: bool, progress: bool) -> CkaCheck:
    """Run the gate; raise `CkaGateError` below the threshold unless `force`."""
    threshold = recipe.check.cka_min
    if threshold is None:
        return CkaCheck(threshold)
    probe = recipe.probe
    reports = [
        compute_cka(
            plan.base.source,
            model.source,
            data=probe.data,
            samples=probe.samples,
            max_length=probe.max_length,
            device_map=probe.device_map,
            progress=progress,
        )
        for model in plan.inputs
        if model is not plan.base
    ]
    for report in reports:
        if failing_layers(report, threshold) and not force:
            raise _gate_error(report, threshold, route_block(recipe))
    return CkaCheck(threshold, reports)


def _gate_error(report: CkaReport, threshold: float, route: str) -> CkaGateError:
    i, _, value = min(failing_layers(report, threshold), key=lambda f: f[2])
    return CkaGateError(
        report.model_a,
        report.model_b,
        layer=report.layers_a[i],
        value=value,
        threshold=threshold,
        route_block=route,
    )


def route_block(recipe: Recipe) -> str:
    """The `route:` section that would serve these models instead of a merge."""
    experts = [{"data": _calibration_hint(entry.model)} for entry in recipe.models]
    block = {"route": {"method": "centroid", "experts": experts}}
    return yaml.safe_dump(block, sort_keys=False, default_flow_style=False).rstrip()


def _calibration_hint(model: str) -> str:
    """The zoo's specialists have built-in training text; other models need the user's."""
    from hfmerge.zoo.corpus import DOMAINS

    domain = model.removeprefix("zoo:")
    if model.startswith("zoo:") and domain in DOMAINS:  # the specialists are named by domain
        return f"builtin:{domain}-train"
    return f"text typical of {model}'s inputs (a file path)"

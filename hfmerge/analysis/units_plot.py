"""Unit correspondence by layer (`hfmerge units --plot`): the three views' scores on one axis, the
units each uses on another (PNG)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hfmerge.analysis.cka import short_name
from hfmerge.analysis.plotting import save_figure
from hfmerge.analysis.unit_report import UnitsReport


def plot_units(report: UnitsReport, out: Path) -> Path:
    """Write the two-panel plot of `report` to `out` (PNG, Agg canvas, no display needed).

    Raises:
        OutputError: `out` cannot be written.
    """
    figure = Figure(figsize=(7.5, 6.5), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself; savefig then renders with Agg
    scores, sizes = figure.subplots(2, 1, sharex=True)
    x = list(range(len(report.layers)))
    layers = report.layers
    series = {
        "matched r (one-to-one)": [la.one_to_one.matched_correlation for la in layers],
        "held-out R², matched unit alone": [la.one_to_many.single_unit_heldout_r2 for la in layers],
        "held-out R², lasso (one-to-many)": [la.one_to_many.heldout_r2 for la in layers],
        "mean |r| within groups": [la.many_to_many.within_abs_r for la in layers],
        "mean |r| across groups": [la.many_to_many.across_abs_r for la in layers],
    }
    for label, values in series.items():
        scores.plot(x, values, marker="o", markersize=3, label=label)
    scores.set_ylabel("correlation / R²")
    scores.grid(alpha=0.3)
    scores.legend(fontsize="small")
    sizes.plot(
        x, [la.one_to_many.mean_units_used for la in layers], marker="o", label="A units per lasso"
    )
    sizes.plot(
        x,
        [la.many_to_many.mean_units_a + la.many_to_many.mean_units_b for la in layers],
        marker="s",
        label="units per group (A + B)",
    )
    sizes.set_yscale("log")
    sizes.set_ylabel("units (mean)")
    sizes.grid(alpha=0.3)
    sizes.legend(fontsize="small")
    sizes.set_xticks(x, [f"{short_name(la.layer_a)}/{short_name(la.layer_b)}" for la in layers])
    sizes.set_xlabel("layer of A / layer of B (emb = embeddings, k = block k)")
    scores.set_title(
        f"Unit correspondence {report.model_a} (A) vs {report.model_b} (B), {report.tokens} tokens",
        fontsize="medium",
        wrap=True,
    )
    return save_figure(figure, Path(out))


__all__ = ["plot_units"]

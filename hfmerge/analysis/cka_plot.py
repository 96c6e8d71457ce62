"""CKA heatmap (`hfmerge cka --plot`): layers of A by layers of B, values written in the cells."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from hfmerge.analysis.cka import CkaReport, pooling_label, short_name
from hfmerge.analysis.plotting import save_figure


def plot_cka(report: CkaReport, out: Path) -> Path:
    """Write the heatmap of `report.matrix` to `out` (PNG, Agg canvas, no display needed).

    Raises:
        OutputError: `out` cannot be written.
    """
    rows, cols = len(report.layers_a), len(report.layers_b)
    cell = 0.55 if max(rows, cols) > 12 else 0.7
    figure = Figure(
        figsize=(max(5.0, 2.5 + cell * cols), max(4.0, 1.8 + cell * rows)),
        dpi=120,
        layout="constrained",
    )
    FigureCanvasAgg(figure)  # attaches itself; savefig then renders with Agg
    axes = figure.add_subplot()
    # Debiased CKA can dip slightly below 0; pin the colour scale so figures compare.
    image = axes.imshow(
        report.matrix, vmin=0.0, vmax=1.0, cmap="viridis", origin="upper", aspect="auto"
    )
    figure.colorbar(image, ax=axes, label=f"{report.estimator} linear CKA")
    _write_values(axes, report)
    for i, j in report.diagonal_pairs:  # outline the pairs the diagonal (and --fail-under) use
        axes.add_patch(
            Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="tab:red", linewidth=1.5)
        )
    axes.set_xticks(range(cols), [short_name(n) for n in report.layers_b])
    axes.set_yticks(range(rows), [short_name(n) for n in report.layers_a])
    axes.set_xlabel(f"layer of B: {report.model_b}  (emb = embeddings, k = block k)")
    axes.set_ylabel(f"layer of A: {report.model_a}")
    axes.set_title(
        f"CKA, {pooling_label(report)}, {report.cka_samples} samples "
        f"({report.settings.get('data', '?')})",
        fontsize="medium",
        wrap=True,
    )
    return save_figure(figure, Path(out))


def _write_values(axes: Axes, report: CkaReport) -> None:
    size = "x-small" if max(len(report.layers_a), len(report.layers_b)) > 10 else "small"
    for i, row in enumerate(report.matrix):
        for j, value in enumerate(row):
            text = "nan" if math.isnan(value) else f"{value:.2f}"
            # Dark text on the bright end of viridis, light text on the dark end.
            color = "black" if not math.isnan(value) and value > 0.6 else "white"
            axes.text(j, i, text, ha="center", va="center", color=color, fontsize=size)


__all__ = ["plot_cka"]

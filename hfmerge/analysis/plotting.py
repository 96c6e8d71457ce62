"""Barrier plots: loss against λ, one curve per alignment mode, endpoint baseline dashed (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from hfmerge.analysis.barrier import BarrierResult

_COLORS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange")


def barrier_title(results: Sequence[BarrierResult]) -> str:
    """`Loss barrier A → B: none 1.234, weight 0.056`."""
    first = results[0]
    values = ", ".join(f"{r.align} {r.barrier:.3f}" for r in results)
    return f"Loss barrier {first.model_a} → {first.model_b}: {values}"


def plot_barriers(results: Sequence[BarrierResult], out: Path, *, title: str | None = None) -> Path:
    """Write the barrier plot of `results` to `out` (PNG, Agg canvas: no display, no global state).

    Raises:
        OutputError: `out` cannot be written.
    """
    if not results:
        raise ValueError("nothing to plot: no barrier results")
    figure = Figure(figsize=(7.0, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself to the figure; savefig then renders with Agg
    axes = figure.add_subplot()
    # Alignment keeps B's function, so the endpoints (and baselines) usually coincide: draw one.
    shared = all(abs(r.loss_b - results[0].loss_b) < 1e-6 for r in results)
    for i, result in enumerate(results):
        color = _COLORS[i % len(_COLORS)]
        axes.plot(
            result.lambdas,
            result.loss,
            marker="o",
            markersize=3,
            color=color,
            label=f"align={result.align} (barrier {result.barrier:.3f})",
        )
        if shared and i > 0:
            continue
        axes.plot(
            [0.0, 1.0],
            [result.loss_a, result.loss_b],
            linestyle="--",
            color="tab:gray" if shared else color,
            alpha=0.8,
            label="linear baseline" if shared else f"align={result.align}: linear baseline",
        )
    unit = "masked-token" if results[0].objective == "masked" else "next-token"
    axes.set_xlabel(f"λ (0 = {results[0].model_a}, 1 = {results[0].model_b})")
    axes.set_ylabel(f"mean {unit} loss (nats)")
    axes.set_xlim(0.0, 1.0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    axes.set_title(title or barrier_title(results), fontsize="medium", wrap=True)
    return save_figure(figure, Path(out))


def save_figure(figure: Figure, out: Path) -> Path:
    """Write `figure` as a PNG to `out` atomically."""
    from hfmerge.analysis.reports import replace_atomically

    return replace_atomically(out, lambda tmp: figure.savefig(tmp, format="png"), what="the plot")


__all__ = ["barrier_title", "plot_barriers", "save_figure"]

"""The commands that measure or rewrite models: eval, barrier, align, canonicalize, fingerprint,
cka, units, extract-lora.

Each parses its options, checks where its reports go before the long work, calls one
`hfmerge.api` function and prints the result. `cli/app.py` registers them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Protocol

import typer

from hfmerge.progress import say
from hfmerge.recipe.align_methods import ALIGN_METHODS


def _check_reports(json_out: Path | None, plot: Path | None = None) -> None:
    """Refuse a report path that cannot be written now, before the models load, not after."""
    from hfmerge.analysis.reports import check_report_path

    if json_out is not None:
        check_report_path(json_out, "the JSON report")
    if plot is not None:
        check_report_path(plot, "the plot")


class _Report(Protocol):
    """A command's report, as its JSON file holds it."""

    def to_json(self) -> dict[str, Any]: ...


def _write_reports(
    report: _Report,
    json_out: Path | None,
    plot: Path | None = None,
    draw: Callable[[Path], Path] | None = None,
) -> None:
    """Write the JSON report and the plot the flags ask for, each announced on stderr."""
    from hfmerge.analysis.reports import write_json

    if json_out is not None:
        say(f"wrote {write_json(json_out, report.to_json())}")
    if plot is not None and draw is not None:
        say(f"wrote {draw(plot)}")


EvalModelArg = Annotated[str, typer.Argument(help="Model dir or zoo:NAME.", show_default=False)]
EvalDataOpt = Annotated[
    str | None,
    typer.Option(
        "--data", help="UTF-8 text file, .jsonl with a `text` field, or builtin[:code|prose|mixed]."
    ),
]
EvalJsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON.")]
EvalLengthOpt = Annotated[int, typer.Option("--max-length", min=2, help="Tokens per window.")]
EvalSamplesOpt = Annotated[
    int | None,
    typer.Option(
        "--samples", min=1, help="Use this many windows, spread over the data (default: all)."
    ),
]
EvalBatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Windows per forward pass.")]


def eval_(
    models: Annotated[
        list[str],
        typer.Argument(help="Model dirs, zoo:NAME, Hub ids or routed repos.", show_default=False),
    ],
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data",
            help="UTF-8 text file, .jsonl with a `text` field, or "
            "builtin[:code|prose|mixed]; repeat it to compare on several texts.",
        ),
    ] = None,
    json_out: EvalJsonOpt = None,
    max_length: EvalLengthOpt = 128,
    samples: EvalSamplesOpt = None,
    batch_size: EvalBatchOpt = 8,
) -> None:
    """Mean token loss and perplexity of models on text (MLM loss on fixed masks for BERT).

    Routed repos are evaluated through their router; several models or texts give a table.
    """
    from hfmerge import api
    from hfmerge.analysis.evaluation import format_grid

    _check_reports(json_out)
    report = api.evaluate(
        models, data=data, max_length=max_length, samples=samples, batch_size=batch_size
    )
    typer.echo(format_grid(report.cells))
    _write_reports(report, json_out)


def barrier(
    model_a: EvalModelArg,
    model_b: EvalModelArg,
    align: Annotated[
        list[str] | None,
        typer.Option(
            "--align",
            help=f"{', '.join(ALIGN_METHODS)}, each optionally +repair (weight+repair rescales "
            "every interpolated point to the endpoints' channel statistics); repeat it (or a "
            "comma list) to compare.",
        ),
    ] = None,
    data: EvalDataOpt = None,
    probe_data: Annotated[
        str | None,
        typer.Option(
            "--probe-data",
            help="Text for activation matching, learned alignment and REPAIR statistics, kept "
            "apart from the "
            "scored --data (same forms as --data; default: --data itself).",
        ),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=2, help="Points on the λ grid.")] = 11,
    json_out: EvalJsonOpt = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG plot of loss vs λ.")
    ] = None,
    max_length: EvalLengthOpt = 128,
    samples: EvalSamplesOpt = None,
    batch_size: EvalBatchOpt = 8,
) -> None:
    """Loss along the straight line from MODEL_A to MODEL_B, and its barrier."""
    from hfmerge import api
    from hfmerge.analysis.barrier import format_barrier_table

    _check_reports(json_out, plot)
    report = api.barrier(
        model_a,
        model_b,
        align=align or [],
        steps=steps,
        data=data,
        probe_data=probe_data,
        max_length=max_length,
        samples=samples,
        batch_size=batch_size,
    )
    typer.echo(format_barrier_table(report.results))

    def draw(path: Path) -> Path:
        from hfmerge.analysis.plotting import (
            plot_barriers,
        )  # matplotlib only when a plot is asked for

        return plot_barriers(report.results, path)

    _write_reports(report, json_out, plot, draw)


def align(
    model_a: Annotated[str, typer.Argument(help="Reference model: its basis is kept.")],
    model_b: Annotated[str, typer.Argument(help="Model to rewrite into MODEL_A's basis.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for aligned MODEL_B.")],
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="weight (no data), activation (probe text), canonical (both models' "
            "canonical unit order, no data), weight+orthogonal (pre-norm models: norm gains "
            "folded, the residual stream rotated; no data), activation+orthogonal (the same, "
            "from probe text) or learned (weight+orthogonal's rotation refined by gradient "
            "descent on the midpoint model's loss on probe text).",
        ),
    ] = "weight",
    data: Annotated[
        str | None,
        typer.Option("--data", help="Probe text for the activation methods and learned."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of weight matching's order.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    max_memory: Annotated[
        str | None,
        typer.Option(
            "--max-memory",
            help="Host memory of the alignment, e.g. 3GB (activation: models one at a time, "
            "offloaded if need be; canonical and learned: refused if too small).",
        ),
    ] = None,
) -> None:
    """Write MODEL_B permuted (or rotated) into MODEL_A's basis: the same function, loadable."""
    from hfmerge import api

    result = api.align(
        model_a,
        model_b,
        out,
        method=method,  # type: ignore[arg-type]  # api.align refuses unknown methods
        data=data,
        seed=seed,
        force=force,
        max_memory=max_memory,
    )
    typer.echo(str(result.out_dir))
    say(
        f"{model_b} aligned into {model_a}'s basis by {method} matching in "
        f"{result.iterations} sweep(s); the map is saved beside the weights."
    )


def canonicalize(
    model: Annotated[str, typer.Argument(help="Model dir, zoo:NAME or Hub id.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for the canonical model.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
) -> None:
    """Write MODEL with every permutation group in canonical order: the same function, and the
    same tensors for any permuted copy of it."""
    from hfmerge import api

    result = api.canonicalize(model, out, force=force)
    typer.echo(str(result.out_dir))
    say(f"{model} written in canonical unit order; permutations saved beside the weights.")


def fingerprint(
    models: Annotated[
        list[str], typer.Argument(help="Model dirs, zoo:NAME or Hub ids.", show_default=False)
    ],
    json_out: EvalJsonOpt = None,
) -> None:
    """Permutation-invariant fingerprints from weights alone; for two or more models, a
    similarity table with a verdict per pair (same weights up to permutation, derived from,
    unrelated)."""
    from hfmerge import api
    from hfmerge.analysis.fingerprint import format_pairs

    _check_reports(json_out)
    report = api.fingerprint(models)
    if report.pairs:
        typer.echo(format_pairs(report.pairs))
    else:
        say("one model fingerprinted; give two or more to compare them")
    _write_reports(report, json_out)


def cka(
    model_a: EvalModelArg,
    model_b: EvalModelArg,
    data: EvalDataOpt = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Probe windows.")] = 256,
    max_length: EvalLengthOpt = 128,
    batch_size: EvalBatchOpt = 8,
    json_out: EvalJsonOpt = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG heatmap.")] = None,
    fail_under: Annotated[
        float | None, typer.Option("--fail-under", help="Exit 1 if a diagonal CKA is below X.")
    ] = None,
    device_map: Annotated[
        str, typer.Option("--device-map", help="auto, cpu, cuda:0, ... or a JSON device map.")
    ] = "auto",
    max_memory: Annotated[
        str | None,
        typer.Option(
            "--max-memory",
            help="One size for host memory, e.g. 4GB (the models run together, one at a time, "
            "or with layers offloaded to disk, as it allows), or per-device limits: "
            "`0=20GiB,cpu=60GiB`.",
        ),
    ] = None,
    pooling: Annotated[
        str | None,
        typer.Option(
            "--pooling",
            help="tokens (real tokens are the samples; default) or mean (one per window).",
        ),
    ] = None,
    tokens_per_window: Annotated[
        int | None,
        typer.Option(
            "--tokens-per-window",
            min=0,
            help="With token pooling, at most K random tokens of each window (default 16; "
            "every token with --units); 0: every token.",
            show_default=False,
        ),
    ] = None,
    units: Annotated[
        bool, typer.Option("--units", help="Add matched-unit correlation (Li et al. 2016).")
    ] = False,
) -> None:
    """Debiased linear CKA of every layer of MODEL_A with every layer of MODEL_B."""
    from hfmerge import api
    from hfmerge.analysis.cka import check_fail_under, format_report

    _check_reports(json_out, plot)
    report = api.cka(
        model_a,
        model_b,
        data=data,
        samples=samples,
        max_length=max_length,
        batch_size=batch_size,
        pooling=pooling,
        tokens_per_window=tokens_per_window,
        device_map=device_map,
        max_memory=max_memory,
        units=units,
    )
    typer.echo(format_report(report))

    def draw(path: Path) -> Path:
        from hfmerge.analysis.cka_plot import plot_cka  # matplotlib only when a plot is asked for

        return plot_cka(report, path)

    _write_reports(report, json_out, plot, draw)
    check_fail_under(report, fail_under)


def units(
    model_a: EvalModelArg,
    model_b: EvalModelArg,
    data: EvalDataOpt = None,
    samples: Annotated[
        int, typer.Option("--samples", min=2, help="Probe windows (every fourth is held out).")
    ] = 256,
    max_length: EvalLengthOpt = 128,
    batch_size: EvalBatchOpt = 8,
    l1_penalty: Annotated[
        float | None,
        typer.Option("--l1", min=0.0, help="Lasso penalty in correlation units [default: 0.05]."),
    ] = None,
    json_out: EvalJsonOpt = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG plot by layer.")] = None,
    device_map: Annotated[
        str, typer.Option("--device-map", help="auto, cpu, cuda:0, ... or a JSON device map.")
    ] = "auto",
) -> None:
    """How the units of MODEL_A and MODEL_B correspond per layer (Li et al. 2016): one-to-one
    (matched r), one-to-many (lasso, held-out R²) and many-to-many (spectral groups)."""
    from hfmerge import api
    from hfmerge.analysis.unit_report import format_units

    _check_reports(json_out, plot)
    report = api.units(
        model_a,
        model_b,
        data=data,
        samples=samples,
        max_length=max_length,
        batch_size=batch_size,
        l1_penalty=l1_penalty,
        device_map=device_map,
    )
    typer.echo(format_units(report))

    def draw(path: Path) -> Path:
        from hfmerge.analysis.units_plot import (
            plot_units,
        )  # matplotlib only when a plot is asked for

        return plot_units(report, path)

    _write_reports(report, json_out, plot, draw)


def extract_lora(
    model: Annotated[str, typer.Argument(help="The fine-tune: model dir, zoo:NAME or Hub id.")],
    base: Annotated[str, typer.Argument(help="The model it was fine-tuned from.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for the adapter.")],
    rank: Annotated[
        int | None, typer.Option("--rank", help="Rank of every delta (default 16).")
    ] = None,
    energy: Annotated[
        float | None,
        typer.Option(
            "--energy",
            help="Instead of --rank: per tensor, the smallest rank keeping this share (0-1] of "
            "the delta's squared singular values.",
        ),
    ] = None,
    modules_to_save: Annotated[
        bool,
        typer.Option(
            "--modules-to-save",
            help="Save changed embeddings, norms and biases whole (PEFT modules_to_save).",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
) -> None:
    """Extract a PEFT LoRA adapter from MODEL against BASE: BASE plus the adapter ≈ MODEL."""
    from hfmerge import api

    result = api.extract_lora(
        model, base, out, rank=rank, energy=energy, modules_to_save=modules_to_save, force=force
    )
    typer.echo(result.table)
    typer.echo(str(out))  # as given, like `align`
    pairs = len(result.extraction.lora)
    saved = len(result.extraction.modules_to_save)
    say(f"{pairs} LoRA pairs and {saved} modules saved whole, written to {result.out_dir}.")

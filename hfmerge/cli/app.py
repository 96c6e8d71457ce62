"""The `hfmerge` command line: thin commands that parse options, call one `hfmerge.api` function
and print or write its result.

Data goes to stdout; progress, hints and errors go to stderr. Errors are formatted in `main` only.
The api (and what it imports) loads inside each command, so `hfmerge --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer.exceptions import TyperException

from hfmerge.cli.signals import signals_interrupt
from hfmerge.errors import HfMergeError, Interrupted
from hfmerge.progress import say
from hfmerge.recipe.align_methods import ALIGN_METHODS

app = typer.Typer(
    name="hfmerge",
    help="Align, CKA-check, merge or route Hugging Face models, and push the result to the Hub.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
OutOpt = Annotated[
    Path | None, typer.Option("--out", help="Output directory (overrides output.path).")
]
PrivateOpt = Annotated[
    bool | None, typer.Option("--private", help="Create the Hub repo private.", show_default=False)
]


def _hint(message: str) -> None:
    say(message)


def _check_reports(json_out: Path | None, plot: Path | None = None) -> None:
    """Refuse a report path that cannot be written now, before the models load, not after."""
    from hfmerge.analysis.reports import check_report_path

    if json_out is not None:
        check_report_path(json_out, "the JSON report")
    if plot is not None:
        check_report_path(plot, "the plot")


@app.command()
def run(
    recipe: RecipeArg,
    out: OutOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; write nothing.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    push: Annotated[
        str | None, typer.Option("--push", help="Push the output to this Hub repo id.")
    ] = None,
    private: PrivateOpt = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="Use only the local HF cache; no network.")
    ] = False,
    max_memory: Annotated[
        str | None,
        typer.Option("--max-memory", help="Peak memory while merging (all processes), e.g. 1GB."),
    ] = None,
    allow_non_finite: Annotated[
        bool,
        typer.Option(
            "--allow-non-finite", help="Merge NaN or Inf weights with a warning, not an error."
        ),
    ] = False,
) -> None:
    """Run a recipe: merge the models it names, write a model directory, optionally push it."""
    from hfmerge import api

    options = api.RunOptions(
        out=out,
        dry_run=dry_run,
        force=force,
        push=push,
        private=private,
        offline=offline,
        max_memory=max_memory,
        allow_non_finite=allow_non_finite,
    )
    result = api.run(recipe, options)
    if result.out_dir is None:
        typer.echo(result.describe_plan())
        return
    typer.echo(str(result.out_dir))
    for warning in result.warnings:
        _hint(f"warning: {warning}")
    kind = "Routed" if result.routed else "Merged"
    _hint(f"{kind} model written to {result.out_dir}. Load it with:\n{result.snippet}")
    if result.url:
        typer.echo(result.url)
        _hint(f"Pushed to {result.url}")


@app.command()
def validate(recipe: RecipeArg) -> None:
    """Check a recipe: every schema problem at once, then model compatibility from headers."""
    from hfmerge import api

    checked = api.validate(recipe)
    typer.echo(f"{recipe}: OK — {checked.summary()}")
    for note in checked.notes:
        _hint(f"note: {note}")


@app.command()
def convert(
    config: Annotated[Path, typer.Argument(help="mergekit config YAML file.", show_default=False)],
) -> None:
    """Print the hfmerge recipe that runs a mergekit config (it also runs as it is)."""
    from hfmerge import api

    typer.echo(api.convert(config), nl=False)


@app.command()
def push(
    directory: Annotated[Path, typer.Argument(help="Output directory of `hfmerge run`.")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo id, `org/name` (or `name`).")],
    private: PrivateOpt = None,
) -> None:
    """Push a finished output directory to the Hub as one commit; prints the repo URL."""
    from hfmerge import api

    pushed = api.push(directory, repo_id, private=bool(private))
    typer.echo(pushed.url)
    _hint(f"Pushed {directory} to {pushed.url}")


@app.command()
def methods() -> None:
    """List the merge methods with their parameters and papers."""
    from hfmerge import api

    for method in api.methods():
        typer.echo(f"{method.name}: {method.summary}")
        typer.echo(f"    paper: {method.paper}")
        count = f"{method.min_models}..{method.max_models or 'any'}"
        models = f"base + {count} models" if method.needs_base else f"{count} models, no base"
        typer.echo(f"    inputs: {models}")
        for info in method.parameters:
            default = "required" if info.required else f"default {info.default!r}"
            scope = "per model" if info.scope == "model" else "method"
            typer.echo(
                f"    {scope} parameter {info.name} ({info.type}, {default}): {info.description}"
            )


@app.command()
def archs() -> None:
    """List the supported architecture families."""
    from hfmerge import api

    for family in api.archs():
        typer.echo(
            f"{family.name}: model types {', '.join(family.model_types)} — {family.description}"
        )


@app.command()
def zoo() -> None:
    """Build (or find cached) the offline model zoo and print each member's directory."""
    from hfmerge import api

    for member in api.zoo():
        typer.echo(f"{member.ref}\t{member.path}\t{member.description}")


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


@app.command("eval")
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
    from hfmerge.analysis.reports import write_json

    _check_reports(json_out)
    report = api.evaluate(
        models, data=data, max_length=max_length, samples=samples, batch_size=batch_size
    )
    typer.echo(format_grid(report.cells))
    if json_out is not None:
        _hint(f"wrote {write_json(json_out, report.to_json())}")


@app.command()
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
            help="Text for activation matching and REPAIR statistics, kept apart from the "
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
    from hfmerge.analysis.reports import write_json

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
    if json_out is not None:
        _hint(f"wrote {write_json(json_out, report.to_json())}")
    if plot is not None:
        from hfmerge.analysis.plotting import plot_barriers

        _hint(f"wrote {plot_barriers(report.results, plot)}")


@app.command()
def align(
    model_a: Annotated[str, typer.Argument(help="Reference model: its basis is kept.")],
    model_b: Annotated[str, typer.Argument(help="Model to rewrite into MODEL_A's basis.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for aligned MODEL_B.")],
    method: Annotated[
        str, typer.Option("--method", help="weight (no data) or activation (probe text).")
    ] = "weight",
    data: Annotated[
        str | None, typer.Option("--data", help="Probe text for activation matching.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of weight matching's order.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
) -> None:
    """Write MODEL_B permuted into MODEL_A's basis: the same function, loadable as usual."""
    from hfmerge import api

    result = api.align(
        model_a,
        model_b,
        out,
        method=method,  # type: ignore[arg-type]  # api.align refuses unknown methods
        data=data,
        seed=seed,
        force=force,
    )
    typer.echo(str(result.out_dir))
    _hint(
        f"{model_b} aligned into {model_a}'s basis by {method} matching in "
        f"{result.iterations} sweep(s); permutations saved beside the weights."
    )


@app.command()
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
        str | None, typer.Option("--max-memory", help="Per-device limits: `0=20GiB,cpu=60GiB`.")
    ] = None,
    pooling: Annotated[
        str | None,
        typer.Option(
            "--pooling",
            help="mean (per window; default) or tokens (every real token; "
            "the default with --units).",
        ),
    ] = None,
    units: Annotated[
        bool, typer.Option("--units", help="Add matched-unit correlation (Li et al. 2016).")
    ] = False,
) -> None:
    """Debiased linear CKA of every layer of MODEL_A with every layer of MODEL_B."""
    from hfmerge import api
    from hfmerge.analysis.cka import check_fail_under, format_report
    from hfmerge.analysis.reports import write_json

    _check_reports(json_out, plot)
    report = api.cka(
        model_a,
        model_b,
        data=data,
        samples=samples,
        max_length=max_length,
        batch_size=batch_size,
        pooling=pooling,
        device_map=device_map,
        max_memory=max_memory,
        units=units,
    )
    typer.echo(format_report(report))
    if json_out is not None:
        _hint(f"wrote {write_json(json_out, report.to_json())}")
    if plot is not None:
        from hfmerge.analysis.cka_plot import plot_cka

        _hint(f"wrote {plot_cka(report, plot)}")
    check_fail_under(report, fail_under)


@app.command()
def clean(
    path: Annotated[Path, typer.Argument(help="An output path, or a folder that holds outputs.")],
) -> None:
    """Remove staging folders left by killed runs beside PATH (and inside it); runs still alive
    keep theirs."""
    from hfmerge import api

    done = api.clean(path)
    for entry in done:
        verb = "restored" if entry.restores else "removed"
        target = f" as {entry.output}" if entry.restores else ""
        print(f"{verb} {entry.path}{target} ({entry.size / 1e6:.1f} MB)")
    if not done:
        _hint(f"no staging folders of killed runs at {path}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app and turn every hfmerge error into one paragraph on stderr."""
    command = typer.main.get_command(app)
    try:
        with signals_interrupt():
            # Not standalone: errors come here to be formatted once. typer returns an exit
            # status instead of raising for `typer.Exit` and for a KeyboardInterrupt it met.
            status = command.main(args=argv, prog_name="hfmerge", standalone_mode=False)
    except HfMergeError as exc:
        say(exc.message(), prefix="error: ", prefix_style="bold red")
        return 1
    except Interrupted as stop:
        say(f"interrupted ({stop.signal_name}): stopped; unfinished output was removed")
        return stop.exit_status
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        say("aborted")
        return 130
    except TyperException as exc:  # usage errors: bad option values, missing arguments
        exc.show()  # type: ignore[attr-defined]  # every raised one is a ClickException
        return int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        say("interrupted (SIGINT): stopped; unfinished output was removed")
        return 130
    return status if isinstance(status, int) else 0

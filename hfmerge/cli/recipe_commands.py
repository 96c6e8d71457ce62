"""The commands about recipes and outputs: run, validate, convert, push, methods, archs, zoo, clean.

Each parses its options, calls one `hfmerge.api` function and prints the result (data on stdout,
hints on stderr). `cli/app.py` registers them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from hfmerge.progress import say

if TYPE_CHECKING:
    from hfmerge.api import ArchSupport, MethodInfo

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
OutOpt = Annotated[
    Path | None, typer.Option("--out", help="Output directory (overrides output.path).")
]
PrivateOpt = Annotated[
    bool | None, typer.Option("--private", help="Create the Hub repo private.", show_default=False)
]


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
        typer.Option(
            "--max-memory",
            help="Peak memory while merging (all processes) and weight matching, e.g. 1GB.",
        ),
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
        say(f"warning: {warning}")
    kind = "Routed" if result.routed else "Merged"
    say(f"{kind} model written to {result.out_dir}. Load it with:\n{result.snippet}")
    if result.url:
        typer.echo(result.url)
        say(f"Pushed to {result.url}")


def validate(recipe: RecipeArg) -> None:
    """Check a recipe: every schema problem at once, then model compatibility from headers."""
    from hfmerge import api

    checked = api.validate(recipe)
    typer.echo(f"{recipe}: OK — {checked.summary()}")
    for note in checked.notes:
        say(f"note: {note}")


def convert(
    config: Annotated[Path, typer.Argument(help="mergekit config YAML file.", show_default=False)],
) -> None:
    """Print the hfmerge recipe that runs a mergekit config (it also runs as it is)."""
    from hfmerge import api

    typer.echo(api.convert(config), nl=False)


def push(
    directory: Annotated[Path, typer.Argument(help="Output directory of `hfmerge run`.")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo id, `org/name` (or `name`).")],
    private: PrivateOpt = None,
) -> None:
    """Push a finished output directory to the Hub as one commit; prints the repo URL."""
    from hfmerge import api

    pushed = api.push(directory, repo_id, private=bool(private))
    typer.echo(pushed.url)
    say(f"Pushed {directory} to {pushed.url}")


def methods() -> None:
    """List the merge methods with their parameters and papers."""
    from hfmerge import api

    for method in api.methods():
        typer.echo(f"{method.name}: {method.summary}")
        typer.echo(f"    paper: {method.paper}")
        typer.echo(f"    inputs: {_inputs(method)}")
        for info in method.parameters:
            default = "required" if info.required else f"default {info.default!r}"
            scope = "per model" if info.scope == "model" else "method"
            typer.echo(
                f"    {scope} parameter {info.name} ({info.type}, {default}): {info.description}"
            )


def _inputs(method: MethodInfo) -> str:
    """`base + 1..any models`, `2..any models, no base` or, for an optional base, both forms."""
    count = f"{method.min_models}..{method.max_models or 'any'}"
    if method.needs_base:
        return f"base + {count} models"
    if method.optional_base:
        return f"{count} models, base optional (then their task vectors are merged)"
    return f"{count} models, no base"


def archs() -> None:
    """List the architecture families and what runs on each (merge, align, repair, cka, route)."""
    from hfmerge import api

    rows = api.archs()
    columns = list(rows[0].capabilities)
    names = [_arch_cell(row) for row in rows]
    width = max(len(n) for n in [*names, "family (model types)"])
    header = f"{'family (model types)':<{width}}  " + "  ".join(f"{c:<6}" for c in columns)
    typer.echo(header.rstrip())
    for name, row in zip(names, rows, strict=True):
        marks = "  ".join(f"{'yes' if ok else 'no':<6}" for ok in row.capabilities.values())
        typer.echo(f"{name:<{width}}  {marks}".rstrip())


def _arch_cell(row: ArchSupport) -> str:
    """`llama (llama, mistral, qwen2)`, or `any other model_type` for the generic row."""
    if not row.model_types:
        return "any other model_type"
    return f"{row.name} ({', '.join(row.model_types)})"


def zoo() -> None:
    """Build (or find cached) the offline model zoo and print each member's directory."""
    from hfmerge import api

    for member in api.zoo():
        typer.echo(f"{member.ref}\t{member.path}\t{member.description}")


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
        say(f"no staging folders of killed runs at {path}")

"""The `hfmerge` command line: thin commands that parse, call one library function and print.

Data goes to stdout; progress, hints and errors go to stderr. Errors are formatted in `main` only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import click
import typer

from hfmerge.errors import HfMergeError
from hfmerge.progress import stderr_console

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


def _hint(message: str) -> None:
    stderr_console.print(message, highlight=False, soft_wrap=True)


@app.command()
def run(
    recipe: RecipeArg,
    out: OutOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; write nothing.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
) -> None:
    """Run a recipe: merge the models it names and write a model directory."""
    from hfmerge.card import load_snippet
    from hfmerge.pipeline import run_recipe
    from hfmerge.plan import format_plan
    from hfmerge.recipe import load_recipe

    parsed = load_recipe(recipe)
    target = out or (None if parsed.output.path else Path("out") / recipe.stem)
    result = run_recipe(
        parsed,
        recipe_text=recipe.read_text(encoding="utf-8"),
        out_dir=target,
        dry_run=dry_run,
        force=force,
    )
    if result.out_dir is None:
        typer.echo(format_plan(result.plan))
        return
    typer.echo(str(result.out_dir))
    _hint(
        f"Merged model written to {result.out_dir}. Load it with:\n"
        + load_snippet(result.plan.base.config, str(result.out_dir))
    )


@app.command()
def validate(recipe: RecipeArg) -> None:
    """Check a recipe: every schema problem at once, then model compatibility from headers."""
    from hfmerge.pipeline import run_recipe
    from hfmerge.recipe import load_recipe

    result = run_recipe(load_recipe(recipe), dry_run=True, progress=False)
    plan = result.plan
    typer.echo(
        f"{recipe}: OK — {plan.method.name} over {len(plan.inputs)} models, "
        f"{len(plan.jobs)} tensors, {plan.total_bytes / 1e6:.1f} MB of output"
    )


@app.command()
def methods() -> None:
    """List the merge methods with their parameters and papers."""
    from hfmerge.methods import describe_parameters, list_methods

    for method in list_methods():
        typer.echo(f"{method.name}: {method.summary}")
        typer.echo(f"    paper: {method.paper}")
        count = f"{method.min_models}..{method.max_models or 'any'}"
        models = f"base + {count} models" if method.needs_base else f"{count} models, no base"
        typer.echo(f"    inputs: {models}")
        for info in describe_parameters(method):
            default = "required" if info.required else f"default {info.default!r}"
            scope = "per model" if info.scope == "model" else "method"
            typer.echo(
                f"    {scope} parameter {info.name} ({info.type}, {default}): {info.description}"
            )


@app.command()
def archs() -> None:
    """List the supported architecture families."""
    from hfmerge.arch import list_families

    for family in list_families():
        typer.echo(
            f"{family.name}: model types {', '.join(family.model_types)} — {family.description}"
        )


@app.command()
def zoo() -> None:
    """Build (or find cached) the offline model zoo and print each member's directory."""
    from hfmerge.zoo import ZOO_MEMBERS, build_zoo

    for name, path in build_zoo().items():
        typer.echo(f"zoo:{name}\t{path}\t{ZOO_MEMBERS[name]}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app and turn every hfmerge error into one paragraph on stderr."""
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="hfmerge", standalone_mode=False)
    except HfMergeError as exc:
        _hint(f"[bold red]error:[/] {exc.message()}")
        return 1
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        _hint("aborted")
        return 130
    except KeyboardInterrupt:
        _hint("interrupted: nothing was written (partial output is removed)")
        return 130
    return 0


def console_main() -> None:
    """The `hfmerge` console script."""
    sys.exit(main())

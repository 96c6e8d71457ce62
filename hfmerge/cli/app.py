"""The `hfmerge` command line: thin commands that parse options, call one `hfmerge.api` function
and print or write its result.

The commands live in `recipe_commands.py` and `model_commands.py`; this module registers them and
formats every error, in `main` only. Data goes to stdout; progress, hints and errors to stderr.
The api (and what it imports) loads inside each command, so `hfmerge --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable

import typer
from typer.exceptions import TyperException

from hfmerge.cli import model_commands, recipe_commands
from hfmerge.cli.signals import signals_interrupt
from hfmerge.errors import HfMergeError, Interrupted
from hfmerge.progress import say

app = typer.Typer(
    name="hfmerge",
    help="Align, CKA-check, merge or route Hugging Face models, and push the result to the Hub.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Registered in the order `hfmerge --help` lists them.
COMMANDS: tuple[tuple[str, Callable[..., None]], ...] = (
    ("run", recipe_commands.run),
    ("validate", recipe_commands.validate),
    ("convert", recipe_commands.convert),
    ("push", recipe_commands.push),
    ("methods", recipe_commands.methods),
    ("archs", recipe_commands.archs),
    ("zoo", recipe_commands.zoo),
    ("eval", model_commands.eval_),
    ("barrier", model_commands.barrier),
    ("align", model_commands.align),
    ("canonicalize", model_commands.canonicalize),
    ("fingerprint", model_commands.fingerprint),
    ("extract-lora", model_commands.extract_lora),
    ("cka", model_commands.cka),
    ("clean", recipe_commands.clean),
)
for name, command in COMMANDS:
    app.command(name)(command)


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

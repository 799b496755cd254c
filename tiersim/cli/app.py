"""The shared typer app and the one-line error contract of every command.

Commands register themselves on ``app`` from their own modules (``tiersim.cli.cmd_*``);
``tiersim.cli.main`` imports them. Expected failures raise :class:`tiersim.errors.TiersimError`
(or ``ValueError``/``FileNotFoundError``) and become one red line on stderr with exit code 2,
never a traceback.
"""

from __future__ import annotations

import sys

import typer

try:  # typer >= 0.2x vendors its own click; its exceptions are not click's
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import ClickException
from rich.console import Console

from tiersim.errors import TiersimError

app = typer.Typer(
    name="tiersim",
    help="Semantics-aware KV-cache memory hierarchy: capture traces, simulate capacity, validate, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

console = Console()
if not console.is_terminal:  # piped or captured: wide tables beat truncated ones
    console = Console(width=160)
err_console = Console(stderr=True)

EXPECTED_ERRORS = (TiersimError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError)


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print one clear line to stderr and return an Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def parse_float_list(text: str, name: str) -> list[float]:
    """Parse '1.0,0.5,0.25' into floats; a clear error names the option on bad input."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise TiersimError(f"--{name}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise TiersimError(f"--{name}: expected at least one number, got {text!r}")
    return values


def parse_int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise TiersimError(f"--{name}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise TiersimError(f"--{name}: expected at least one integer, got {text!r}")
    return values


def run() -> None:
    """Entry point: run the app, mapping expected errors to one line and a non-zero exit."""
    try:
        # Without standalone mode click returns a command's `typer.Exit` code instead of exiting.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code != 0:
            sys.exit(code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("[bold red]aborted[/]")
        sys.exit(130)
    except ClickException as exc:  # usage errors: unknown option, a number that is not one, ...
        err_console.print(f"[bold red]error:[/] {exc.format_message()}  (see --help)", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/] (no partial output was written)")
        sys.exit(130)
    except EXPECTED_ERRORS as exc:
        message = str(exc) or exc.__class__.__name__
        err_console.print(f"[bold red]error:[/] {message.splitlines()[0]}", highlight=False, soft_wrap=True)
        sys.exit(2)

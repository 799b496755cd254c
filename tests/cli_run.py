"""Run the `tiersim` entry point in-process: the error mapping of `tiersim.cli.app.run` included."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

from tiersim.cli.main import run


def invoke(args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `tiersim ARGS`; an unexpected exception propagates to the test."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["tiersim", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def tiersim_process(*args: str) -> subprocess.CompletedProcess:
    """`python -m tiersim ARGS` in a fresh process: the console entry point as a user runs it."""
    return subprocess.run([sys.executable, "-m", "tiersim", *args], capture_output=True, text=True)


def example(callback, repo=None) -> list[str] | None:
    """The quick valid arguments a command declares (``cli.options.command(example=...)``), paths that
    name a file of the checkout made absolute (tests run in a scratch folder); None where none is declared."""
    from pathlib import Path

    args = getattr(callback, "tiersim_example", None)
    if args is None:
        return None
    repo = Path(repo or Path(__file__).resolve().parent.parent)
    return [str(repo / a) if not a.startswith("-") and (repo / a).is_file() else a for a in args]

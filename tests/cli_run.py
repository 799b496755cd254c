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

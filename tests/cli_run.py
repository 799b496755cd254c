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


def assert_refused(args: list[str], *, before_work: bool = True) -> tuple[str, str]:
    """Refused as a user must see it: exit 2, one ``error:`` line, no traceback (``before_work``: nothing
    else printed, no output). Returns (stdout, stderr)."""
    code, out, err = invoke(args)
    assert "Traceback" not in err, err
    assert code == 2, f"exit {code} for tiersim {' '.join(args)}: {err or out[:200]}"  # no silent accept
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:") and sum(x.startswith("error:") for x in lines) == 1, err
    if before_work:
        assert len(lines) == 1, err  # refused before any progress, load or write
        assert not out, out
    return out, err


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

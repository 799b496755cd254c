"""`--report FILE` for every command that offers it: write the HTML report of what the command computed, and
name those inputs by the command line that made them (not ``<in memory>``). One place, so simulate, capacity,
serve and grid write and name their reports alike."""

from __future__ import annotations

from pathlib import Path

from tiersim.cli.app import wrote
from tiersim.errors import TiersimError


def this_run(command: str) -> str:
    """How a report names an input this very run computed: its command line."""
    import shlex
    import sys

    args = sys.argv[1:] if sys.argv[1:2] == [command] else [command]
    return "this run: " + shlex.join(["tiersim", *args])


def write_report(inputs: list, path: Path, command: str | None = None) -> None:
    """Write the report of ``inputs`` (files, documents, or ``(frame, meta)`` tables not written to a file) to
    ``path``; ``command``: the command that computed them (their name in the report is then :func:`this_run`'s),
    None for inputs read from files the user named."""
    try:
        from tiersim.report import write_report as write
        from tiersim.report.loaders import load_input
    except ImportError:
        raise TiersimError("--report needs tiersim.report, which this installation lacks") from None
    loaded = [load_input(item) for item in inputs]
    for item in loaded if command else ():
        item.source = this_run(command)
    write(loaded, path)
    wrote(path)

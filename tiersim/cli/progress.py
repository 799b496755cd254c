"""One progress display for the long commands (capture, grid, capacity, simulate).

On a terminal it is a rich bar. Piped into a log file (nohup, CI, a batch job) rich draws nothing until
the work ends, which leaves an hour-long grid silent; there the meter prints a plain line instead,
at most every ``log_every`` seconds and at the end, with the same count, detail, elapsed time and ETA.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from tiersim.cli.app import err_console


def _clock(seconds: float | None) -> str:
    return "?" if seconds is None else str(timedelta(seconds=int(seconds)))


class Meter:
    """``advance(detail)`` after each unit of work; see the module docstring for the two displays."""

    def __init__(self, progress: Progress, label: str, total: int, log_every: float):
        self._progress = progress
        self._label = label
        self._task = progress.add_task(label, total=total, detail="")
        self._log_every = log_every
        self._last_line = time.monotonic()

    def advance(self, detail: str = "") -> None:
        self._progress.update(self._task, advance=1, detail=detail)
        if err_console.is_terminal:
            return
        task = next(t for t in self._progress.tasks if t.id == self._task)
        now = time.monotonic()
        if task.finished or now - self._last_line >= self._log_every:
            self._last_line = now
            line = f"{self._label} {task.completed:.0f}/{task.total:.0f}"
            if detail:
                line += f" · {detail}"
            line += f" · elapsed {_clock(task.elapsed)}"
            if not task.finished:
                line += f" · eta {_clock(task.time_remaining)}"
            err_console.print(line, highlight=False, soft_wrap=True)


@contextmanager
def meter(label: str, total: int, *, eta: bool = True, transient: bool = False,
          log_every: float = 30.0) -> Iterator[Meter]:
    """A progress display on stderr (stdout stays clean for ``--format json``)."""
    columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
               TimeElapsedColumn()]
    if eta:
        columns.append(TimeRemainingColumn())
    # Off a terminal rich would only print the final bar, after the meter's own last line: keep one.
    progress = Progress(*columns, console=err_console, transient=transient, disable=not err_console.is_terminal)
    with progress:
        yield Meter(progress, label, total, log_every)

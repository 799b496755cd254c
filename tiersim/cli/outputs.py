"""The one check of a command's files, run before any of its work (by ``cli.options.command``).

An hour of simulation or generation must not end in a path that cannot be written, so before a
command body runs every output is checked: not a directory, a declared suffix, its folder exists and
is writable (a read-only mount included), room for it where its size can be estimated (an HTML
report carries Plotly, about 4.6 MB), and not one of the run's own input files (``simulate --trace T
--out T`` would replace the trace it is reading). What can still fail at write time (a disk that
fills up meanwhile) is :class:`tiersim.atomic.WriteError`, one line in ``tiersim.cli.app.run``.

Every input file is checked here too, for what any reader would trip on later: there, a file and not a
folder (``--prompts some-dir``), readable. What is in it is its reader's to check (tiersim.fileformat).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from tiersim.atomic import name_max
from tiersim.errors import TiersimError

#: Bytes an output needs at least, by suffix, where that is known before the work (the report's HTML
#: inlines plotly.min.js, 4.6 MB in plotly 5/6); other files get a floor that a full disk fails.
SIZE_ESTIMATE = {".html": 5_000_000, ".htm": 5_000_000}
FLOOR_BYTES = 64 * 1024


def free_bytes(folder: Path) -> int | None:
    """Bytes an unprivileged writer may still use in ``folder`` (None where the OS cannot say)."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def check_output(path: Path, option: str, suffixes: tuple[str, ...] | None = None) -> None:
    """Refuse an output path that cannot be written (one line naming ``option``)."""
    path = Path(path)
    longest = name_max(path.parent if str(path.parent) else Path("."))
    if len(os.fsencode(path.name)) > longest:  # checked first: is_dir() itself raises ENAMETOOLONG
        raise TiersimError(f"{option}: the file name is {len(os.fsencode(path.name))} bytes long, more than the "
                           f"{longest} this file system takes")
    if path.is_dir():
        raise TiersimError(f"{option} {str(path)!r} is a directory; give a file name")
    if path.exists() and not path.is_file():  # (through a link) a device or a pipe: never replaced by a result
        raise TiersimError(f"{option} {str(path)!r} is not a regular file (a device or a pipe); give a file name")
    if suffixes and path.suffix.lower() not in suffixes:
        raise TiersimError(f"{option} must end in {' or '.join(suffixes)}, got {str(path)!r}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        # a folder on the way that is a regular file (``--out results.json/x.json``) exists: say what it is
        blocker = next((p for p in (parent, *parent.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise TiersimError(f"{option}: {str(blocker)!r} is a file, not a folder")
        raise TiersimError(f"{option}: the folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise TiersimError(f"{option}: {str(path)!r} is not writable")
    free = free_bytes(parent)
    need = SIZE_ESTIMATE.get(path.suffix.lower(), FLOOR_BYTES)
    if free is not None and free < need:
        raise TiersimError(f"{option}: no room for {str(path)!r}: {_mb(free)} free in {str(parent)!r}, "
                           f"it needs about {_mb(need)}")


def check_input(path: Path, option: str) -> None:
    """Refuse an input that is missing, a folder or unreadable (one line naming ``option``), the same
    words as :func:`tiersim.fileformat.read`'s."""
    path = Path(path)
    if path.is_dir():
        raise TiersimError(f"{option}: {path} is a directory, not a file")
    if not path.exists():
        if path.is_symlink():  # "file not found" for a file the user can see in ls
            raise TiersimError(f"{option}: {path} is a symbolic link to nowhere (dangling, or a loop of links)")
        raise TiersimError(f"{option}: file not found: {path}")
    if not path.is_file():  # a FIFO or a device: the reader would block on it forever, or read it twice
        raise TiersimError(f"{option}: {path} is not a regular file (a pipe or a device); give a file")
    if not os.access(path, os.R_OK):
        raise TiersimError(f"{option}: cannot read {path}: permission denied")


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        return False
    return a.resolve() == b.resolve()


def check_outputs(outputs: Mapping[str, Any], suffixes: Mapping[str, tuple[str, ...]],
                  inputs: Mapping[str, Any]) -> None:
    """Every given input (by flag) a readable file, every output writable, and no output an input or
    another output."""
    read: list[tuple[str, Path]] = []
    for flag, value in inputs.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None:
                read.append((flag, Path(item)))
                check_input(Path(item), flag)
    given = {flag: Path(p) for flag, p in outputs.items() if p is not None}
    for flag, path in given.items():
        check_output(path, flag, suffixes.get(flag) or None)
    for flag, path in given.items():
        for in_flag, source in read:
            if _same(path, source):
                raise TiersimError(f"{flag} {str(path)!r} is also {in_flag}: the run would overwrite its own "
                                   "input; write to another file")
    names = list(given.items())
    for i, (flag, path) in enumerate(names):
        for other, other_path in names[i + 1:]:
            if _same(path, other_path):
                raise TiersimError(f"{flag} and {other} are the same file {str(path)!r}")

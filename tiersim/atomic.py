"""Atomic file writes: a crash or Ctrl-C never leaves a half-written result behind.

Everything is written to a temporary file in the destination folder, flushed, fsynced and then
renamed over the target (rename is atomic on POSIX within one filesystem). A write that fails (a
full disk, a read-only mount) is one :class:`WriteError` naming the target and the errno, and the
temporary file is removed: every writer of every file kind goes through here, so the CLI has one
line for it (``tiersim.cli.app.run``), never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

from tiersim.errors import TiersimError, os_reason


class WriteError(TiersimError, OSError):
    """A file could not be written; the message names the path and the errno (``ENOSPC``)."""


def _write_error(target: Path, exc: OSError) -> WriteError:
    return WriteError(f"cannot write {target}: {os_reason(exc)}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it into place only if the block succeeds.

    A ``path`` that is a symbolic link is written where the link points, as a plain ``open()`` would: renaming
    over the link itself replaced it with a file beside it, and the file it named kept the previous run's
    results. A file that exists keeps its permission bits (a ``chmod 600`` result stays private)."""
    shown = Path(path)
    target = Path(os.path.realpath(shown)) if shown.is_symlink() else shown
    if target.exists() and not target.is_file() and not target.is_dir():
        # a device or a pipe (``out.parquet -> /dev/null``): the rename would replace the node itself, as root
        # /dev/null included; a folder is refused by the rename's own EISDIR
        raise WriteError(f"cannot write {shown}: {target} is not a regular file (a device or a pipe)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{_short_name(target)}.", suffix=".tmp", dir=target.parent)
    except WriteError:
        raise
    except OSError as exc:
        raise _write_error(shown, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:  # a new file: mkstemp creates 0600; give it what a plain open() would (umask applies)
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    try:
        os.chmod(tmp_path, mode)
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    except WriteError:
        raise
    except OSError as exc:  # pyarrow's IO errors are OSErrors too, often without an errno
        raise _write_error(shown, exc) from None
    finally:
        try:
            tmp_path.unlink(missing_ok=True)
        except OSError:
            pass


def name_max(folder: Path) -> int:
    """The longest file name (bytes) ``folder``'s file system takes: 255 on every common one."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def check_name(path: Path, what: str) -> None:
    """Refuse, before the work, a file or folder a command keeps beside ``--out`` whose name the file system does not
    take (``OUT.runs.jsonl``, ``OUT.parts``: an ``--out`` name within a few bytes of NAME_MAX passed its own check and
    failed with ENAMETOOLONG once the first run or sequence was done)."""
    path = Path(path)
    size, longest = len(os.fsencode(path.name)), name_max(path.parent if str(path.parent) else Path("."))
    if size > longest:
        raise TiersimError(f"{what} would be {path.name[:40]}... ({size} bytes), longer than the {longest} bytes "
                           "this file system takes: give --out a shorter name")


def _short_name(target: Path) -> str:
    """``target``'s name cut so that ``.NAME.XXXXXXXX.tmp`` still fits the file system: a name the result itself may
    have (up to NAME_MAX bytes) failed at the temporary file, after the work, with ENAMETOOLONG."""
    room = name_max(target.parent) - len(".." + "x" * 8 + ".tmp")
    name = target.name
    while len(os.fsencode(name)) > room:
        name = name[:-1]
    return name


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, dumps(obj, indent=2) + "\n")


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON: a NaN or infinity (a percentile over no values, a stopped run's unknowns) is written ``null``.
    Python's ``json`` writes them as the bare words ``NaN``/``Infinity``, which jq, JavaScript and most other
    readers refuse, so one undefined figure made the whole file unreadable outside Python."""
    return json.dumps(_finite(obj), allow_nan=False, default=json_default, **kwargs)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "tolist") or (hasattr(value, "item") and not isinstance(value, (str, bytes))):
        return _finite(json_default(value))
    return value


def json_default(value: Any) -> Any:
    # numpy scalars and arrays show up in results; make them plain JSON.
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")

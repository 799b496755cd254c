"""One exception family, so the CLI can turn every expected failure into one clear line."""

import errno as _errno
import os as _os
import re as _re


class TiersimError(Exception):
    """An expected, user-facing failure (bad input, missing file, unsupported model)."""


class TraceError(TiersimError):
    """A trace file is missing, truncated, foreign or from a newer schema."""


class ConfigError(TiersimError, ValueError):
    """A configuration value is out of range; the message names the field and the value."""


class Interrupted(Exception):
    """Ctrl-C during a command, with what the command kept (typer turns a bare KeyboardInterrupt into a
    silent exit 130; this one reaches ``tiersim.cli.app.run``, which prints it and exits 130)."""


_ERRNO_IN_TEXT = _re.compile(r"\[errno (\d+)\]", _re.I)


def os_reason(exc: OSError) -> str:
    """An OSError in a few words with its errno's name: ``No space left on device (ENOSPC)``. pyarrow's
    IO errors say ``... [errno 28] ...`` in a longer text: that number is the reason."""
    text = (str(exc).strip().splitlines() or [""])[0]
    found = _ERRNO_IN_TEXT.search(text)
    code = int(found.group(1)) if found else exc.errno
    reason = (_os.strerror(code) if found else exc.strerror or text) or exc.__class__.__name__
    name = _errno.errorcode.get(code or 0)
    return reason + (f" ({name})" if name else "")

"""One exception family, so the CLI can turn every expected failure into one clear line."""


class TiersimError(Exception):
    """An expected, user-facing failure (bad input, missing file, unsupported model)."""


class TraceError(TiersimError):
    """A trace file is missing, truncated, foreign or from a newer schema."""


class ConfigError(TiersimError, ValueError):
    """A configuration value is out of range; the message names the field and the value."""


class Interrupted(Exception):
    """Ctrl-C during a command, with what the command kept (typer turns a bare KeyboardInterrupt into a
    silent exit 130; this one reaches ``tiersim.cli.app.run``, which prints it and exits 130)."""

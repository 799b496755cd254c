"""Option groups declared once: a dataclass whose fields carry their flag, help and default.

A command-line option is written down in one place, as a field of an option group, and every front
end is built from it: typer options for the ``tiersim`` CLI (``tiersim.cli.options``) and argparse
arguments for the entry points that must run without typer (``python -m tiersim.validator`` on a GPU
machine); see :func:`add_arguments`. Standard library only (and tiersim.errors), so any layer may
declare a group.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Any, Callable

from tiersim.errors import TiersimError


def option(default: Any, help: str | None = None, *, flag: str | None = None, show_default: bool = True,
           items: Callable[[str], Any] | None = None, min: float | None = None, max: float | None = None,
           choices: tuple | None = None, finite: bool = True, output: tuple[str, ...] | None = None,
           input: bool = False) -> Any:
    """A group field that is one option: its default, ``help`` and (when not ``--field-name``) its ``flag``.

    ``items``: the option is a comma-separated list of this type. The CLI takes the text and its
    command parses it with :func:`list_values` (a one-line error naming the option); argparse parses
    it as the argument's type, with the same words.

    ``min``/``max`` (inclusive), ``choices`` and ``finite`` (numbers: nan and inf refused, the default)
    are the option's range, checked by :func:`check_value` in both front ends, so a value out of range
    is one line naming the flag wherever the option is read. ``output``: a file the command writes,
    with the suffixes it may have; ``input``: a file it reads (an output may not be one of them).
    """
    metadata = {"help": help, "flag": flag, "show_default": show_default, "items": items,
                "bounds": Bounds(min, max, tuple(choices) if choices else None, finite),
                "output": output, "input": input}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Bounds:
    """An option's range: ``min``/``max`` inclusive, ``choices``, ``finite`` (no nan/inf)."""

    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    finite: bool = True

    def words(self) -> str:
        """The range as help text shows it (``1..1,000,000``), empty when unbounded."""
        if self.choices:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.min is not None and self.max is not None:
            return f"{number(self.min)}..{number(self.max)}"
        if self.min is not None:
            return f">= {number(self.min)}"
        if self.max is not None:
            return f"<= {number(self.max)}"
        return ""


def number(value: Any) -> str:
    """A number as a user typed it: ``1.13`` (not ``1.1300000000000001``), ``1,000,000``, ``1e+09``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or (math.isfinite(value) and value == int(value) and abs(value) < 1e15):
        return f"{int(value):,}" if abs(value) >= 10_000 else str(int(value))
    return f"{value:.6g}"


def check_value(option_flag: str, value: Any, bounds: Bounds | None) -> Any:
    """``value`` if it is within ``bounds``; else a TiersimError naming ``option_flag`` with the value
    as typed (both front ends call this, so the words are the same)."""
    if value is None or bounds is None:
        return value
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, float) and bounds.finite and not math.isfinite(v):
            raise TiersimError(f"{option_flag} must be a finite number, got {v}")
        if bounds.choices is not None and v not in bounds.choices:
            raise TiersimError(f"{option_flag} must be {bounds.words()}, got {v!r}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if (bounds.min is not None and v < bounds.min) or (bounds.max is not None and v > bounds.max):
                raise TiersimError(f"{option_flag} must be {bounds.words()}, got {number(v)}")
    return value


def available_memory() -> int:
    """Bytes this process may still allocate without swapping: Linux's MemAvailable, lowered to a cgroup
    limit where one is set (a container); 8 GB where neither can be read. Size options derive their
    bounds from it (``synth`` refuses a trace that would not fit before allocating it)."""
    found = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                text = fh.read().strip()
            if text.isdigit() and int(text) < 1 << 60:
                used = 0
                for usage in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
                    try:
                        with open(usage) as fh:
                            used = int(fh.read().strip())
                        break
                    except (OSError, ValueError):
                        continue
                found.append(max(int(text) - used, 0))
        except (OSError, ValueError):
            continue
    return min(found) if found else 8 * 10**9


def field_bounds(field: dataclasses.Field) -> Bounds:
    """The declared range of a group field (a field declared without :func:`option` has none)."""
    return field.metadata.get("bounds") or Bounds()


def flag(field: dataclasses.Field) -> str:
    """The option's name on the command line: ``--recent-window`` for ``recent_window`` unless declared."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def field_types(group: type) -> dict[str, Any]:
    """Each field's type with string annotations resolved (groups may use ``from __future__ import annotations``)."""
    return typing.get_type_hints(group)


def defaults(group: type) -> dict[str, Any]:
    """The group's defaults by field name (what a command gets when no option is given)."""
    return {f.name: f.default for f in dataclasses.fields(group)}


_WORDS = {int: "integers", float: "numbers"}
_ONE = {int: "an integer", float: "a number"}


def parse_list(text: str, kind: Callable[[str], Any], option_flag: str) -> list:
    """``'1,8,32'`` -> ``[1, 8, 32]``; bad text is one TiersimError naming the option."""
    words = _WORDS.get(kind, f"{getattr(kind, '__name__', 'value')} values")
    parts = [part.strip() for part in text.split(",")]
    if not all(parts[:-1]):  # '1,,2' or ',2': a slip, not a shorter list (a trailing comma is fine)
        raise TiersimError(f"{option_flag}: expected comma-separated {words}, got {text!r} (an empty item)")
    try:
        values = [kind(part) for part in parts if part]
    except ValueError:
        raise TiersimError(f"{option_flag}: expected comma-separated {words}, got {text!r}") from None
    if not values:
        raise TiersimError(f"{option_flag}: expected at least one {words.rstrip('s')}, got {text!r}")
    return values


def list_values(options: Any) -> dict[str, list]:
    """Each comma-list field (declared with ``items``) of a group instance, parsed and range-checked
    (the CLI's step after typer)."""
    return {f.name: check_value(flag(f), parse_list(getattr(options, f.name), f.metadata["items"], flag(f)),
                                field_bounds(f))
            for f in dataclasses.fields(options) if f.metadata.get("items")}


def _argparse_message(exc: TiersimError, option_flag: str) -> str:
    """The check's words without the flag: argparse prints its own "argument --x:" prefix."""
    text = str(exc)
    for prefix in (option_flag + ": ", option_flag + " "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def _checked(kind: Callable[[str], Any], option_flag: str, bounds: Bounds, items: bool) -> Callable[[str], Any]:
    """argparse's ``type``: convert (a comma list when ``items``), then :func:`check_value`."""
    def parse(text: str) -> Any:
        try:
            if items:
                value = parse_list(text, kind, option_flag)
            else:
                try:
                    value = kind(text)
                except ValueError:
                    raise TiersimError(f"{option_flag}: expected {_ONE.get(kind, 'a value')}, got {text!r}") from None
            return check_value(option_flag, value, bounds)
        except TiersimError as exc:
            raise argparse.ArgumentTypeError(_argparse_message(exc, option_flag)) from None

    return parse


def _scalar(annotation: Any) -> Any:
    """``int | None`` -> ``int``: the type argparse converts the text with."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 else annotation


def add_arguments(parser: argparse.ArgumentParser, group: type) -> None:
    """One argparse argument per field of ``group``: same flag, help, default and conversion as the CLI's.

    A boolean field declared ``--x/--no-x`` becomes argparse.BooleanOptionalAction, a lone ``--x`` a
    ``store_true``; a default that is shown is appended to the help as the CLI shows it (``[default: ...]``).
    """
    types = field_types(group)
    for f in dataclasses.fields(group):
        kind = _scalar(types[f.name])
        help_text = f.metadata.get("help") or ""
        if f.metadata.get("show_default", True) and f.default is not None and kind is not bool:
            help_text = f"{help_text} [default: {f.default}]".strip()
        kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": help_text}
        if kind is bool:  # as click reads the flag: "--x/--no-x" sets either way, a lone "--x" sets True
            kwargs["action"] = argparse.BooleanOptionalAction if "/" in flag(f) else "store_true"
        elif f.metadata.get("items"):  # argparse converts a string default too
            kwargs["type"] = _checked(f.metadata["items"], flag(f), field_bounds(f), items=True)
        elif kind in (int, float) or field_bounds(f).choices:
            kwargs["type"] = _checked(kind if kind is not str else str, flag(f), field_bounds(f), items=False)
        elif kind is not str:
            kwargs["type"] = kind
        parser.add_argument(flag(f).split("/")[0], **kwargs)  # "--x/--no-x": BooleanOptionalAction adds --no-x


def from_namespace(group: type, namespace: argparse.Namespace) -> Any:
    """The group instance from parsed arguments (the fields :func:`add_arguments` added)."""
    return group(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(group)})

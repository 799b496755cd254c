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
import typing
from typing import Any, Callable

from tiersim.errors import TiersimError


def option(default: Any, help: str | None = None, *, flag: str | None = None, show_default: bool = True,
           items: Callable[[str], Any] | None = None) -> Any:
    """A group field that is one option: its default, ``help`` and (when not ``--field-name``) its ``flag``.

    ``items``: the option is a comma-separated list of this type. The CLI takes the text and its
    command parses it with :func:`list_values` (a one-line error naming the option); argparse parses
    it as the argument's type, with the same words.
    """
    metadata = {"help": help, "flag": flag, "show_default": show_default, "items": items}
    return dataclasses.field(default=default, metadata=metadata)


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


def parse_list(text: str, kind: Callable[[str], Any], option_flag: str) -> list:
    """``'1,8,32'`` -> ``[1, 8, 32]``; bad text is one TiersimError naming the option."""
    words = _WORDS.get(kind, f"{getattr(kind, '__name__', 'value')} values")
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise TiersimError(f"{option_flag}: expected comma-separated {words}, got {text!r}") from None
    if not values:
        raise TiersimError(f"{option_flag}: expected at least one {words.rstrip('s')}, got {text!r}")
    return values


def list_values(options: Any) -> dict[str, list]:
    """Each comma-list field (declared with ``items``) of a group instance, parsed (the CLI's step after typer)."""
    return {f.name: parse_list(getattr(options, f.name), f.metadata["items"], flag(f))
            for f in dataclasses.fields(options) if f.metadata.get("items")}


def _comma_list(kind: Callable[[str], Any], option_flag: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return parse_list(text, kind, option_flag)
        except TiersimError as exc:  # argparse prints its own "argument --x:" prefix
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None

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
        elif f.metadata.get("items"):
            kwargs["type"] = _comma_list(f.metadata["items"], flag(f))  # argparse converts a string default too
        elif kind is not str:
            kwargs["type"] = kind
        parser.add_argument(flag(f).split("/")[0], **kwargs)  # "--x/--no-x": BooleanOptionalAction adds --no-x


def from_namespace(group: type, namespace: argparse.Namespace) -> Any:
    """The group instance from parsed arguments (the fields :func:`add_arguments` added)."""
    return group(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(group)})

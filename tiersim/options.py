"""Option groups declared once: a dataclass whose fields carry their flag, help and default.

A command-line option is written down in one place, as a field of an option group, and every front
end is built from it: typer options for the ``tiersim`` CLI (``tiersim.cli.options``) and argparse
arguments for the entry points that must run without typer (``python -m tiersim.validator`` on a GPU
machine); see :func:`add_arguments`. Standard library only, so any layer may declare a group.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable

def option(default: Any, help: str | None = None, *, flag: str | None = None, show_default: bool = True,
           items: Callable[[str], Any] | None = None) -> Any:
    """A group field that is one option: its default, ``help`` and (when not ``--field-name``) its ``flag``.

    ``items``: the option is a comma-separated list of this type. The CLI takes the text and its
    command parses it (naming the option in a one-line error); argparse parses it as the argument's type.
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


def _comma_list(kind: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one value, got {text!r}")
        return values

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
            kwargs["type"] = _comma_list(f.metadata["items"])  # argparse converts a string default too
        elif kind is not str:
            kwargs["type"] = kind
        parser.add_argument(flag(f).split("/")[0], **kwargs)  # "--x/--no-x": BooleanOptionalAction adds --no-x


def from_namespace(group: type, namespace: argparse.Namespace) -> Any:
    """The group instance from parsed arguments (the fields :func:`add_arguments` added)."""
    return group(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(group)})

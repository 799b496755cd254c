"""The typer front end of option groups (tiersim.options): one typer option per field of a group.

A command declares a parameter whose annotation is an option group (a dataclass); :func:`command`
puts one typer option per field in its place, with the field's flag, help and default, and calls the
command with the group instance built from them. So help texts and defaults live in the group only.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Any, Callable

import typer

from tiersim.options import field_types, flag


def _typer_option(field: dataclasses.Field, help_text: str | None) -> Any:
    meta = field.metadata
    kwargs: dict[str, Any] = {"help": meta.get("help") if help_text is None else help_text}
    if not meta.get("show_default", True):
        kwargs["show_default"] = False
    return typer.Option(field.default, flag(field), **kwargs)


def _is_group(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def command(help: dict[str, str] | None = None) -> Callable:
    """Expand the command's option-group parameters into typer options (put it under ``@app.command()``).

    ``help``: per-field help that replaces the group's for this command only (a field whose meaning
    is wider here, e.g. ``grid --strategy`` takes a comma list).
    """
    overrides = dict(help or {})

    def decorate(func: Callable) -> Callable:
        hints = typing.get_type_hints(func)
        params: list[inspect.Parameter] = []
        groups: dict[str, tuple[type, list[str]]] = {}
        for param in inspect.signature(func).parameters.values():
            annotation = hints.get(param.name, param.annotation)
            if not _is_group(annotation):
                params.append(param.replace(annotation=annotation))
                continue
            types = field_types(annotation)
            names = []
            for field in dataclasses.fields(annotation):
                params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, annotation=types[field.name],
                                                default=_typer_option(field, overrides.pop(field.name, None))))
                names.append(field.name)
            groups[param.name] = (annotation, names)
        if overrides:
            raise TypeError(f"{func.__name__}: help given for options it does not have: {', '.join(overrides)}")
        seen = [p.name for p in params]
        if len(seen) != len(set(seen)):
            raise TypeError(f"{func.__name__}: an option is declared twice: {seen}")

        @functools.wraps(func)
        def wrapper(**kwargs: Any) -> Any:
            for name, (group, names) in groups.items():
                kwargs[name] = group(**{n: kwargs.pop(n) for n in names})
            return func(**kwargs)

        wrapper.__signature__ = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params])
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate

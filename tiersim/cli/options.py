"""The typer front end of option groups (tiersim.options): one typer option per field of a group.

A command declares a parameter whose annotation is an option group (a dataclass); :func:`command`
puts one typer option per field in its place, with the field's flag, help and default, and calls the
command with the group instance built from them. So help texts and defaults live in the group only.

:func:`command` is also the one place every command's options are checked before its body runs:
each value against its declared range (:func:`opt` for a plain option, ``option(min=...)`` for a
group field; every number finite unless declared otherwise), and every output file (declared with
``output=`` or ``command(outputs=...)``) by :func:`tiersim.cli.outputs.check_outputs`: writable, room
for it where its size can be estimated, and not one of the run's input files (each of which must be a
readable file). It adds ``--wide``. A command's ``example`` is what the generated tests run it with.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Any, Callable

import typer

from tiersim.errors import Interrupted, TiersimError
from tiersim.options import Bounds, check_value, field_bounds, field_types, flag

#: Path parameters that are outputs when a command does not say (``--out``, ``--report``).
OUTPUT_NAMES = ("out", "report", "output")
WIDE_COLUMNS = 1000  # what --wide draws at: wider than any table, the terminal wraps what it must
WIDE_HELP = "tables with every column, however wide (default: columns that do not fit the terminal are left out)"


#: The least --tpot-slo (ms) any command takes: serve, capacity --qps (p99) and capacity's planner (mean) share it.
TPOT_SLO_MIN = 0.001


def tpot_slo(default: float | None, help: str) -> Any:
    """``--tpot-slo`` as every command declares it: one bound (:data:`TPOT_SLO_MIN`), checked with the rest."""
    return opt(default, "--tpot-slo", help=help, min=TPOT_SLO_MIN)


def opt(default: Any, *param_decls: str, help: str | None = None, min: float | None = None,
        max: float | None = None, choices: tuple | None = None, finite: bool = True,
        output: tuple[str, ...] | None = None, input: bool | str = False, **kwargs: Any) -> Any:
    """``typer.Option`` with the range (and file role) of :func:`tiersim.options.option`, for an option
    one command declares by itself; :func:`command` checks it before the command runs."""
    info = typer.Option(default, *param_decls, help=help, **kwargs)
    info.tiersim_bounds = Bounds(min, max, tuple(choices) if choices else None, finite)
    info.tiersim_output, info.tiersim_input = output, input
    return info


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One command-line parameter as :func:`command` checks it (what tests enumerate per command)."""

    name: str
    flag: str
    annotation: Any
    bounds: Bounds
    output: tuple[str, ...] | None  # the suffixes of a file the command writes
    input: bool  # a file (or files) the command reads
    argument: bool = False

    @property
    def kind(self) -> Any:
        """``int``, ``float``, ``str``, ``bool`` or ``Path`` (``list[Path]``: ``Path``)."""
        from pathlib import Path

        if _is_path(self.annotation):
            return Path
        args = [a for a in typing.get_args(self.annotation) if a is not type(None)]
        return args[0] if args else self.annotation


def describe(callback: Callable) -> list[OptionSpec]:
    """The parameters of a registered command's callback, with their declared ranges and file roles
    (a command not built with :func:`command` gets the defaults: numbers finite, paths inputs)."""
    specs = getattr(callback, "tiersim_options", None)
    if specs is not None:
        return list(specs)
    hints = typing.get_type_hints(callback)
    out = []
    for p in inspect.signature(callback).parameters.values():
        info = p.default
        annotation = hints.get(p.name, p.annotation)
        out.append(OptionSpec(p.name, _flag_of(p.name, info), annotation,
                              getattr(info, "tiersim_bounds", None) or Bounds(), getattr(info, "tiersim_output", None),
                              _is_path(annotation), isinstance(info, typer.models.ArgumentInfo)))
    return out


def cover(app: typer.Typer) -> None:
    """Put every registered command of ``app`` through :func:`command` (those that do not already):
    a command added without it still gets its ranges checked, its outputs checked before work,
    ``--wide`` and the Ctrl-C line. ``tiersim.cli.main`` calls it once every module has registered."""
    for info in app.registered_commands:
        if getattr(info.callback, "tiersim_options", None) is None:
            info.callback = command()(info.callback)


def _typer_option(field: dataclasses.Field, help_text: str | None) -> Any:
    meta = field.metadata
    kwargs: dict[str, Any] = {"help": meta.get("help") if help_text is None else help_text}
    if not meta.get("show_default", True):
        kwargs["show_default"] = False
    info = typer.Option(field.default, flag(field), **kwargs)
    info.tiersim_bounds = field_bounds(field)
    info.tiersim_output, info.tiersim_input = meta.get("output"), meta.get("input", False)
    return info


def _flag_of(name: str, info: Any) -> str:
    """The option's long flag as the user types it (``--max-new-tokens``); an argument's metavar."""
    decls = [d for part in (getattr(info, "param_decls", None) or ()) for d in part.split("/")]
    longs = [d for d in decls if d.startswith("--")]
    if longs:
        return longs[0]
    if isinstance(info, typer.models.ArgumentInfo):
        return (getattr(info, "metavar", None) or name).upper()
    return "--" + name.replace("_", "-")


def _is_path(annotation: Any) -> bool:
    """``Path``, ``Path | None``, ``list[Path]``: a parameter that names files."""
    from pathlib import Path

    return annotation is Path or any(_is_path(a) for a in typing.get_args(annotation))


def _is_group(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def blank_is_unset(option_flag: str, value: Any) -> None:
    """Refuse an empty text for an option whose default is None: ``--lengths ""`` read as "not given" and ran
    math500 in silence, ``--title ""`` and ``--ray-address ""`` likewise; an option left out says that already."""
    if isinstance(value, str) and not value.strip():
        raise TiersimError(f"{option_flag} is empty ({value!r}); give a value or leave the option out")


def command(help: dict[str, str] | None = None, outputs: dict[str, tuple[str, ...]] | None = None,
            example: list[str] | None = None, loads_model: bool = False) -> Callable:
    """Expand the command's option-group parameters into typer options (put it under ``@app.command()``).

    ``help``: per-field help that replaces the group's for this command only (a field whose meaning
    is wider here, e.g. ``grid --strategy`` takes a comma list). ``outputs``: the parameters that are
    files the command writes, with their suffixes (as ``opt(output=...)``); every other path
    parameter is an input file (``opt(input="folder")``: a folder), which an output may not overwrite.

    ``example``: arguments of a valid run that takes seconds on a CPU (paths relative to the checkout);
    the generated tests run it with each bad value, full disk and width added, so a new command is
    covered by declaring it (``loads_model``: the run loads a real model, too slow to run to its end there).
    """
    overrides = dict(help or {})
    declared_outputs = dict(outputs or {})

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
        unknown = set(declared_outputs) - set(seen)
        if unknown:
            raise TypeError(f"{func.__name__}: outputs given for options it does not have: {', '.join(unknown)}")
        checks, output_params, input_params, specs, unset = [], {}, [], [], []
        for p in params:
            info = p.default
            name = p.name
            bounds = getattr(info, "tiersim_bounds", None) or Bounds()
            checks.append((name, _flag_of(name, info), bounds))
            text = OptionSpec(name, "", p.annotation, bounds, None, False).kind is str
            if text and getattr(info, "default", ...) is None:
                unset.append((name, _flag_of(name, info)))
            suffixes = declared_outputs.get(name, getattr(info, "tiersim_output", None))
            if suffixes is None and name in OUTPUT_NAMES and _is_path(p.annotation):
                suffixes = ()  # an output by its name (a command that declared none): checked, any suffix
            if suffixes is not None:
                output_params[name] = (_flag_of(name, info), tuple(suffixes))
            folder = getattr(info, "tiersim_input", None) == "folder"
            if suffixes is None and _is_path(p.annotation) and not folder:
                input_params.append((name, _flag_of(name, info)))
            specs.append(OptionSpec(name, _flag_of(name, info), p.annotation, bounds,
                                    None if suffixes is None else tuple(suffixes),
                                    suffixes is None and _is_path(p.annotation) and not folder,
                                    isinstance(info, typer.models.ArgumentInfo)))
        takes_wide = "wide" in seen
        if not takes_wide:
            params.append(inspect.Parameter("wide", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                            default=typer.Option(False, "--wide", help=WIDE_HELP)))

        @functools.wraps(func)
        def wrapper(**kwargs: Any) -> Any:
            from tiersim.cli import app as app_module
            from tiersim.cli.outputs import check_outputs

            saved_width = app_module.console._width
            if not takes_wide:
                app_module.WIDE = bool(kwargs.pop("wide", False))
                if app_module.WIDE:  # rich crops every line at the console's width: lift it for this command
                    app_module.console.width = WIDE_COLUMNS
            try:
                for name, option_flag in unset:
                    blank_is_unset(option_flag, kwargs.get(name))
                for name, option_flag, bounds in checks:  # before any group is built: the flag, not the field
                    check_value(option_flag, kwargs.get(name), bounds)
                check_outputs({f: kwargs.get(n) for n, (f, _) in output_params.items()},
                              {f: s for n, (f, s) in output_params.items()},
                              {f: kwargs.get(n) for n, f in input_params})
                for name, (group, names) in groups.items():
                    kwargs[name] = group(**{n: kwargs.pop(n) for n in names})
                return func(**kwargs)
            except KeyboardInterrupt as exc:  # a command may say what it kept: KeyboardInterrupt("...")
                raise Interrupted(str(exc.args[0]) if exc.args else "no partial output was written") from None
            finally:
                if not takes_wide:
                    app_module.WIDE = False  # one command's --wide is not the next one's (tests, notebooks)
                    app_module.console._width = saved_width

        wrapper.tiersim_options = tuple(specs)
        wrapper.tiersim_example = None if example is None else tuple(example)
        wrapper.tiersim_loads_model = loads_model
        wrapper.__signature__ = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params])
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate

"""Every file kind tiersim writes: its name, schema version, container, header, and the one checked
read and atomic write, so a reader never re-implements the kind and version checks.

Bottom layer (standard library; pyarrow only inside the Parquet functions, so the validator, which
has neither pandas nor pyarrow, can import it). docs/file-formats.md describes each format.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tiersim.atomic import atomic_path, dumps, write_json
from tiersim.errors import TiersimError

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

#: The Parquet schema-metadata key whose value is the file's JSON header (and everything but the table).
META_KEY = b"tiersim"
PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True)
class FileKind:
    """One file kind: the ``kind`` string on disk, the newest schema this tiersim writes and reads,
    and the containers it may be stored in ("json" and/or "parquet")."""

    name: str
    schema_version: int
    containers: tuple[str, ...]


TRACE = FileKind("trace", 1, ("parquet",))
SIMULATION = FileKind("simulation", 1, ("parquet",))
CAPACITY = FileKind("capacity", 1, ("json",))
QUALITY_GRID = FileKind("quality-grid", 1, ("json", "parquet"))
CALIBRATION = FileKind("calibration", 1, ("json",))
OPERATOR_PROFILE = FileKind("operator-profile", 1, ("json",))
REPORT = FileKind("report", 1, ("html",))
TRACE_PROJECTION = FileKind("trace-projection", 1, ("json",))  # the bundled trace's fit, shipped beside it
REQUESTS = FileKind("requests", 1, ("parquet",))  # a serving workload (CSV and JSON lines are read too)
SERVING = FileKind("serving", 2, ("parquet",))  # serving runs: per-request rows (2: of every policy), summary, timeline
SERVING_CAPACITY = FileKind("serving-capacity", 1, ("json",))  # highest QPS within SLOs, per on-full policy
#: The simulator's predictions for a GPU validation grid, written before the run (tiersim.simulator.preregister).
PREREGISTRATION = FileKind("gpu-preregistration", 1, ("json",))
KINDS: dict[str, FileKind] = {k.name: k for k in (TRACE, SIMULATION, CAPACITY, QUALITY_GRID, CALIBRATION,
                                                  OPERATOR_PROFILE, REPORT, TRACE_PROJECTION, REQUESTS, SERVING,
                                                  SERVING_CAPACITY, PREREGISTRATION)}


#: What readers of a kind index into, checked by :func:`check` so that a file of the right kind with a field
#: of the wrong type is one line naming the field, not a TypeError in whichever reader touches it first:
#: ``objects`` (absent, null or an object), ``numbers`` (``section.field``: absent, null or a finite number),
#: ``tables`` (a list of row objects) with the row fields that are numbers (``#``: a count, 0..2**53),
#: ``required``: the row fields every row has, ``texts`` (top-level or ``section.field``: absent, null or text),
#: ``row_texts``: a table's row fields that are text, and ``names`` (``section.field``: a list of text).
SHAPES: dict[str, dict[str, Any]] = {
    # Its link and compute sections, the numbers the simulator applies, are held to their ranges by their
    # reader (simulator.calibration.load_calibration); here what the side-by-side printout reads (the graph
    # executor's strategy words and fetched share, a stopped run's error, the strategy check's line too).
    "calibration": {
        "objects": ("summary", "settings"),
        "numbers": ("summary.median_abs_sim_error_pct", "summary.max_abs_sim_error_pct", "summary.max_overhead_pct",
                    "summary.prefetch_gbps_max", "summary.prefetch_share_of_peak_h2d", "settings.fetch_share"),
        "tables": {"points": ("#batch", "#context", "hbm", "measured_step_ms", "simulated_step_ms", "sim_error_pct",
                              "baseline_step_ms", "overhead_pct", "stall_ms", "simulated_stall_ms", "#h2d_bytes",
                              "#d2h_bytes", "prefetch_gbps", "compressed", "fetch_share", "host_ms")},
        "required": {"points": ("batch", "context", "hbm")},
        "texts": ("error", "settings.strategy"),
        "row_texts": {"points": ("strategy", "error", "capture_error", "executor")},
        "names": ("settings.strategy_check",),
    },
    "operator-profile": {"objects": ("models",)},  # device and settings: simulator.profile's reader
}
_COUNT_MAX = 2**53


def _check_shape(document: dict, kind: str, where: str, error: type[TiersimError]) -> None:
    import math

    shape = SHAPES.get(kind) or {}

    def number(value: Any, name: str, count: bool = False) -> None:
        if value is None:
            return
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok and count:
            ok = value == int(value) and 0 <= value <= _COUNT_MAX
        if not ok:
            raise error(f"{where}: {name} must be {'a count' if count else 'a number'}, got {value!r}")

    for name in shape.get("objects", ()):
        if document.get(name) is not None and not isinstance(document[name], Mapping):
            raise error(f"{where}: {name} must be an object, got {document[name]!r}")

    def text(value: Any, name: str) -> None:
        if value is not None and not isinstance(value, str):
            raise error(f"{where}: {name} must be text, got {value!r:.60}")

    def field_of(dotted: str) -> Any:
        section, _, field = dotted.rpartition(".")
        return (document.get(section) or {}).get(field) if section else document.get(field)

    for dotted in shape.get("numbers", ()):
        number(field_of(dotted), dotted)
    for dotted in shape.get("texts", ()):
        text(field_of(dotted), dotted)
    for dotted in shape.get("names", ()):
        names = field_of(dotted)
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise error(f"{where}: {dotted} must be a list of names, got {names!r:.60}")
    for table, fields in shape.get("tables", {}).items():
        rows = document.get(table)
        if rows is None:
            continue
        if not isinstance(rows, list) or not all(isinstance(r, Mapping) for r in rows):
            raise error(f"{where}: {table} must be a list of objects")
        for i, row in enumerate(rows):
            missing = [f for f in shape.get("required", {}).get(table, ()) if row.get(f) is None]
            if missing:
                raise error(f"{where}: {table}[{i}] lacks {missing[0]!r}")
            for field in fields:
                name = field.lstrip("#")
                number(row.get(name), f"{table}[{i}].{name}", count=field.startswith("#"))
            for name in shape.get("row_texts", {}).get(table, ()):
                text(row.get(name), f"{table}[{i}].{name}")


def stamp(kind: FileKind) -> dict[str, Any]:
    """What the file is and who wrote it, without a time (outputs that must be byte-reproducible)."""
    from tiersim import __version__

    return {"kind": kind.name, "schema_version": kind.schema_version, "tiersim_version": __version__}


def header(kind: FileKind) -> dict[str, Any]:
    """:func:`stamp` plus the creation time (UTC, seconds)."""
    return {**stamp(kind), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def check(document: Any, accepted: Sequence[FileKind], *, label: str, source: str | Path,
          error: type[TiersimError] = TiersimError, hints: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``document`` if it is an object of one of the ``accepted`` kinds at a schema this tiersim reads;
    otherwise one line starting with ``label`` (the option or file role) and naming ``source``."""
    if not isinstance(document, dict):
        raise error(f"{label}: {source}: expected a JSON object with a 'kind', got {type(document).__name__}")
    names = {k.name: k for k in accepted}
    kind = document.get("kind")
    if not isinstance(kind, str) or kind not in names:
        hint = (hints or {}).get(kind) if isinstance(kind, str) else None
        raise error(f"{label}: {source} is not a tiersim {_either(list(names))} file (kind {kind!r})"
                    + (f"; {hint}" if hint else ""))
    version = document.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise error(f"{label}: {source}: {kind} schema_version must be an integer, got {version!r}")
    if version < 1:  # every kind's first schema is 1: a 0 or a negative was never written by a tiersim
        raise error(f"{label}: {source}: {kind} schema_version {version} is not one tiersim ever wrote (1.."
                    f"{names[kind].schema_version}); the file is damaged or foreign")
    if version > names[kind].schema_version:
        raise error(f"{label}: {source}: {kind} schema_version {version} is newer than this tiersim reads "
                    f"({names[kind].schema_version}); upgrade tiersim")
    _check_shape(document, kind, f"{label}: {source}", error)
    return document


def read(path: str | Path, accepted: Sequence[FileKind], *, label: str, error: type[TiersimError] = TiersimError,
         hints: Mapping[str, str] | None = None) -> tuple[dict[str, Any], pa.Table | None]:
    """(document, table) of a tiersim file of one of the ``accepted`` kinds; every failure is one line.

    The container is told by the file's first bytes, never its name: Parquet gives its schema
    metadata as the document and the table; JSON gives the document and ``None``.
    """
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():  # open() on a FIFO blocks for a writer
        raise error(f"{label}: {path} is not a regular file (a pipe or a device); give a file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(PARQUET_MAGIC))
    except FileNotFoundError:
        raise error(f"{label}: file not found: {path}") from None
    except IsADirectoryError:
        raise error(f"{label}: {path} is a directory, not a file") from None
    except PermissionError:
        raise error(f"{label}: cannot read {path}: permission denied") from None
    if magic == PARQUET_MAGIC:
        document, table = _read_parquet(path, accepted, label, error, hints)
        container = "parquet"
    else:
        document, table, container = _read_json(path, label, error), None, "json"
    document = check(document, accepted, label=label, source=path, error=error, hints=hints)
    kind = KINDS.get(document["kind"])
    if kind is not None and container not in kind.containers:
        raise error(f"{label}: {path} is a {kind.name} in {container}; tiersim stores it as "
                    f"{' or '.join(kind.containers)}")
    if table is not None:
        try:
            table = table.read()
        except Exception as exc:  # pyarrow raises several types for truncated files
            raise error(f"{label}: {path}: the table is unreadable (truncated?): {_short(exc)}") from None
    return document, table


def _read_parquet(path: Path, accepted, label, error, hints):
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for truncated or foreign files
        raise error(f"{label}: not a readable Parquet file (truncated or foreign?): {path}: {_short(exc)}") from None
    raw = (parquet.schema_arrow.metadata or {}).get(META_KEY)
    if raw is None:
        raise error(f"{label}: {path} is not a tiersim {_either([k.name for k in accepted])} file "
                    "(Parquet without tiersim metadata)")
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise error(f"{label}: {path}: its tiersim metadata is corrupt (not JSON)") from None
    return document, parquet


def _read_json(path: Path, label, error) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise error(f"{label}: {path} is neither Parquet nor JSON") from None
    except json.JSONDecodeError as exc:
        raise error(f"{label}: {path} is neither Parquet nor valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise error(f"{label}: {path}: JSON nested too deeply") from None


def write_document(path: str | Path, document: Mapping[str, Any]) -> Path:
    """Write a JSON document atomically (its header comes from :func:`header` or :func:`stamp`)."""
    write_json(path, document)
    return Path(path)


def write_table(path: str | Path, table: Any, meta: Mapping[str, Any], *, compression: str = "snappy") -> Path:
    """Write a pyarrow Table or pandas DataFrame as Parquet atomically, ``meta`` under :data:`META_KEY`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    encoded = dumps(meta).encode()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: encoded})
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=compression)
    return path


def _either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else exc.__class__.__name__

"""Read every input kind the report draws into tidy pandas frames.

The kind is taken from the file's own ``kind`` field (JSON body or the Parquet ``tiersim``
metadata), never from the file name, so a renamed file still works and a foreign one is refused
with one line. Producers' in-memory dicts (``--report`` on simulate/capacity/grid) go through the
same checks as files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tiersim import fileformat
from tiersim.errors import TiersimError

# The columns each table must have (docs/file-formats.md); extra columns are kept.
REQUIRED: dict[str, dict[str, tuple[str, ...]]] = {
    "simulation": {
        "timeline": ("step", "weights_gb", "kv_hbm_gb", "staging_gb", "free_gb", "hbm_capacity_gb",
                     "h2d_gb", "d2h_gb", "compute_ms", "stall_ms", "step_ms"),
    },
    "capacity": {
        "rows": ("hbm", "ddr", "compressed", "evict", "hbm_saved_gb", "overhead_pct", "fits"),
        "batch_sweep": ("batch", "hbm", "ddr", "evict", "hbm_saved_gb", "overhead_pct", "fits"),
        # The planner's (split, strategy, batch) points; optional (files from before issue 13 lack them).
        "points": ("batch", "strategy", "tpot_ms", "tokens_per_s", "hbm_saved_gb", "fits"),
    },
    "quality-grid": {
        "rows": ("method", "hbm", "ddr", "compressed", "evict", "exact_match"),
    },
    "calibration": {
        "points": ("measured_step_ms", "simulated_step_ms"),
        "sweep": ("bytes", "direction", "gbps"),
    },
    "serving": {  # tiersim serve --out: per-request rows (the Parquet table), the thinned timeline in its header
        "rows": ("request", "ttft_s", "tpot_s", "e2e_s"),
        "timeline": ("start_s", "batch", "waiting", "hbm_blocks", "ddr_held_tokens"),
    },
    "serving-capacity": {  # tiersim capacity --qps: one point per simulated rate and policy
        "points": ("on_full", "qps", "ttft_p99_ms", "tpot_p99_ms", "within_slo"),
    },
}
KINDS = tuple(REQUIRED)
DRAWABLE = [fileformat.KINDS[kind] for kind in KINDS]
LABEL = "report input"
HINTS = {
    "trace": "simulate it first: tiersim simulate --trace FILE --out result.parquet",
}


@dataclass
class ReportInput:
    """One input: its kind, where it came from, its metadata and its tables (tidy frames)."""

    kind: str
    source: str
    meta: dict[str, Any]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def provenance(self) -> dict[str, str]:
        """Model, GPU, trace and tiersim version, as printed in the page header."""
        meta = self.meta
        model = _name(meta.get("model"))
        gpu = _name(meta.get("gpu"))
        trace = meta.get("trace")
        if self.kind == "quality-grid":
            gpu = meta.get("device") or gpu
            trace = trace or _prompts_label(meta)
        if self.kind == "calibration":
            gpu = _name(meta.get("device"))
            trace = trace or f"measured on {measured_on(meta)}"
            shapes = self.tables["points"].get("model_shape")
            model = model or (", ".join(sorted({str(s) for s in shapes.dropna()})) if shapes is not None else None)
        # Text whatever the file holds (a header field of the wrong type is shown, not a crash).
        return {"model": str(model or "not recorded"), "gpu": str(gpu or "not recorded"),
                "trace": str(trace or "not recorded"),
                "tiersim_version": str(meta.get("tiersim_version") or "not recorded")}


def measured_on(meta: Mapping) -> str:
    """Where a calibration was measured: "the GPU", or the CPU for `validate --device cpu`'s smoke mode
    (whose figures say nothing about a GPU and must not be labelled as if they did)."""
    device = meta.get("device") if isinstance(meta.get("device"), Mapping) else {}
    name = str(device.get("name") or "")
    if name.lower().startswith("cpu") or (device and not device.get("cuda")):
        return "the CPU (smoke mode)"
    return "the GPU"


def _name(value: Any) -> str | None:
    if isinstance(value, Mapping):
        return value.get("name") or value.get("id")
    return str(value) if value else None


def _prompts_label(meta: dict) -> str | None:
    n, t = meta.get("n_prompts"), meta.get("max_new_tokens")
    source = meta.get("prompts_source", "prompts")
    return f"{source} prompts: {n} × {t} tokens" if n is not None else None


def load_input(item: str | os.PathLike | Mapping | tuple) -> ReportInput:
    """A file path, a producer's dict, or a ``(frame, meta)`` pair (a table as ``fileformat.write_table`` would
    write it, read as its file would be: the header through strict JSON) -> a checked :class:`ReportInput`. The
    pair spares a command's ``--report`` a temporary Parquet file, and with it room in the system's temp folder."""
    if isinstance(item, tuple):
        import json

        from tiersim.atomic import dumps

        frame, meta = item
        document = json.loads(dumps(meta))
        document["timeline" if document.get("kind") == "simulation" else "rows"] = frame
        return _from_document(document, "<in memory>")
    if isinstance(item, Mapping):
        from tiersim import __version__

        # A dict comes from a producer running in this very process: its version is ours.
        return _from_document({"tiersim_version": __version__, **item}, "<in memory>")
    if isinstance(item, ReportInput):
        return item
    path = Path(item)
    document, table = fileformat.read(path, DRAWABLE, label=LABEL, hints=HINTS)
    if table is not None:  # Parquet carries one table: the timeline of a simulation, the rows of anything else
        document["timeline" if document["kind"] == "simulation" else "rows"] = table.to_pandas()
    return _from_document(document, str(path))


def _from_document(document: dict, source: str) -> ReportInput:
    kind = fileformat.check(document, DRAWABLE, label=LABEL, source=source, hints=HINTS)["kind"]
    if not isinstance(document.get("link") or {}, Mapping):  # a calibration's link fit and its sweep
        raise TiersimError(f"report input {source}: link must be an object, got {document['link']!r}")
    tables = {name: _frame(document, name, source) for name in _table_names(kind)}
    meta = {k: v for k, v in document.items() if k not in tables and k != "link"}
    if kind == "calibration":
        meta["link"] = {k: v for k, v in (document.get("link") or {}).items() if k != "sweep"}
    for name, columns in REQUIRED[kind].items():
        frame = tables[name]
        if frame.empty and name in ("batch_sweep", "sweep", "points"):
            continue  # optional sections: the figure is left out, the rest of the report is drawn
        if frame.empty:
            raise TiersimError(f"report input {source}: {kind} {name} has no rows")
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise TiersimError(f"report input {source}: {kind} {name} lacks column {missing[0]!r}")
    for name, frame in tables.items():
        _check_numbers(frame, f"report input {source}: {kind} {name}", REQUIRED[kind].get(name, ()))
    for (table, column), (lo, nan_ok) in COLUMN_RANGES.get(kind, {}).items():
        values = tables[table].get(column)
        for v in [] if values is None else values:
            v = float("nan") if v is None else v  # a missing value is NaN here
            if isinstance(v, (bool, np.bool_)) or not (v >= lo or (nan_ok and v != v)):
                raise TiersimError(f"report input {source}: {kind} {table}: column {column!r} must hold numbers "
                                   f"{'> 0' if lo > 0 else '>= 0'}, got {v!r}")
    for key in SLO_SECONDS.get(kind, ()):
        value = (meta.get("slo") or {}).get(key) if isinstance(meta.get("slo") or {}, Mapping) else None
        if value is not None and not (_number(value) and not isinstance(value, (bool, np.bool_))
                                      and np.isfinite(value) and value > 0):
            raise TiersimError(f"report input {source}: slo.{key} must be a number > 0, got {value!r:.40}")
    for key in HEADER_NUMBERS.get(kind, ()):
        value = meta.get(key)
        if value is not None and not (_number(value) and not isinstance(value, (bool, np.bool_))
                                      and np.isfinite(value) and value >= 0):
            raise TiersimError(f"report input {source}: {key} must be a number >= 0, got {value!r:.40}")
    return ReportInput(kind, source, meta, tables)


#: Header figures a section prints or divides by (the serving summary; the KV budget its timeline is a share
#: of): each a finite number >= 0 where present, so a NaN, -1 or `true` is refused, not printed as a result.
#: (table, column): (lowest, NaN allowed) of the columns drawn on log axes: a rate > 0, latencies >= 0 (NaN: a
#: point stopped before any request reached it), never a boolean.
COLUMN_RANGES = {"serving-capacity": {("points", "qps"): (1e-300, False), ("points", "ttft_p99_ms"): (0.0, True),
                                      ("points", "tpot_p99_ms"): (0.0, True)}}
#: The SLOs a section draws as lines (seconds in the file).
SLO_SECONDS = {"serving-capacity": ("ttft_s", "tpot_s")}
HEADER_NUMBERS = {"serving": ("requests", "goodput_qps", "preemptions", "spilled_gb", "hbm_blocks", "tp")}


#: Columns that hold text (labels); every other column a figure may read holds numbers or booleans.
TEXT_COLUMNS = {"on_full", "method", "strategy", "direction", "model_shape", "label", "name", "engine", "compute_model",
                "prompt_id", "sample_id", "why", "note", "cell", "text", "device", "dtype", "source",
                "trace", "model", "gpu", "policy", "approximate_note", "bottleneck", "fetch", "skipped"}
#: Columns that hold a mapping of numbers (validate's ``tier_bytes``: the cache's bytes per tier); no
#: figure plots them, and a mapping anywhere else is refused like text.
STRUCTURED_COLUMNS = {"tier_bytes"}
_NUMERIC_HINT = ("_ms", "_gb", "_pct", "_gbps", "_s", "_bytes", "tokens_per_s", "batch", "context", "hbm", "ddr",
                 "compressed", "evict", "fits", "step", "share", "accuracy", "exact_match")

#: Suffixes of measured quantities (a time, a size, a rate, a share in percent): true/false is never one of them (a
#: foreign file's boolean ``ttft_s`` was drawn as latencies of 0 and 1 s), where ``fits`` or ``exact_match`` may be.
MEASURES = ("_ms", "_s", "_gb", "_pct", "_gbps", "_bytes", "tokens_per_s")


def _check_numbers(frame: pd.DataFrame, where: str, required: tuple[str, ...] = ()) -> None:
    """The fields the figures plot are numbers: a capacity file whose ``step_ms`` is text is refused
    with one line, not drawn as an empty or wrong figure. A column is one of numbers by its name (the
    hints below, or a ``required`` column a figure reads that is not a label) or by its values (most of
    them numbers: one odd value is refused, wherever it is)."""
    for column in frame.columns:
        name = str(column)
        values = frame[column]
        if name in TEXT_COLUMNS:  # a label: text (or a number, an id), never a list or an object
            bad = [v for v in values if isinstance(v, (Mapping, list, tuple, np.ndarray))]
            if bad:
                raise TiersimError(f"{where}: column {name!r} must hold text, got {bad[0]!r}")
            continue
        if values.dtype.kind in "iuf" or (values.dtype.kind == "b" and not name.endswith(MEASURES)):
            continue
        known = [v for v in values if not (v is None or (isinstance(v, float) and v != v))]
        hinted = name in required or any(name == h or name.endswith(h) for h in _NUMERIC_HINT)
        if not hinted and sum(_number(v) for v in known) * 2 <= len(known):
            continue  # a column of labels (most of its values are not numbers)
        measure = name.endswith(MEASURES)
        bad = [v for v in values if not _numbers(v, name) or (measure and isinstance(v, (bool, np.bool_)))]
        if bad:
            raise TiersimError(f"{where}: column {name!r} must hold numbers, got {bad[0]!r}")


def _number(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, np.number, np.bool_))


def _numbers(value: Any, name: str) -> bool:
    """A number or a missing value; in a column declared structured, a mapping of them."""
    if name in STRUCTURED_COLUMNS:
        return value is None or (isinstance(value, Mapping) and all(_number(v) for v in value.values()))
    return _number(value)


def _table_names(kind: str) -> tuple[str, ...]:
    return tuple(REQUIRED[kind])


def _frame(document: dict, name: str, source: str) -> pd.DataFrame:
    raw = (document.get("link") or {}).get("sweep") if name == "sweep" else document.get(name)
    if raw is None:
        return pd.DataFrame()
    if isinstance(raw, pd.DataFrame):
        return raw.reset_index(drop=True)
    try:
        frame = pd.DataFrame(raw)  # list of row dicts, or dict of equal-length columns (numpy arrays)
    except (ValueError, TypeError) as exc:
        raise TiersimError(f"report input {source}: {name} is not a table ({exc})") from None
    return frame

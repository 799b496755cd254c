"""The trace file: per (sequence, step, layer) tier counts, moves and attention mass, in Parquet.

The metadata (model shape, policy, prompts, versions) travels inside the Parquet schema under the
``tiersim`` key, so one file is the whole record. Readers refuse foreign, truncated and newer
files with a :class:`~tiersim.errors.TraceError` (one clear line), never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tiersim import fileformat
from tiersim.traces.bundled import BUNDLED_TRACE, default_trace_path  # noqa: F401 (part of this module's API)
from tiersim.errors import TraceError
from tiersim.hierarchy.record import StepRecord

SCHEMA_VERSION = fileformat.TRACE.schema_version

# The columns are the cache's StepRecord fields (plus which sequence the row belongs to), so a field
# added to the record is a column of every new trace; readers require only these.
COLUMNS = {"seq_id": "int32", **StepRecord.columns()}
INT_COLUMNS = {c: t for c, t in COLUMNS.items() if t.startswith("int")}
FLOAT_COLUMNS = {c: t for c, t in COLUMNS.items() if t.startswith("float")}
REQUIRED_META = ("kind", "schema_version", "model", "policy", "sequences")


@dataclass
class Trace:
    """A loaded trace: ``meta`` (dict) and ``steps`` (one row per sequence, step and layer)."""

    meta: dict[str, Any]
    steps: pd.DataFrame
    path: Path | None = None

    @property
    def num_layers(self) -> int:
        return int(self.meta["model"]["num_layers"])

    def per_step(self) -> pd.DataFrame:
        """Sum over layers of each (sequence, step): what one token's forward moved in the whole model."""
        return self.steps.groupby(["seq_id", "step"], sort=True).sum(numeric_only=True).reset_index()


def new_meta(model: dict, policy: dict, sequences: list[dict], **extra: Any) -> dict[str, Any]:
    """The metadata block every trace carries."""
    return {
        **fileformat.header(fileformat.TRACE),
        "model": model,
        "policy": policy,
        "sequences": sequences,
        "mode": "summary",
        **extra,
    }


def write(path: str | Path, steps: pd.DataFrame, meta: dict[str, Any]) -> Path:
    """Validate and write a trace atomically; returns the path."""
    missing = [c for c in COLUMNS if c not in steps.columns]
    if missing:
        raise TraceError(f"trace table lacks columns: {', '.join(missing)}")
    for key in REQUIRED_META:
        if key not in meta:
            raise TraceError(f"trace metadata lacks {key!r}")
    try:
        frame = steps[list(COLUMNS) + [c for c in steps.columns if c not in COLUMNS]].astype(COLUMNS)
    except (ValueError, TypeError, OverflowError) as exc:  # NaN or inf in a count column
        raise TraceError(f"trace table cannot be stored with its column types: {str(exc).splitlines()[0]}") from None
    return fileformat.write_table(path, frame, meta, compression="zstd")


def read(path: str | Path) -> Trace:
    """Load a trace, refusing anything that is not a complete tiersim trace of a known schema."""
    path = Path(path)
    meta, table = fileformat.read(path, [fileformat.TRACE], label="trace", error=TraceError)
    missing_meta = [k for k in REQUIRED_META if k not in meta]
    if missing_meta:
        raise TraceError(f"trace metadata lacks {', '.join(missing_meta)}: {path}")
    steps = table.to_pandas()
    missing = [c for c in COLUMNS if c not in steps.columns]
    if missing:
        raise TraceError(f"trace lacks columns {', '.join(missing)}: {path}")
    _check_meta(meta, path)
    _check_steps(steps, path)
    return Trace(meta=meta, steps=steps, path=path)


def _check_meta(meta: dict, path: Path) -> None:
    """The metadata fields the simulator and synthesizer read, with the types they need."""
    from tiersim.hierarchy.config import TierConfig

    def bad(what: str) -> TraceError:
        return TraceError(f"trace metadata: {what}: {path}")

    model, policy, sequences = meta["model"], meta["policy"], meta["sequences"]
    if not isinstance(model, dict) or not _count(model.get("num_layers"), minimum=1):
        raise bad("model.num_layers must be a positive integer")
    if not isinstance(policy, dict):
        raise bad("policy must be an object")
    try:
        TierConfig.from_dict(policy)
    except (ValueError, TypeError) as exc:  # TiersimError is a ValueError
        raise bad(f"policy is invalid ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if not isinstance(sequences, list) or not sequences:
        raise bad("sequences must be a non-empty list")
    for item in sequences:
        if not isinstance(item, dict) or not all(_count(item.get(k)) for k in ("prompt_len", "new_tokens")):
            raise bad("each sequence needs non-negative integer prompt_len and new_tokens")


def _count(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_steps(steps: pd.DataFrame, path: Path) -> None:
    """Counts are non-negative, masses are shares in [0, 1]: anything else would corrupt every projection."""
    if steps.empty:
        raise TraceError(f"trace has no rows: {path}")
    for column in INT_COLUMNS:
        values = steps[column]
        if not pd.api.types.is_integer_dtype(values) or (values < 0).any():
            raise TraceError(f"trace column {column} must hold non-negative integers: {path}")
    for column in FLOAT_COLUMNS:
        values = steps[column].to_numpy(dtype=float, na_value=float("nan"))
        if not ((values >= -1e-6) & (values <= 1 + 1e-3)).all():
            raise TraceError(f"trace column {column} must hold attention shares in [0, 1]: {path}")
    tiers = steps["n_hbm"] + steps["n_ddr"] + steps["n_compressed"]
    if (tiers > steps["context_len"]).any():
        raise TraceError(f"trace rows hold more tokens in their tiers than their context_len: {path}")

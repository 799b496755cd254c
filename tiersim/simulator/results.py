"""The simulation result file (kind ``simulation``): the per-step timeline plus its metadata.

One Parquet table, one row per simulated decode step, so the report can plot HBM occupancy,
PCIe traffic and stalls over time; the summary row and the presets travel in the schema
metadata (docs/file-formats.md, "Simulation result").
"""

from __future__ import annotations

import json
from pathlib import Path

from tiersim import __version__
from tiersim.errors import TiersimError

KIND = "simulation"
SCHEMA_VERSION = 1
META_KEY = b"tiersim"
TIMELINE_COLUMNS = ("step", "context_tokens_mean", "weights_gb", "kv_hbm_gb", "staging_gb", "activations_gb",
                    "free_gb", "hbm_capacity_gb", "h2d_gb", "d2h_gb", "compute_ms", "stall_ms", "step_ms")


def simulation_meta(scenario, config: dict, summary: dict) -> dict:
    """The metadata block of a simulation result (no timestamp: same inputs, same bytes)."""
    return {
        "kind": KIND,
        "schema_version": SCHEMA_VERSION,
        "tiersim_version": __version__,
        "model": scenario.model.to_dict(),
        "gpu": scenario.gpu.to_dict(),
        "trace": scenario.trace_label,
        "batch": scenario.batch,
        "config": config,
        "mean_length": scenario.mean_length,
        "context": scenario.context,
        "prefetch": scenario.prefetch,
        "steps": scenario.steps,
        "seed": scenario.seed,
        "summary": summary,
    }


def write_timeline(path: str | Path, timeline: dict, meta: dict) -> Path:
    """Write the timeline atomically as Parquet with ``meta`` under the ``tiersim`` key."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tiersim.atomic import atomic_path

    frame = pd.DataFrame({c: timeline[c] for c in TIMELINE_COLUMNS})
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta, default=float).encode()})
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_timeline(path: str | Path):
    """(meta, timeline DataFrame) of a simulation result; one clear error for anything else."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise TiersimError(f"simulation result not found: {path}") from None
    except Exception as exc:  # pyarrow raises several types for foreign / truncated files
        raise TiersimError(f"not a readable simulation result: {path}: {exc.__class__.__name__}") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    meta = json.loads(raw) if raw else {}
    if meta.get("kind") != KIND:
        raise TiersimError(f"not a tiersim simulation result (kind {meta.get('kind')!r}): {path}")
    if not isinstance(meta.get("schema_version"), int) or meta["schema_version"] > SCHEMA_VERSION:
        raise TiersimError(f"simulation schema version {meta.get('schema_version')!r} is newer than this tiersim: {path}")
    return meta, table.to_pandas()

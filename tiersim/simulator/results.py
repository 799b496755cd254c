"""The simulation result file (kind ``simulation``): the per-step timeline plus its metadata.

One Parquet table, one row per simulated decode step, so the report can plot HBM occupancy,
PCIe traffic and stalls over time; the summary row and the presets travel in the schema
metadata (docs/file-formats.md, "Simulation result").
"""

from __future__ import annotations

from pathlib import Path

from tiersim import fileformat
TIMELINE_COLUMNS = ("step", "context_tokens_mean", "weights_gb", "kv_hbm_gb", "staging_gb", "activations_gb",
                    "free_gb", "hbm_capacity_gb", "h2d_gb", "d2h_gb", "compute_ms", "stall_ms", "step_ms")


def simulation_meta(scenario, config: dict, summary: dict) -> dict:
    """The metadata block of a simulation result (no timestamp: same inputs, same bytes)."""
    return {
        **fileformat.stamp(fileformat.SIMULATION),
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
    return fileformat.write_table(path, timeline_frame(timeline), meta)


def timeline_frame(timeline: dict):
    """The timeline's columns as the file holds them."""
    import pandas as pd

    return pd.DataFrame({c: timeline[c] for c in TIMELINE_COLUMNS})


def read_timeline(path: str | Path):
    """(meta, timeline DataFrame) of a simulation result; one clear error for anything else."""
    meta, table = fileformat.read(path, [fileformat.SIMULATION], label="simulation result")
    return meta, table.to_pandas()

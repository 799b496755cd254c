"""Traces: what a real model run did, step by step and layer by layer, under the tier policy."""

from tiersim.traces.format import (
    COLUMNS,
    SCHEMA_VERSION,
    Trace,
    default_trace_path,
    new_meta,
    read,
    write,
)

__all__ = ["COLUMNS", "SCHEMA_VERSION", "Trace", "default_trace_path", "new_meta", "read", "write"]

"""Traces: what a real model run did, step by step and layer by layer, under the tier policy.

The file format (pandas, pyarrow) is imported on first use of one of its names, so code that only needs
the bundled trace's location (the planner's fast start) does not pay for it.
"""

from tiersim.traces.bundled import default_trace_path

_FORMAT_NAMES = ("COLUMNS", "SCHEMA_VERSION", "Trace", "new_meta", "read", "write")
__all__ = ["default_trace_path", *_FORMAT_NAMES]


def __getattr__(name: str):
    if name in _FORMAT_NAMES:
        from tiersim.traces import format as _format

        return getattr(_format, name)
    raise AttributeError(f"module 'tiersim.traces' has no attribute {name!r}")

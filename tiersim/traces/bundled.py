"""Where the bundled trace lives; standard library only, so finding it imports neither pandas nor pyarrow."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BUNDLED_TRACE = "default-trace.parquet"


def default_trace_path() -> Path:
    """The bundled real SmolLM2 trace shipped with the package."""
    return Path(str(resources.files("tiersim") / "data" / BUNDLED_TRACE))

"""The header every file tiersim writes starts with: what it is, which schema, who wrote it, when."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any


def header(kind: str, schema_version: int) -> dict[str, Any]:
    from tiersim import __version__

    return {
        "kind": kind,
        "schema_version": schema_version,
        "tiersim_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

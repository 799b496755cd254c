"""The header every file tiersim writes starts with (what it is, which schema, who wrote it, when),
and the one checked way to read a JSON document back by that header."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tiersim.errors import TiersimError


def header(kind: str, schema_version: int) -> dict[str, Any]:
    from tiersim import __version__

    return {
        "kind": kind,
        "schema_version": schema_version,
        "tiersim_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def read_document(path: str | Path, label: str, kinds: dict[str, int]) -> dict[str, Any]:
    """A JSON document whose ``kind`` is one of ``kinds`` (kind -> newest schema version understood).

    Every failure is one line that starts with ``label`` (the option or file role) and names the path:
    missing, not JSON, another kind, or a schema newer than this tiersim reads.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise TiersimError(f"{label}: file not found: {path}") from None
    except PermissionError:
        raise TiersimError(f"{label}: cannot read {path}: permission denied") from None
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError, RecursionError):
        raise TiersimError(f"{label}: not a JSON file: {path}") from None
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if not isinstance(kind, str) or kind not in kinds:
        wanted = " nor ".join(f"a tiersim {k}" for k in kinds)
        raise TiersimError(f"{label}: {path} is {'neither ' if len(kinds) > 1 else 'not '}{wanted} file (kind {kind!r})")
    version = doc.get("schema_version")
    if not isinstance(version, int) or version > kinds[kind]:
        raise TiersimError(f"{label}: {kind} schema version {version!r} is newer than this tiersim understands "
                           f"({kinds[kind]}): {path}")
    return doc

"""The quality-grid file (kind ``quality-grid``): one document, written as JSON or Parquet.

JSON holds the whole document; Parquet holds the rows as a table and everything else as JSON in
the schema metadata key ``tiersim`` (like traces), so either reads back into the same document.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tiersim.errors import TiersimError

KIND = "quality-grid"
SCHEMA_VERSION = 1
META_KEY = b"tiersim"


def grid_document(rows: list[dict], *, model: str, n_prompts: int, max_new_tokens: int, **extra: Any) -> dict:
    """The document every output (table, JSON, Parquet, report) is made from."""
    from tiersim.provenance import header

    return {
        **header(KIND, SCHEMA_VERSION),
        "model": model,
        "n_prompts": n_prompts,
        "max_new_tokens": max_new_tokens,
        **extra,
        "rows": rows,
    }


def write_grid(path: str | Path, document: dict) -> Path:
    """Write atomically; the suffix picks the format (.json or .parquet)."""
    from tiersim.atomic import atomic_path, write_json

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        write_json(path, document)
        return path
    if suffix != ".parquet":
        raise TiersimError(f"--out must end in .json or .parquet, got {str(path)!r}")
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {k: v for k, v in document.items() if k != "rows"}
    table = pa.Table.from_pandas(pd.DataFrame(document["rows"]), preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_grid(path: str | Path) -> dict:
    """Read a grid file back into its document; refuses other kinds and newer schemas."""
    path = Path(path)
    if not path.is_file():
        raise TiersimError(f"grid file not found: {path}")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for foreign or truncated files
            raise TiersimError(f"not a readable Parquet file: {path} ({str(exc).splitlines()[0]})") from None
        raw = (table.schema.metadata or {}).get(META_KEY)
        document = json.loads(raw) if raw else {}
        rows = table.to_pandas().astype(object).where(lambda f: f.notna(), None).to_dict("records")
        document["rows"] = rows
    else:
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise TiersimError(f"grid file is not valid JSON: {path} ({exc.msg})") from None
    if not isinstance(document, dict) or document.get("kind") != KIND:
        raise TiersimError(f"not a quality-grid file (kind {document.get('kind') if isinstance(document, dict) else None!r}): {path}")
    if int(document.get("schema_version", 0)) > SCHEMA_VERSION:
        raise TiersimError(
            f"{path} has quality-grid schema_version {document['schema_version']}, newer than this tiersim reads "
            f"({SCHEMA_VERSION}); upgrade tiersim"
        )
    return document

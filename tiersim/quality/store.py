"""The quality-grid file (kind ``quality-grid``): one document, written as JSON or Parquet.

JSON holds the whole document; Parquet holds the rows as a table and everything else as JSON in
the schema metadata key ``tiersim`` (like traces), so either reads back into the same document.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tiersim import fileformat
from tiersim.errors import TiersimError

KIND = fileformat.QUALITY_GRID.name


def grid_document(rows: list[dict], *, model: str, n_prompts: int, max_new_tokens: int, **extra: Any) -> dict:
    """The document every output (table, JSON, Parquet, report) is made from."""
    return {
        **fileformat.header(fileformat.QUALITY_GRID),
        "model": model,
        "n_prompts": n_prompts,
        "max_new_tokens": max_new_tokens,
        **extra,
        "rows": rows,
    }


def write_grid(path: str | Path, document: dict) -> Path:
    """Write atomically; the suffix picks the format (.json or .parquet)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return fileformat.write_document(path, document)
    if suffix != ".parquet":
        raise TiersimError(f"--out must end in .json or .parquet, got {str(path)!r}")
    import pandas as pd

    meta = {k: v for k, v in document.items() if k != "rows"}
    return fileformat.write_table(path, pd.DataFrame(document["rows"]), meta)


def read_grid(path: str | Path) -> dict:
    """Read a grid file (JSON or Parquet) back into its document; refuses other kinds and newer schemas."""
    document, table = fileformat.read(path, [fileformat.QUALITY_GRID], label="grid file")
    if table is not None:
        document["rows"] = table.to_pandas().astype(object).where(lambda f: f.notna(), None).to_dict("records")
    return document

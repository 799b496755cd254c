"""The cache's per-(step, layer) record: one typed row, from which the trace's columns are derived.

The cache fills it and trace capture stores it, so the file's columns and what the cache reports
cannot drift: a field added here is a column of every new trace (``tiersim.traces.format``).
Standard library only.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any


def _column(dtype: str, default: Any = MISSING):
    return field(default=default, metadata={"dtype": dtype})


@dataclass(slots=True)
class StepRecord:
    """What one layer held, moved and attended to at one step (batch row 0 for the attention)."""

    step: int = _column("int32")  # 0 = the prefill forward, k = the k-th decode forward
    layer: int = _column("int16")
    context_len: int = _column("int32")  # tokens seen so far, evicted ones included
    n_hbm: int = _column("int32")  # tokens per tier after this step's re-tiering
    n_ddr: int = _column("int32")
    n_compressed: int = _column("int32")
    n_evicted: int = _column("int32")
    hbm_to_ddr: int = _column("int32")  # tokens moved at this step
    ddr_to_hbm: int = _column("int32")
    to_compressed: int = _column("int32")
    from_compressed: int = _column("int32")
    newly_evicted: int = _column("int32")
    ddr_cover90: int = _column("int32")  # fewest DDR tokens holding 90% / 99% of the DDR tier's attention
    ddr_cover99: int = _column("int32")
    mass_hbm: float = _column("float32")  # share of the step's attention on each tier
    mass_ddr: float = _column("float32")
    mass_compressed: float = _column("float32")
    # Present only where they apply (left out of the row when None):
    ddr_fetched: int | None = _column("int64", None)  # selective: DDR tokens the step's attention fetched
    attn_positions: list[int] | None = _column("object", None)  # --full: retained tokens' positions
    attn_probs: list[float] | None = _column("object", None)  # --full: the step's attention on each

    @classmethod
    def columns(cls) -> dict[str, str]:
        """Every always-present field and its storage dtype, in file order."""
        return {f.name: f.metadata["dtype"] for f in fields(cls) if f.default is MISSING}

    @classmethod
    def optional_columns(cls) -> dict[str, str]:
        """Fields stored only when a capture produces them."""
        return {f.name: f.metadata["dtype"] for f in fields(cls) if f.default is not MISSING}

    def row(self) -> dict[str, Any]:
        """The record as a table row (optional fields only when set)."""
        row = {name: getattr(self, name) for name in _REQUIRED}
        for name in _OPTIONAL:
            value = getattr(self, name)
            if value is not None:
                row[name] = value
        return row


_REQUIRED = tuple(StepRecord.columns())  # field lists read once: row() runs per layer per step of a capture
_OPTIONAL = tuple(StepRecord.optional_columns())

"""What a trace learns from one layer's step: tier counts, moves, and where the attention landed.

The cache calls :func:`step_record` after each layer's attention when a recorder is attached; trace
capture stores the :class:`~tiersim.hierarchy.record.StepRecord`. Batch row 0 stands for the batch
(every row has the same tier counts).
"""

from __future__ import annotations

import torch

from tiersim.hierarchy.config import TIERS
from tiersim.hierarchy.policy import COMPRESSED, DDR, HBM
from tiersim.hierarchy.record import StepRecord

MOVE_KINDS = ("hbm_to_ddr", "ddr_to_hbm", "to_compressed", "from_compressed", "evicted")


def tier_counts(layer) -> dict[str, int]:
    """Tokens per tier for one layer (batch row 0; every row has the same counts)."""
    if layer is None or not layer.is_initialized:
        return {t: 0 for t in TIERS}
    tiers = layer.tiers[0]
    return {
        "hbm": int((tiers == HBM).sum()),
        "ddr": int((tiers == DDR).sum()),
        "compressed": int((tiers == COMPRESSED).sum()),
        "evicted": layer.n_evicted,
    }


def mass_by_tier(layer, last: torch.Tensor) -> dict:
    """The last query's attention mass on each tier, and how few DDR tokens hold 90% / 99% of the DDR share."""
    tiers = layer.tiers[0]
    p = last[0]
    ddr_p = p[tiers == DDR]
    mass = {
        "mass_hbm": float(p[tiers == HBM].sum()),
        "mass_ddr": float(ddr_p.sum()),
        "mass_compressed": float(p[tiers == COMPRESSED].sum()),
    }
    cover90 = cover99 = 0
    if ddr_p.numel():
        sorted_p = torch.sort(ddr_p, descending=True).values
        cum = torch.cumsum(sorted_p.double(), 0)
        total = cum[-1]
        if total > 0:
            cover90 = int(torch.searchsorted(cum, 0.9 * total)) + 1
            cover99 = int(torch.searchsorted(cum, 0.99 * total)) + 1
            cover90, cover99 = min(cover90, ddr_p.numel()), min(cover99, ddr_p.numel())
    mass["ddr_cover90"], mass["ddr_cover99"] = cover90, cover99
    return mass


def step_record(layer_idx: int, layer, step: int, mass: dict, moves: dict | None) -> StepRecord:
    counts = tier_counts(layer)
    moves = moves or dict.fromkeys(MOVE_KINDS, 0)
    return StepRecord(
        step=step,
        layer=layer_idx,
        context_len=layer.context_len,
        n_hbm=counts["hbm"],
        n_ddr=counts["ddr"],
        n_compressed=counts["compressed"],
        n_evicted=counts["evicted"],
        hbm_to_ddr=moves["hbm_to_ddr"],
        ddr_to_hbm=moves["ddr_to_hbm"],
        to_compressed=moves["to_compressed"],
        from_compressed=moves["from_compressed"],
        newly_evicted=moves["evicted"],
        **mass,
    )

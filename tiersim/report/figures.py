"""One function per figure: a tidy pandas frame in, a ``plotly.graph_objects.Figure`` out.

They are the public API for notebook users (``tiersim.report.figures.hbm_occupancy(df).show()``)
as much as the building blocks of the HTML page, so each takes plain frames with the columns of
docs/file-formats.md and states its units in titles, axes and hover text. They live by input kind
(``simulation``, ``capacity``, ``quality``, ``calibration``, with the house style in ``style``);
this module gathers them under the one name notebooks import.
"""

from __future__ import annotations

from tiersim.report.calibration import link_sweep, measured_vs_simulated
from tiersim.report.capacity import _evict_color, capacity_frontier, savings_vs_batch, throughput_frontier
from tiersim.report.quality import quality_heatmap
from tiersim.report.serving import latency_vs_load, serving_timeline
from tiersim.report.simulation import hbm_occupancy, pcie_traffic
from tiersim.report.style import (BASELINE_COLORS, BASELINE_NAMES, FONT, LINE_RED, NICE_OVERHEADS, STRATEGY_SYMBOLS,
                                  TIER_COLORS, _human_bytes, _layout, _overhead_axis, _pct, config_label)

__all__ = [
    "BASELINE_COLORS", "BASELINE_NAMES", "FONT", "LINE_RED", "NICE_OVERHEADS", "STRATEGY_SYMBOLS", "TIER_COLORS",
    "capacity_frontier", "config_label", "hbm_occupancy", "link_sweep", "measured_vs_simulated", "pcie_traffic",
    "latency_vs_load", "quality_heatmap", "savings_vs_batch", "serving_timeline", "throughput_frontier",
]
_PRIVATE = (_evict_color, _human_bytes, _layout, _overhead_axis, _pct)  # kept importable from here, as before

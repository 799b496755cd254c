"""The report's house style and labels, shared by every kind's figures: fonts, colours, the layout,
the overhead axis, config and strategy labels, byte sizes.

The offload strategies' plot symbols and curve names (``STRATEGY_SYMBOLS``, :func:`strategy_name`) and the
eviction baselines' names and colours live here, the one place the report names them, all read from the
registries (``tiersim.hierarchy.strategies``, ``tiersim.hierarchy.registry``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from tiersim.hierarchy import registry as policies
from tiersim.hierarchy import strategies
from tiersim.hierarchy.strategies import SYMBOLS

FONT = dict(family="Inter, Segoe UI, Helvetica, Arial, sans-serif", size=13, color="#1f2937")
TIER_COLORS = {
    "weights": "#6b7280",
    "activations": "#a8a29e",
    "kv_hbm": "#2563eb",
    "staging": "#f59e0b",
    "free": "#d1fae5",
}
LINE_RED = "#dc2626"
#: The eviction baselines' colours and names, the policy registry's (tiersim.hierarchy.registry).
BASELINE_COLORS = {n: policies.REGISTRY[n].color for n in policies.BASELINE_NAMES}
BASELINE_NAMES = {n: policies.REGISTRY[n].label for n in policies.BASELINE_NAMES}
NICE_OVERHEADS = (-50, -20, -10, -5, 0, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
STRATEGY_SYMBOLS = SYMBOLS  # the strategy registry's (tiersim.hierarchy.strategies), "none" included
NO_OFFLOAD_NAME = "nothing in DDR (full cache / eviction)"


def strategy_name(strategy: str, approximate: bool = False) -> str:
    """A curve's name: the registry's label, marked when approximate; the no-offload row in words."""
    if strategy == strategies.NO_OFFLOAD:
        return NO_OFFLOAD_NAME
    label = strategies.REGISTRY[strategy].label if strategy in strategies.REGISTRY else strategy
    return label + " * (approximate)" if approximate else label


def _layout(fig: go.Figure, title: str, height: int, subtitle: str | None = None,
            legend_below: bool = False) -> go.Figure:
    """House style: bold title and grey subtitle top left, legend above the plot (or below it when
    subplot titles sit where a top legend would go)."""
    legend = (dict(orientation="h", yanchor="top", y=-0.14, xanchor="left", x=0.0) if legend_below else
              dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0.0))
    fig.update_layout(
        title=dict(text=f"<b>{title}</b>", subtitle=dict(text=subtitle or "", font=dict(size=12, color="#4b5563")),
                   x=0.0, xref="paper", xanchor="left", y=0.985, yref="container", yanchor="top"),
        font=FONT, height=height, template="plotly_white", hovermode="closest",
        margin=dict(l=80, r=30, t=120 if not legend_below else 100, b=130 if legend_below else 60),
        legend=dict(**legend, bgcolor="rgba(255,255,255,0.8)"),
        hoverlabel=dict(font_size=13),
    )
    return fig


def config_label(row: pd.Series | dict) -> str:
    """'HBM 0.50 / DDR 0.47 / evict 0.03' — the tier ratios of one config (compressed only when used)."""
    def r(key: str) -> float:
        return abs(round(float(row.get(key, 0.0) or 0.0), 4))  # no '-0.00' from 1 - 0.9 - 0.1

    comp = r("compressed")
    return (f"HBM {r('hbm'):.2f} / DDR {r('ddr'):.2f}" + (f" / comp {comp:.2f}" if comp else "")
            + f" / evict {r('evict'):.2f}")


def _overhead_axis(values: pd.Series | np.ndarray, budget: float | None = None) -> dict:
    """A log axis on step-time ratio (1 + overhead), labelled in overhead percent.

    Offloading overheads span -3% to +2000%; on a linear axis the interesting 0-20% band is a
    sliver, on a log ratio axis every decade of slowdown gets the same room.
    """
    ratios = 1.0 + np.asarray(values, dtype=float) / 100.0
    extra = [] if budget is None else [1.0 + budget / 100.0]
    lo = max(min([*ratios, 1.0, *extra]), 1e-3)
    hi = max([*ratios, 1.0, *extra])
    pad = 0.08 * max(math.log10(hi / lo), 0.05)
    lo_log, hi_log = math.log10(lo) - pad, math.log10(hi) + pad
    # Greedy: the most telling ticks first (0, the budget, decades), then others while they keep
    # at least 1/12 of the axis apart, so labels never overprint.
    first = [0] + ([round(budget)] if budget is not None else []) + [100, 1000, 10000, -50, 10, 50, 500, 5000]
    order = list(dict.fromkeys(first + list(NICE_OVERHEADS)))
    gap = (hi_log - lo_log) / 12
    chosen: list[float] = []
    for p in order:
        pos = math.log10(1 + p / 100) if p > -100 else None
        if pos is None or not lo_log <= pos <= hi_log or any(abs(pos - c) < gap for c in chosen):
            continue
        chosen.append(pos)
    ticks = sorted(10 ** c for c in chosen)
    return dict(type="log", range=[lo_log, hi_log], tickvals=ticks,
                ticktext=[_pct(t) for t in ticks], zeroline=False)


def _pct(ratio: float) -> str:
    p = round((ratio - 1.0) * 100)
    return f"{p:+d}%" if p else "0%"


def _human_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# --- labels from a file's metadata ----------------------------------------------------------------

def model_name(meta: dict) -> str:
    model = meta.get("model")
    return str(model.get("name", "model") if isinstance(model, Mapping) else model or "model")


def gpu_name(meta: dict) -> str:
    gpu = meta.get("gpu")
    return str(gpu.get("name", "GPU") if isinstance(gpu, Mapping) else gpu or "GPU")

"""The ``serving`` and ``serving-capacity`` kinds: latency against load per on-full policy, and one run's timeline.

Drawn from the files alone (the report never imports the serving simulator): a ``serving-capacity`` document's
flat ``points`` (one row per simulated rate and policy) and a ``serving`` file's summary and thinned timeline.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tiersim.report.html import Section
from tiersim.report.loaders import ReportInput
from tiersim.report.style import LINE_RED, _layout, gpu_name, model_name

POLICY_COLORS = {"preempt-recompute": "#dc2626", "preempt-swap": "#ea580c", "queue": "#6b7280", "spill": "#2563eb",
                 "queue-oracle": "#9ca3af"}
POLICY_SYMBOLS = {"preempt-recompute": "x", "preempt-swap": "diamond", "queue": "square", "spill": "circle",
                  "queue-oracle": "square"}
#: How a curve is named in the legend: the oracle says it is one (it reserves outputs no engine knows).
POLICY_LABELS = {"queue-oracle": "queue-oracle (oracle: true output lengths)"}


def latency_vs_load(points: pd.DataFrame, slo: dict | None = None, title: str = "Latency against load",
                    subtitle: str | None = None) -> go.Figure:
    """p99 TTFT and p99 TPOT against the request rate, one curve per --on-full policy, the SLOs as lines (open
    markers: points the search stopped once they missed, their latencies lower bounds)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("p99 time to first token", "p99 time per output token"),
                        horizontal_spacing=0.1)
    for policy, group in points.groupby("on_full", sort=False):
        group = group.sort_values("qps")
        color = POLICY_COLORS.get(policy, "#111827")
        # A point the search stopped early (its p99 TTFT already sure to miss) holds lower bounds: open markers, "≥".
        stopped = group["stopped_early"].fillna(False).astype(bool) if "stopped_early" in group else \
            pd.Series(False, index=group.index)
        symbol = POLICY_SYMBOLS.get(policy, "circle")
        for col, key in ((1, "ttft_p99_ms"), (2, "tpot_p99_ms")):
            fig.add_trace(go.Scatter(
                x=group["qps"], y=group[key], mode="lines+markers", name=POLICY_LABELS.get(policy, policy),
                legendgroup=policy,
                showlegend=col == 1, line=dict(color=color, width=2),
                marker=dict(symbol=[symbol + "-open" if s else symbol for s in stopped], size=8, color=color),
                customdata=["≥ " if s else "" for s in stopped],
                hovertemplate=f"<b>{policy}</b><br>%{{x:.3g}} requests/s<br>%{{customdata}}%{{y:,.1f}} ms"
                              "<extra></extra>"), 1, col)
    for col, key in ((1, "ttft_ms"), (2, "tpot_ms")):
        if slo and slo.get(key):
            fig.add_hline(y=slo[key], line=dict(color=LINE_RED, width=1.5, dash="dash"), row=1, col=col,
                          annotation_text=f"SLO {slo[key]:g} ms", annotation_position="top left")
        fig.update_xaxes(title_text="requests per second", type="log", row=1, col=col)
        fig.update_yaxes(title_text="ms (log)", type="log", row=1, col=col)
    return _layout(fig, title, 480, subtitle, legend_below=True)


def serving_timeline(timeline: pd.DataFrame, hbm_blocks: int | None, block_bytes_gb: float | None,
                     title: str = "Batch, HBM and DDR over the run", subtitle: str | None = None) -> go.Figure:
    """Decode batch and waiting requests, HBM blocks in use (share of the KV budget) and DDR-held tokens."""
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=("requests decoding / waiting", "KV budget in use (%)", "KV held in DDR"))
    t = timeline["start_s"]
    fig.add_trace(go.Scatter(x=t, y=timeline["batch"], name="decoding", line=dict(color="#2563eb")), 1, 1)
    fig.add_trace(go.Scatter(x=t, y=timeline["waiting"], name="waiting", line=dict(color="#9ca3af")), 1, 1)
    used = timeline["hbm_blocks"] / hbm_blocks * 100 if hbm_blocks else timeline["hbm_blocks"]
    fig.add_trace(go.Scatter(x=t, y=used, name="HBM in use", line=dict(color="#16a34a")), 2, 1)
    ddr = timeline["ddr_held_tokens"]
    fig.add_trace(go.Scatter(x=t, y=ddr, name="DDR tokens (spilled or swapped)", line=dict(color="#f59e0b")), 3, 1)
    fig.update_xaxes(title_text="simulated seconds", row=3, col=1)
    fig.update_yaxes(title_text="tokens", row=3, col=1)
    return _layout(fig, title, 640, subtitle, legend_below=True)


def _where(meta: dict) -> str:
    tp = meta.get("tp") or 1
    return f"{model_name(meta)} on {tp} x {gpu_name(meta)}" if tp > 1 else f"{model_name(meta)} on {gpu_name(meta)}"


def serving_capacity_section(inp: ReportInput, key: str) -> Section:
    meta = inp.meta
    sub = f"{_where(meta)}, DDR read by {meta.get('strategy', 'prefetch')}; {meta.get('workload', '')}"
    section = Section(key, f"Serving capacity: {_where(meta)}", inp.source)
    if meta.get("recommendation"):
        section.summary.append(str(meta["recommendation"]))
    slo = meta.get("slo") or {}
    slo_ms = {"ttft_ms": slo.get("ttft_s", 0) * 1e3, "tpot_ms": slo.get("tpot_s", 0) * 1e3}
    if not inp.tables["points"].empty:
        section.figures.append(("latency_vs_load", latency_vs_load(inp.tables["points"], slo_ms, subtitle=sub)))
    return section


def _ms(percentiles: dict, key: str, spec: str) -> str:
    """One percentile, or "n/a" where it is undefined (null in the file: a percentile over no values, e.g. TPOT when
    every request wrote one token)."""
    value = percentiles.get(key)
    return "n/a" if value is None or value != value else format(value, spec)


def serving_section(inp: ReportInput, key: str) -> Section:
    meta = inp.meta
    section = Section(key, f"Serving run: {_where(meta)}, --on-full {meta.get('on_full')}", inp.source)
    ttft, tpot = meta.get("ttft_ms") or {}, meta.get("tpot_ms") or {}
    if ttft and tpot:
        section.summary.append(
            f"{meta.get('requests', '?')} requests: TTFT p50 {_ms(ttft, 'p50', ',.0f')} / p99 {_ms(ttft, 'p99', ',.0f')} ms, "
            f"TPOT p50 {_ms(tpot, 'p50', '.1f')} / p99 {_ms(tpot, 'p99', '.1f')} ms, goodput "
            f"{meta.get('goodput_qps', 0):.3g} requests/s, {meta.get('preemptions', 0)} preemptions, "
            f"{meta.get('spilled_gb', 0):.1f} GB spilled.")
    section.figures.append(("serving_timeline", serving_timeline(
        inp.tables["timeline"], meta.get("hbm_blocks"), None, subtitle=f"{_where(meta)}; {meta.get('workload', '')}")))
    return section

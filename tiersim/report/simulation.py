"""The ``simulation`` kind: a run's timeline as HBM occupancy and host-link traffic per decode step."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tiersim.report.html import Section
from tiersim.report.loaders import ReportInput
from tiersim.report.style import LINE_RED, TIER_COLORS, _layout, config_label, gpu_name, model_name

def hbm_occupancy(timeline: pd.DataFrame, title: str = "HBM occupancy per decode step",
                  full_cache_gb: pd.Series | None = None, subtitle: str | None = None) -> go.Figure:
    """Stacked HBM use (weights, activations and reserve, HBM-tier KV, staging, free) vs capacity.

    ``full_cache_gb`` (optional, one value per step) draws what the same step would need with the
    whole KV cache in HBM, so the saving is visible as the gap to the stack.
    """
    df = timeline.sort_values("step")
    steps = df["step"]
    activations = df["activations_gb"] if "activations_gb" in df else pd.Series(0.0, index=df.index)
    layers = [
        ("weights", "weights", df["weights_gb"]),
        ("activations", "activations + reserve", activations),
        ("kv_hbm", "KV in HBM tier", df["kv_hbm_gb"]),
        ("staging", "DDR staging buffers", df["staging_gb"]),
        ("free", "free", df["free_gb"].clip(lower=0.0)),
    ]
    fig = go.Figure()
    for key, name, values in layers:
        fig.add_trace(go.Scatter(
            x=steps, y=values, name=name, stackgroup="hbm", mode="lines", line=dict(width=0.5, color=TIER_COLORS[key]),
            fillcolor=TIER_COLORS[key], hovertemplate=f"{name}: %{{y:.2f}} GB<extra></extra>",
        ))
    fig.add_trace(go.Scatter(
        x=steps, y=df["hbm_capacity_gb"], name="GPU HBM capacity", mode="lines",
        line=dict(color=LINE_RED, width=2.5, dash="dash"), hovertemplate="capacity: %{y:.1f} GB<extra></extra>",
    ))
    if full_cache_gb is not None:
        fig.add_trace(go.Scatter(
            x=steps, y=np.asarray(full_cache_gb, dtype=float), name="needed with the whole KV in HBM", mode="lines",
            line=dict(color="#111827", width=2, dash="dot"), hovertemplate="whole KV in HBM: %{y:.2f} GB<extra></extra>",
        ))
    used = df["weights_gb"] + activations + df["kv_hbm_gb"] + df["staging_gb"]
    if full_cache_gb is not None:
        saved = float(np.asarray(full_cache_gb, dtype=float)[-1] - used.iloc[-1])
        fig.add_annotation(x=steps.iloc[-1], y=float(np.asarray(full_cache_gb, dtype=float)[-1]), xanchor="right",
                           yanchor="bottom", showarrow=False, bgcolor="rgba(255,255,255,0.85)",
                           text=f"{'saved' if saved >= 0 else 'costs'} {abs(saved):.2f} GB vs whole KV in HBM "
                                f"(last step)")
    over = used > df["hbm_capacity_gb"]
    if over.any():
        first = steps[over].iloc[0]
        fig.add_annotation(x=first, y=float(used[over].iloc[0]), text=f"exceeds HBM from step {first}",
                           showarrow=True, arrowhead=2, font=dict(color=LINE_RED))
    fig.update_xaxes(title_text="decode step")
    fig.update_yaxes(title_text="HBM (GB)", rangemode="tozero")
    _layout(fig, title, 460, subtitle)
    fig.update_layout(hovermode="x unified")
    return fig


def pcie_traffic(timeline: pd.DataFrame, title: str = "PCIe traffic and stall per decode step",
                 subtitle: str | None = None) -> go.Figure:
    """Top: GB moved per step each way. Bottom: step time split into compute and stall (ms)."""
    df = timeline.sort_values("step")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        subplot_titles=("host link traffic per step (GB)", "step time: compute + stall (ms)"))
    fig.add_trace(go.Scatter(x=df["step"], y=df["h2d_gb"], name="H2D (DDR tier prefetch)", mode="lines",
                             line=dict(color="#2563eb", width=2), hovertemplate="H2D: %{y:.3f} GB<extra></extra>"),
                  row=1, col=1)
    fig.add_trace(go.Scatter(x=df["step"], y=df["d2h_gb"], name="D2H (demotions)", mode="lines",
                             line=dict(color="#0d9488", width=2), hovertemplate="D2H: %{y:.3f} GB<extra></extra>"),
                  row=1, col=1)
    fig.add_trace(go.Scatter(x=df["step"], y=df["compute_ms"], name="compute", stackgroup="time", mode="lines",
                             line=dict(width=0.5, color="#6b7280"), fillcolor="rgba(107,114,128,0.55)",
                             hovertemplate="compute: %{y:.2f} ms<extra></extra>"), row=2, col=1)
    fig.add_trace(go.Scatter(x=df["step"], y=df["stall_ms"], name="stall (waiting for PCIe)", stackgroup="time",
                             mode="lines", line=dict(width=0.5, color=LINE_RED), fillcolor="rgba(220,38,38,0.45)",
                             hovertemplate="stall: %{y:.2f} ms<extra></extra>"), row=2, col=1)
    fig.add_trace(go.Scatter(x=df["step"], y=df["step_ms"], name="step time", mode="lines",
                             line=dict(color="#111827", width=1.5), hovertemplate="step: %{y:.2f} ms<extra></extra>"),
                  row=2, col=1)
    fig.update_yaxes(title_text="GB per step", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="ms per step", rangemode="tozero", row=2, col=1)
    fig.update_xaxes(title_text="decode step", row=2, col=1)
    _layout(fig, title, 620, subtitle, legend_below=True)
    fig.update_layout(hovermode="x unified", legend_traceorder="normal")
    return fig



# --- the section ---------------------------------------------------------------------------------

def simulation_section(inp: ReportInput, key: str) -> Section:
    """The page section of one ``simulation`` file: peak HBM, step-time percentiles, its two figures."""
    meta, timeline = inp.meta, inp.tables["timeline"]
    config = meta.get("config") or {}
    batch = meta.get("batch")
    label = config_label(config) if {"hbm", "ddr", "evict"} <= set(config) else "unknown config"
    section = Section(key, f"Simulation: {label}" + (f", batch {batch}" if batch else ""), inp.source)
    summary = meta.get("summary") or {}
    peak = float((timeline["weights_gb"] + timeline.get("activations_gb", 0.0) + timeline["kv_hbm_gb"]
                  + timeline["staging_gb"]).max())
    capacity = float(timeline["hbm_capacity_gb"].max())
    fits = "fits" if peak <= capacity else "DOES NOT FIT"
    step = timeline["step_ms"]
    section.summary.append(
        f"Peak HBM {peak:.1f} GB of {capacity:.0f} GB ({fits}). Step time p50 {step.median():.2f} ms, "
        f"p99 {np.percentile(step, 99):.2f} ms, of which stall {timeline['stall_ms'].mean():.2f} ms on average; "
        f"H2D {timeline['h2d_gb'].mean():.3f} GB and D2H {timeline['d2h_gb'].mean():.3f} GB per step.")
    if {"hbm_saved_gb", "overhead_pct"} <= set(summary):
        section.summary.append(
            f"Against the whole KV cache in HBM: {summary['hbm_saved_gb']:.2f} GB saved at "
            f"{summary['overhead_pct']:+.1f}% step time" + (f", {summary['tokens_per_s']:,.0f} tokens/s"
                                                           if "tokens_per_s" in summary else "") + ".")
    sub = f"{model_name(meta)} on {gpu_name(meta)}, {label}" + (f", batch {batch}" if batch else "")
    section.figures.append(("hbm_occupancy", hbm_occupancy(timeline, full_cache_gb=_full_cache(meta, timeline),
                                                           subtitle=sub)))
    section.figures.append(("pcie_traffic", pcie_traffic(timeline, subtitle=sub)))
    return section


def _full_cache(meta: dict, timeline: pd.DataFrame) -> pd.Series | None:
    """What each step would need with every KV token in HBM (no staging), when the metadata allows."""
    model, batch = meta.get("model"), meta.get("batch")
    per_token = model.get("kv_bytes_per_token") if isinstance(model, Mapping) else None
    if not per_token or not batch or "context_tokens_mean" not in timeline:
        return None
    timeline = timeline.sort_values("step")
    kv_full = timeline["context_tokens_mean"] * float(batch) * float(per_token) / 1e9
    return timeline["weights_gb"] + timeline.get("activations_gb", 0.0) + kv_full

"""One function per figure: a tidy pandas frame in, a ``plotly.graph_objects.Figure`` out.

They are the public API for notebook users (``tiersim.report.figures.hbm_occupancy(df).show()``)
as much as the building blocks of the HTML page, so each takes plain frames with the columns of
docs/file-formats.md and states its units in titles, axes and hover text.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

FONT = dict(family="Inter, Segoe UI, Helvetica, Arial, sans-serif", size=13, color="#1f2937")
TIER_COLORS = {
    "weights": "#6b7280",
    "activations": "#a8a29e",
    "kv_hbm": "#2563eb",
    "staging": "#f59e0b",
    "free": "#d1fae5",
}
LINE_RED = "#dc2626"
BASELINE_COLORS = {"h2o": "#9333ea", "rkv": "#db2777", "snapkv": "#ea580c", "streamingllm": "#65a30d"}
BASELINE_NAMES = {"h2o": "H2O", "rkv": "R-KV", "snapkv": "SnapKV", "streamingllm": "StreamingLLM"}
NICE_OVERHEADS = (-50, -20, -10, -5, 0, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


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


# --- simulation timeline -------------------------------------------------------------------------

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


# --- capacity grid -------------------------------------------------------------------------------

def capacity_frontier(rows: pd.DataFrame, max_overhead_pct: float | None = None, best: dict | None = None,
                      title: str = "Capacity frontier: HBM saved vs overhead", subtitle: str | None = None) -> go.Figure:
    """Every config: HBM saved (GB) against step-time overhead, the budget line and the best config."""
    df = rows.copy()
    df["label"] = df.apply(config_label, axis=1)
    df["ratio"] = 1.0 + df["overhead_pct"].astype(float) / 100.0
    custom_cols = ["label", "overhead_pct", "hbm_saved_gb"] + [
        c for c in ("stall_ms", "step_ms", "peak_hbm_gb", "max_batch") if c in df]
    hover = ("<b>%{customdata[0]}</b><br>HBM saved: %{customdata[2]:.2f} GB<br>overhead: %{customdata[1]:+.1f}%"
             + "".join(f"<br>{name}: %{{customdata[{i}]{fmt}}}{unit}" for i, (name, fmt, unit) in enumerate(
                 [("stall", ":.2f", " ms"), ("step", ":.2f", " ms"), ("peak HBM", ":.1f", " GB"), ("largest batch", "", "")],
                 start=3) if i < len(custom_cols)))
    fig = go.Figure()
    if max_overhead_pct is not None:
        limit = 1.0 + max_overhead_pct / 100.0
        fig.add_vrect(x0=limit, x1=max(df["ratio"].max(), limit) * 10, fillcolor="#fee2e2", opacity=0.45,
                      line_width=0, layer="below")
        fig.add_vline(x=limit, line=dict(color=LINE_RED, width=2, dash="dash"))
        fig.add_annotation(x=math.log10(limit), y=0.99, yref="paper", text=f"--max-overhead {max_overhead_pct:g}%",
                           showarrow=False, xanchor="left", yanchor="top", xshift=4, font=dict(color=LINE_RED),
                           bgcolor="rgba(255,255,255,0.8)")
    first_evict = df["evict"].min()
    for evict, group in df.groupby("evict", sort=True):
        group = group.sort_values("hbm", ascending=False)
        color = _evict_color(evict, df["evict"])
        # One line per eviction ratio through its HBM shares: the trade-off curve, labelled once.
        fig.add_trace(go.Scatter(
            x=group["ratio"], y=group["hbm_saved_gb"], mode="lines+markers+text" if evict == first_evict else
            "lines+markers", name=f"evict {abs(evict):.2f}", legendgroup=f"evict{evict}",
            text=[f"HBM {h:.2f}" for h in group["hbm"]], textposition="top left", textfont=dict(size=11, color="#374151"),
            customdata=group[custom_cols].to_numpy(dtype=object), hovertemplate=hover + "<extra></extra>",
            line=dict(color=color, width=1.5), marker=dict(size=11, color=color, line=dict(width=1, color="#111827")),
        ))
        unfit = group[~group["fits"].astype(bool)]
        if len(unfit):
            fig.add_trace(go.Scatter(
                x=unfit["ratio"], y=unfit["hbm_saved_gb"], mode="markers", name="does not fit in HBM",
                legendgroup="unfit", showlegend=bool(evict == first_evict) or None, hoverinfo="skip",
                marker=dict(size=20, symbol="x-thin-open", line=dict(width=2.5, color=LINE_RED)),
            ))
    if best:
        fig.add_trace(go.Scatter(
            x=[1.0 + best["overhead_pct"] / 100.0], y=[best["hbm_saved_gb"]], mode="markers", name="best within budget",
            marker=dict(symbol="star", size=24, color="#facc15", line=dict(width=1.5, color="#111827")),
            hovertemplate=f"<b>best: {config_label(best)}</b><br>HBM saved: %{{y:.2f}} GB<br>"
                          f"overhead: {best['overhead_pct']:+.1f}%<extra></extra>",
        ))
        fig.add_annotation(x=math.log10(1.0 + best["overhead_pct"] / 100.0), y=best["hbm_saved_gb"],
                           text=f"best: {config_label(best)}<br>saves {best['hbm_saved_gb']:.1f} GB at "
                                f"{best['overhead_pct']:+.1f}%", showarrow=True, arrowhead=2, ax=60, ay=-50,
                           align="left", bgcolor="rgba(255,255,255,0.85)", bordercolor="#111827")
    fig.update_xaxes(title_text="step-time overhead vs all-in-HBM (log scale of step time)",
                     **_overhead_axis(df["overhead_pct"], max_overhead_pct))
    fig.update_yaxes(title_text="HBM saved (GB)", rangemode="tozero")
    return _layout(fig, title, 500, subtitle)


STRATEGY_SYMBOLS = {"none": "square", "prefetch": "circle", "host-attention": "diamond", "hybrid": "star-diamond",
                    "recompute": "triangle-up", "selective": "cross", "compressed-transfer": "x"}


def throughput_frontier(points: pd.DataFrame, tpot_slo_ms: float | None = None, full_cache: dict | None = None,
                        title: str = "Throughput frontier: tokens/s per GPU against TPOT",
                        subtitle: str | None = None) -> go.Figure:
    """One curve per strategy through the batches (at each batch its fastest split that fits), HBM
    freed as colour, the TPOT budget as a line and the full cache at its largest batch as a star."""
    df = points[points["fits"].astype(bool)].copy()
    fig = go.Figure()
    if df.empty:
        fig.add_annotation(text="no point fits", x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False)
        return _layout(fig, title, 520, subtitle)
    df["label"] = df.apply(config_label, axis=1)
    approx = df["approximate"].astype(bool) if "approximate" in df else pd.Series(False, index=df.index)
    df["name"] = np.where(approx, df["strategy"] + " * (approximate)", df["strategy"])
    df.loc[df["strategy"] == "none", "name"] = "nothing in DDR (full cache / eviction)"
    fastest = df.loc[df.groupby(["name", "batch"])["tpot_ms"].idxmin()]
    cmax = max(float(df["hbm_saved_gb"].max()), 1e-9)
    for name, group in fastest.groupby("name", sort=False):
        group = group.sort_values("batch")
        dashed = "approximate" in name
        fig.add_trace(go.Scatter(
            x=group["tpot_ms"], y=group["tokens_per_s"], mode="lines+markers", name=name,
            line=dict(color="#9ca3af" if dashed else "#374151", width=1.2, dash="dot" if dashed else "solid"),
            marker=dict(size=12, symbol=STRATEGY_SYMBOLS.get(group["strategy"].iloc[0], "circle"),
                        color=group["hbm_saved_gb"], coloraxis="coloraxis", line=dict(width=1, color="#111827")),
            customdata=group[["label", "batch", "hbm_saved_gb", "peak_hbm_gb"]].to_numpy(dtype=object),
            hovertemplate=(f"<b>{name}</b><br>%{{customdata[0]}}, batch %{{customdata[1]}}<br>TPOT %{{x:.1f}} ms, "
                           "%{y:,.0f} tok/s<br>HBM freed %{customdata[2]:.1f} GB, peak %{customdata[3]:.1f} GB"
                           "<extra></extra>"),
        ))
    if tpot_slo_ms is not None:
        fig.add_vline(x=tpot_slo_ms, line=dict(color=LINE_RED, width=2, dash="dash"))
        fig.add_annotation(x=math.log10(tpot_slo_ms), y=0.99, yref="paper", text=f"--tpot-slo {tpot_slo_ms:g} ms",
                           showarrow=False, xanchor="left", yanchor="top", xshift=4, font=dict(color=LINE_RED),
                           bgcolor="rgba(255,255,255,0.8)")
    if full_cache:
        fig.add_trace(go.Scatter(
            x=[full_cache["tpot_ms"]], y=[full_cache["tokens_per_s"]], mode="markers",
            name=f"full cache, batch {full_cache['batch']:,} (largest that fits)",
            marker=dict(symbol="star", size=24, color="#facc15", line=dict(width=1.5, color="#111827")),
            hovertemplate=f"<b>full cache at batch {full_cache['batch']:,}</b><br>TPOT %{{x:.1f}} ms, "
                          "%{y:,.0f} tok/s<extra></extra>",
        ))
    fig.update_layout(coloraxis=dict(colorscale="Viridis", cmin=0.0, cmax=cmax,
                                     colorbar=dict(title="HBM freed (GB)", thickness=14)))
    fig.update_xaxes(title_text="TPOT: time per output token (ms, log scale)", type="log")
    fig.update_yaxes(title_text="tokens/s per GPU", rangemode="tozero")
    return _layout(fig, title, 620, subtitle, legend_below=True)


def _evict_color(evict: float, all_evicts: pd.Series) -> str:
    values = sorted(set(all_evicts.astype(float)))
    palette = ["#2563eb", "#0d9488", "#d97706", "#dc2626", "#7c3aed", "#db2777", "#65a30d"]
    return palette[values.index(float(evict)) % len(palette)]


def savings_vs_batch(sweep: pd.DataFrame, max_overhead_pct: float | None = None,
                     title: str = "HBM saved vs batch size", subtitle: str | None = None) -> go.Figure:
    """Per config: HBM saved (top) and overhead (bottom) at each batch; open markers break the budget."""
    df = sweep.copy()
    for col, default in (("compressed", 0.0), ("ddr", 0.0)):
        if col not in df:
            df[col] = default
    # The all-in-HBM reference saves nothing at zero overhead by definition: leave it out.
    df = df[~((df["hbm"] >= 1.0) & (df["evict"] <= 0.0) & (df["compressed"] <= 0.0))]
    df["label"] = df.apply(config_label, axis=1)
    budget = np.inf if max_overhead_pct is None else max_overhead_pct
    df["ok"] = df["fits"].astype(bool) & (df["overhead_pct"] <= budget)
    df["ratio"] = 1.0 + df["overhead_pct"].astype(float) / 100.0
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1, row_heights=[0.58, 0.42],
                        subplot_titles=("HBM saved (GB)", "step-time overhead vs all-in-HBM"))
    palette = ["#2563eb", "#0d9488", "#d97706", "#dc2626", "#7c3aed", "#db2777", "#6b7280"]
    extra = [c for c in ("stall_ms", "step_ms", "peak_hbm_gb") if c in df]
    custom = ["label", "batch", "hbm_saved_gb", "overhead_pct", "fits", *extra]
    hover = ("<b>%{customdata[0]}</b>, batch %{customdata[1]}<br>HBM saved: %{customdata[2]:.2f} GB"
             "<br>overhead: %{customdata[3]:+.1f}%<br>fits: %{customdata[4]}"
             + "".join(f"<br>{n}: %{{customdata[{5 + i}]:.2f}} {u}" for i, (n, u) in enumerate(
                 [("stall", "ms"), ("step", "ms"), ("peak HBM", "GB")][: len(extra)])) + "<extra></extra>")
    for i, (label, group) in enumerate(df.groupby("label", sort=False)):
        group = group.sort_values("batch")
        color = palette[i % len(palette)]
        symbols = ["circle" if ok else "circle-open" for ok in group["ok"]]
        data = group[custom].to_numpy(dtype=object)
        fig.add_trace(go.Scatter(x=group["batch"], y=group["hbm_saved_gb"], name=label, legendgroup=label,
                                 mode="lines+markers", line=dict(color=color, width=2),
                                 marker=dict(size=9, symbol=symbols, color=color, line=dict(width=1.5, color=color)),
                                 customdata=data, hovertemplate=hover), row=1, col=1)
        fig.add_trace(go.Scatter(x=group["batch"], y=group["ratio"], name=label, legendgroup=label, showlegend=False,
                                 mode="lines+markers", line=dict(color=color, width=2, dash="dot"),
                                 marker=dict(size=8, symbol=symbols, color=color, line=dict(width=1.5, color=color)),
                                 customdata=data, hovertemplate=hover), row=2, col=1)
    if max_overhead_pct is not None:
        limit = 1.0 + max_overhead_pct / 100.0
        fig.add_hline(y=limit, line=dict(color=LINE_RED, width=2, dash="dash"), row=2, col=1)
        # add_hline's own label lands at the wrong height on a log axis: place it in log units.
        fig.add_annotation(x=0.0, xref="x2 domain", y=math.log10(limit), yref="y2", text=f"--max-overhead "
                           f"{max_overhead_pct:g}%", showarrow=False, xanchor="left", yanchor="bottom",
                           font=dict(color=LINE_RED), bgcolor="rgba(255,255,255,0.8)")
    batches = sorted(df["batch"].unique())
    fig.update_xaxes(type="log", tickvals=batches, ticktext=[str(b) for b in batches])
    fig.update_xaxes(title_text="batch size (sequences decoded together, log scale)", row=2, col=1)
    fig.update_yaxes(title_text="GB", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="overhead", row=2, col=1, **_overhead_axis(df["overhead_pct"], max_overhead_pct))
    sub = "filled marker: fits in HBM" + (f" and within {max_overhead_pct:g}% overhead" if max_overhead_pct is not None
                                         else "") + "; open marker: does not"
    return _layout(fig, title, 680, subtitle + " · " + sub if subtitle else sub, legend_below=True)


# --- quality grid --------------------------------------------------------------------------------

def quality_heatmap(rows: pd.DataFrame, metric: str = "exact_match",
                    title: str = "Output quality: eviction × HBM share, with eviction baselines",
                    subtitle: str | None = None) -> go.Figure:
    """Left: the hierarchy's metric over (eviction, HBM). Right: baselines and the hierarchy per HBM budget."""
    df = rows.copy()
    hier = df[df["method"] == "hierarchy"].copy()
    bases = df[df["method"] != "hierarchy"].copy()
    metric_name = metric.replace("_", " ")
    fig = make_subplots(rows=1, cols=2, column_widths=[0.42, 0.58], horizontal_spacing=0.1,
                        subplot_titles=(f"hierarchy: {metric_name} (1.00 = same text as the full cache)",
                                        f"same HBM budget: {metric_name} by method"))
    if not hier.empty:
        several_comp = hier["compressed"].nunique() > 1
        hier["y"] = hier.apply(lambda r: f"HBM {r['hbm']:.2f}" + (f" · comp {r['compressed']:.2f}" if several_comp
                                                                   else ""), axis=1)
        hier["x"] = hier["evict"].map(lambda e: f"{e:g}")
        hier = hier.sort_values(["hbm", "compressed", "evict"], ascending=[False, True, True])
        extras = [c for c in ("answer_agreement", "mean_tokens_to_divergence", "accuracy") if c in hier]
        z = hier.pivot_table(index="y", columns="x", values=metric, aggfunc="mean", sort=False)
        cells = {c: hier.pivot_table(index="y", columns="x", values=c, aggfunc="mean", sort=False)
                 .reindex(index=z.index, columns=z.columns) for c in extras}
        custom = np.dstack([cells[c].to_numpy(dtype=float) for c in extras]) if extras else None
        hover = (f"HBM row %{{y}}, evict %{{x}}<br>{metric_name}: %{{z:.3f}}"
                 + "".join(f"<br>{c.replace('_', ' ')}: %{{customdata[{i}]:.3f}}" for i, c in enumerate(extras))
                 + "<extra></extra>")
        fig.add_trace(go.Heatmap(
            z=z.to_numpy(dtype=float), x=list(z.columns), y=list(z.index), zmin=0.0, zmax=1.0, colorscale="RdYlGn",
            texttemplate="%{z:.2f}", textfont=dict(size=15), customdata=custom, hovertemplate=hover,
            showscale=False, xgap=2, ygap=2,
        ), row=1, col=1)
        fig.update_xaxes(title_text="evicted share of the KV cache", type="category", row=1, col=1)
        fig.update_yaxes(title_text="HBM share (rest in DDR)", type="category", autorange="reversed", row=1, col=1)
    budgets = sorted(set(bases["hbm"]) | (set(hier["hbm"][hier["hbm"] < 1.0]) if bases.empty else set(bases["hbm"])),
                     reverse=True)
    xcat = [f"HBM {b:.2f}" for b in budgets]
    comp0 = hier[hier["compressed"] == hier["compressed"].min()] if not hier.empty else hier
    blues = ["#1e3a8a", "#2563eb", "#60a5fa", "#93c5fd", "#bfdbfe"]
    series: list[tuple[str, pd.DataFrame, str]] = []
    for i, (evict, g) in enumerate(comp0.groupby("evict", sort=True)):
        series.append((f"hierarchy, evict {evict:g}", g, blues[i % len(blues)]))
    for method, g in bases.groupby("method", sort=True):
        series.append((BASELINE_NAMES.get(method, method), g, BASELINE_COLORS.get(method, "#6b7280")))
    for name, g, color in series:
        g = g[g["hbm"].isin(budgets)].sort_values("hbm", ascending=False)
        if g.empty:
            continue
        fig.add_trace(go.Bar(
            x=[f"HBM {h:.2f}" for h in g["hbm"]], y=g[metric], name=name, marker_color=color,
            text=[f"{v:.2f}" for v in g[metric]], textposition="outside", cliponaxis=False,
            hovertemplate=f"<b>{name}</b><br>%{{x}}<br>{metric_name}: %{{y:.3f}}<extra></extra>",
        ), row=1, col=2)
    fig.update_xaxes(title_text="HBM budget (baselines keep only this share)", categoryorder="array",
                     categoryarray=xcat, row=1, col=2)
    fig.update_yaxes(title_text=metric_name, range=[0, 1.12], row=1, col=2)
    fig.update_layout(barmode="group", bargap=0.2, bargroupgap=0.05)
    _layout(fig, title, 560, subtitle, legend_below=True)
    fig.update_layout(legend=dict(y=-0.2))
    return fig


# --- validation ----------------------------------------------------------------------------------

def measured_vs_simulated(points: pd.DataFrame, title: str = "Measured vs simulated decode step time",
                          subtitle: str | None = None, where: str = "the GPU") -> go.Figure:
    """Each validation point: GPU-measured step time against the simulator's, with y = x and ±10%.

    Points are coloured by HBM share (the knob that moves traffic); axes turn logarithmic when
    step times span more than a factor of 4, so short steps do not pile up in a corner.
    """
    df = points.dropna(subset=["measured_step_ms", "simulated_step_ms"]).copy()
    df["error"] = (df["simulated_step_ms"] / df["measured_step_ms"] - 1.0) * 100.0
    for col in ("model_shape", "batch", "context", "hbm", "stall_ms", "overhead_pct"):
        if col not in df:
            df[col] = None
    df["stall_text"] = df["stall_ms"].map(lambda v: "n/a" if v is None or pd.isna(v) else f"{v:.2f} ms")
    df["overhead_text"] = df["overhead_pct"].map(lambda v: "n/a" if v is None or pd.isna(v) else f"{v:+.1f}%")
    custom_cols = ["model_shape", "batch", "context", "hbm", "error", "stall_text", "overhead_text"]
    hover = ("<b>%{customdata[0]}</b>, batch %{customdata[1]}, context %{customdata[2]}, HBM %{customdata[3]}"
             "<br>measured: %{x:.2f} ms<br>simulated: %{y:.2f} ms<br>simulator error: %{customdata[4]:+.1f}%"
             "<br>measured stall: %{customdata[5]}<br>overhead vs all in HBM: %{customdata[6]}<extra></extra>")
    fig = go.Figure()
    if not df.empty:
        both = pd.concat([df["measured_step_ms"], df["simulated_step_ms"]]).astype(float)
        lo, hi = float(both.min()), float(both.max())
        log = lo > 0 and hi / lo > 4
        lo, hi = (lo / 1.15, hi * 1.15) if log else (0.0, hi * 1.08)
        line = np.geomspace(lo, hi, 50) if log else np.linspace(lo, hi, 50)
        fig.add_trace(go.Scatter(x=np.r_[line, line[::-1]], y=np.r_[line * 1.1, line[::-1] * 0.9], fill="toself",
                                 mode="lines", line=dict(width=0), fillcolor="rgba(37,99,235,0.10)",
                                 name="within ±10%", hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=line, y=line, mode="lines", name="simulated = measured",
                                 line=dict(color="#111827", width=1.5), hoverinfo="skip"))
        palette = ["#dc2626", "#d97706", "#0d9488", "#2563eb", "#7c3aed", "#6b7280"]
        for i, (hbm, group) in enumerate(df.groupby(df["hbm"].fillna(-1.0), sort=True)):
            fig.add_trace(go.Scatter(
                x=group["measured_step_ms"], y=group["simulated_step_ms"], mode="markers",
                name=f"HBM share {hbm:.2f}" if hbm >= 0 else "HBM share unknown",
                customdata=group[custom_cols].to_numpy(dtype=object), hovertemplate=hover,
                marker=dict(size=12, color=palette[i % len(palette)], line=dict(width=1, color="#111827")),
            ))
        axis = dict(range=[lo, hi])
        if log:  # plotly's own log ticks skip the low end of a short range: 1-1.5-2-3-5-7 per decade instead
            ticks = [m * 10 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                     for m in (1, 1.5, 2, 3, 5, 7) if lo <= m * 10 ** e <= hi]
            axis = dict(type="log", range=[math.log10(lo), math.log10(hi)], tickvals=ticks,
                        ticktext=[f"{t:g}" for t in ticks])
        fig.update_xaxes(**axis)
        fig.update_yaxes(**axis)
    errors = df["error"].abs()
    sub = (f"{len(df)} points; |simulator error| median {errors.median():.1f}%, max {errors.max():.1f}%" if len(df)
           else "no point has both a measured and a simulated step time")
    scale = " (log scale)" if fig.layout.xaxis.type == "log" else ""
    fig.update_xaxes(title_text=f"measured on {where} (ms per decode step){scale}")
    fig.update_yaxes(title_text=f"simulated (ms per decode step){scale}")
    return _layout(fig, title, 560, f"{subtitle} · {sub}" if subtitle else sub)


def link_sweep(sweep: pd.DataFrame, link: dict | None = None,
               title: str = "Host link bandwidth vs copy size", subtitle: str | None = None) -> go.Figure:
    """Measured GB/s per direction against copy size: per-call latency dominates small copies."""
    df = sweep.sort_values("bytes").copy()
    df["size"] = df["bytes"].map(_human_bytes)
    if "seconds" not in df:
        df["seconds"] = df["bytes"] / (df["gbps"] * 1e9)
    df["us"] = df["seconds"] * 1e6
    colors = {"h2d": "#2563eb", "d2h": "#0d9488", "both": "#d97706"}
    names = {"h2d": "host → device (H2D)", "d2h": "device → host (D2H)", "both": "both directions at once (total)"}
    fig = go.Figure()
    for direction, g in df.groupby("direction", sort=False):
        fig.add_trace(go.Scatter(
            x=g["bytes"], y=g["gbps"], mode="lines+markers", name=names.get(direction, direction),
            line=dict(color=colors.get(direction, "#6b7280"), width=2), marker=dict(size=7),
            customdata=g[["size", "us"]].to_numpy(dtype=object),
            hovertemplate=f"{names.get(direction, direction)}<br>copy %{{customdata[0]}}: %{{y:.2f}} GB/s"
                          f"<br>time %{{customdata[1]:.1f}} µs<extra></extra>",
        ))
    link = link or {}
    higher = "d2h" if (link.get("d2h_gbps") or 0) >= (link.get("h2d_gbps") or 0) else "h2d"
    for key, label, direction in (("h2d_gbps", "H2D", "h2d"), ("d2h_gbps", "D2H", "d2h")):
        value = link.get(key)
        if value:  # the higher label above its line, the lower below: they never overprint
            fig.add_hline(y=value, line=dict(color=colors[direction], width=1, dash="dash"),
                          annotation_text=f"{label} calibrated {value:.1f} GB/s",
                          annotation_position="top left" if direction == higher else "bottom left",
                          annotation_font_color=colors[direction])
    sizes = df["bytes"].drop_duplicates()
    step = max(1, len(sizes) // 10)
    ticks = sizes.iloc[::step]
    fig.update_xaxes(type="log", title_text="bytes per copy (log scale)", tickvals=list(ticks),
                     ticktext=[_human_bytes(b) for b in ticks])
    fig.update_yaxes(title_text="achieved bandwidth (GB/s)", rangemode="tozero")
    latency = (link or {}).get("copy_latency_us")
    sub = f"per-copy latency {latency:.1f} µs" if latency else None
    if subtitle:
        sub = f"{subtitle} · {sub}" if sub else subtitle
    return _layout(fig, title, 480, sub)


def _human_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"

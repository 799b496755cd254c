"""The ``capacity`` kind: the planner's grid as capacity and throughput frontiers and savings per batch."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tiersim.hierarchy.strategies import NO_OFFLOAD
from tiersim.report.html import Section
from tiersim.report.loaders import ReportInput
from tiersim.report.style import (LINE_RED, STRATEGY_SYMBOLS, _layout, _overhead_axis, config_label, gpu_name,
                                  model_name, strategy_name)


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
    df["name"] = [strategy_name(s, a) for s, a in zip(df["strategy"], approx)]
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



# --- the section ---------------------------------------------------------------------------------

def capacity_section(inp: ReportInput, key: str) -> Section:
    """The page section of one ``capacity`` file: the recommendation, the best config, its frontiers."""
    meta, rows, sweep = inp.meta, inp.tables["rows"], inp.tables["batch_sweep"]
    points = inp.tables.get("points", pd.DataFrame())
    grid_sub = None
    if "strategy" in rows and rows["batch"].nunique() > 1:  # a batch range: its rows are the planner's points
        rows = rows[rows["strategy"].isin([NO_OFFLOAD, "prefetch"]) & (rows["batch"] == rows["batch"].min())]
        grid_sub = f"prefetch at batch {int(rows['batch'].iloc[0])} (closed form)"
    budget = meta.get("max_overhead_pct")
    batch = meta.get("batch")
    batches = meta.get("batches") or []
    sub = f"{model_name(meta)} on {gpu_name(meta)}" + (
        f", batches {batches[0]}..{batches[-1]}" if len(batches) > 1 else f", batch {batch}" if batch else "")
    if meta.get("mean_length"):
        sub += f", ~{meta['mean_length']:.0f} generated tokens per sequence"
    section = Section(key, f"Capacity plan: {sub}", inp.source)
    if meta.get("recommendation"):
        section.summary.append(str(meta["recommendation"]))
    planner = meta.get("planner") or {}
    if not points.empty:
        slo = planner.get("tpot_slo_ms")
        section.figures.append(("throughput_frontier", throughput_frontier(
            points, slo, planner.get("full_cache"), subtitle=sub + (f", TPOT budget {slo:g} ms" if slo else ""))))
    best = meta.get("best")
    budget_text = f"{budget:g}%" if budget is not None else "the budget"
    if best:
        section.summary.append(
            f"Best within {budget_text} overhead: {config_label(best)} saves {best['hbm_saved_gb']:.1f} GB "
            f"of HBM at {best['overhead_pct']:+.1f}% step time"
            + (f" (largest batch {best['max_batch']})" if best.get("max_batch") else "") + ".")
    else:
        section.summary.append(f"No config saves HBM within {budget_text} overhead at this batch.")
    if meta.get("max_batch_full_cache"):
        section.summary.append(f"Largest batch with the whole KV cache in HBM: {meta['max_batch_full_cache']}.")
    section.figures.append(("capacity_frontier", capacity_frontier(
        rows, budget, best, subtitle=sub + (f"; {grid_sub}" if grid_sub else ""))))
    if not sweep.empty:
        section.figures.append(("savings_vs_batch", savings_vs_batch(sweep, budget, subtitle=model_name(meta)
                                                                     + " on " + gpu_name(meta))))
    return section

"""The ``calibration`` kind: a GPU run's points against the simulator and its host-link sweep."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from tiersim.report.html import Section
from tiersim.report.loaders import ReportInput, measured_on
from tiersim.report.style import _human_bytes, _layout

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
    # The graph executor's compressed check measures the same HBM share with part of the rest quantized: its own
    # series and hover, never drawn as a lossless point of that share.
    df["compressed"] = pd.to_numeric(df["compressed"], errors="coerce").fillna(0.0) if "compressed" in df else 0.0
    df["hbm_text"] = [f"{h:g}" + (f" + compressed {c:g}" if c else "") if h is not None and not pd.isna(h) else "n/a"
                      for h, c in zip(df["hbm"], df["compressed"])]
    df["stall_text"] = df["stall_ms"].map(lambda v: "n/a" if v is None or pd.isna(v) else f"{v:.2f} ms")
    df["overhead_text"] = df["overhead_pct"].map(lambda v: "n/a" if v is None or pd.isna(v) else f"{v:+.1f}%")
    custom_cols = ["model_shape", "batch", "context", "hbm_text", "error", "stall_text", "overhead_text"]
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
        for i, ((hbm, comp), group) in enumerate(df.groupby([df["hbm"].fillna(-1.0), df["compressed"]], sort=True)):
            fig.add_trace(go.Scatter(
                x=group["measured_step_ms"], y=group["simulated_step_ms"], mode="markers",
                name=(f"HBM share {hbm:.2f}" if hbm >= 0 else "HBM share unknown")
                + (f" + compressed {comp:.2f}" if comp else ""),
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



# --- the section ---------------------------------------------------------------------------------
def executor_line(meta) -> str:
    """What measured the steps (``executor``: HF eager harness, CUDA graph, its CPU smoke run) and how the DDR tier
    reached attention: a host-bound harness and a GPU-bound graph, or prefetch and hybrid, are not the same run."""
    executor = meta.get("executor") or "hf-eager"
    what = {"hf-eager": "HF eager generate over the TieredCache, a host-bound harness",
            "cuda-graph": "the decode step replayed as a CUDA graph, GPU-bound",
            "cuda-eager": "the graph executor's step run eagerly on CUDA, its capture having failed",
            "graph-eager": "the graph executor's step run eagerly on the CPU, the smoke mode"}.get(executor, executor)
    settings = meta.get("settings") or {}
    strategy = settings.get("strategy") or "prefetch"
    share = settings.get("fetch_share") if strategy == "hybrid" else None
    read = strategy + (f" (fetch share {share:g})" if share is not None else "")
    comp = settings.get("compressed")
    check = f"; compressed check at {comp:g} of the context" if comp else ""
    return f"Executor: {executor} ({what}); DDR tier read by {read}{check}."



def calibration_section(inp: ReportInput, key: str) -> Section:
    """The page section of one ``calibration`` file: the link, the simulator's error, its figures."""
    meta, points, sweep = inp.meta, inp.tables["points"], inp.tables["sweep"]
    device = inp.provenance()["gpu"]
    section = Section(key, f"Validation on {device}", inp.source)
    link = meta.get("link") or {}
    parts = [f"{name} {link[k]:.1f} GB/s" for name, k in (("H2D", "h2d_gbps"), ("D2H", "d2h_gbps"),
                                                         ("both ways", "bidir_total_gbps")) if link.get(k)]
    if link.get("copy_latency_us"):
        parts.append(f"{link['copy_latency_us']:.1f} µs per copy")
    if parts:
        section.summary.append("Host link: " + ", ".join(parts) + ".")
    section.summary.append(executor_line(meta))
    if not points.empty:
        paired = points.dropna(subset=["measured_step_ms", "simulated_step_ms"])
        if len(paired):
            err = (paired["simulated_step_ms"] / paired["measured_step_ms"] - 1.0) * 100.0
            where = "CPU (smoke mode)" if "CPU" in measured_on(inp.meta) else "GPU"
            section.summary.append(f"Simulator vs {where} over {len(paired)} points: median |error| "
                                   f"{err.abs().median():.1f}%, worst {err.iloc[err.abs().argmax()]:+.1f}%.")
        if "overhead_pct" in points and points["overhead_pct"].notna().any():
            ov = points["overhead_pct"].dropna()
            section.summary.append(f"Measured cost of GPU↔CPU movement: {ov.min():+.1f}% to {ov.max():+.1f}% "
                                   "step time vs all in HBM.")
        section.figures.append(("measured_vs_simulated", measured_vs_simulated(points, subtitle=device,
                                                                                 where=measured_on(inp.meta))))
    if not sweep.empty:
        section.figures.append(("link_sweep", link_sweep(sweep, link, subtitle=device)))
    if not section.figures:
        section.summary.append("This calibration file has neither validation points nor a link sweep to draw.")
    return section

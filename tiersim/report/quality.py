"""The ``quality-grid`` kind: exact match with the full cache over (eviction, HBM share), with baselines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tiersim.report.html import Section
from tiersim.report.loaders import ReportInput
from tiersim.report.style import BASELINE_COLORS, BASELINE_NAMES, _layout

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



# --- the section ---------------------------------------------------------------------------------

def quality_section(inp: ReportInput, key: str) -> Section:
    """The page section of one ``quality-grid`` file: exact match by eviction and by baseline, the heatmap."""
    meta, rows = inp.meta, inp.tables["rows"]
    prov = inp.provenance()
    section = Section(key, f"Output quality: {prov['model']} ({prov['trace']})", inp.source)
    hier = rows[rows["method"] == "hierarchy"]
    if not hier.empty:
        by_evict = hier.groupby("evict")["exact_match"].mean()
        section.summary.append("Hierarchy, exact match with the full cache (mean over HBM shares): "
                               + ", ".join(f"evict {e:g} → {v:.2f}" for e, v in by_evict.items()) + ".")
    bases = rows[rows["method"] != "hierarchy"]
    if not bases.empty:
        by_method = bases.groupby("method")["exact_match"].mean()
        section.summary.append("Eviction baselines at the same budgets (mean): " + ", ".join(
            f"{BASELINE_NAMES.get(m, m)} {v:.2f}" for m, v in by_method.items()) + ".")
    full = meta.get("full_cache") or {}
    accuracy = full.get("accuracy")
    if accuracy is None and "full_cache_accuracy" in rows:
        values = rows["full_cache_accuracy"].dropna()
        accuracy = float(values.iloc[0]) if len(values) else None
    if accuracy is not None:
        section.summary.append(f"Full-cache answer accuracy: {accuracy:.2f}.")
    section.figures.append(("quality_heatmap", quality_heatmap(rows, subtitle=f"{prov['model']}, {prov['trace']}")))
    return section

"""Which figures and key numbers each input kind gets, and ``write_report`` (the one entry point).

``simulate``, ``capacity`` and ``grid`` call :func:`write_report` for their ``--report`` flag with
their in-memory documents; ``tiersim report`` calls it with file paths. Both go through the same
loaders, so a report from a file and one from ``--report`` are the same page.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tiersim import fileformat
from tiersim.errors import TiersimError
from tiersim.report import figures
from tiersim.report.html import Section, figure_id, render_page
from tiersim.report.loaders import ReportInput, load_input, measured_on

HTML_SUFFIXES = (".html", ".htm")
KIND_TITLES = {"simulation": "Simulation", "capacity": "Capacity plan", "quality-grid": "Output quality",
               "calibration": "Validation"}


def write_report(inputs: Sequence[str | os.PathLike | Mapping], out_path: str | os.PathLike,
                 title: str | None = None) -> Path:
    """Read every input (path or producer dict), draw its figures, write one offline HTML page.

    Returns the path written. Raises :class:`TiersimError` (one line) on a bad input or path.
    """
    from tiersim.atomic import write_text

    out = Path(out_path)
    if out.suffix.lower() not in HTML_SUFFIXES:
        raise TiersimError(f"--out: the report is HTML, the file name must end in .html, got {str(out)!r}")
    if out.is_dir():
        raise TiersimError(f"--out: {out} is a directory")
    write_text(out, build_report(inputs, title))
    return out


def build_report(inputs: Sequence[str | os.PathLike | Mapping], title: str | None = None) -> str:
    """The HTML page as a string (no file written)."""
    if isinstance(inputs, (str, os.PathLike, Mapping)):
        inputs = [inputs]
    if not inputs:
        raise TiersimError("report: no inputs given (simulation, capacity, quality-grid or calibration files)")
    loaded = [load_input(item) for item in inputs]
    sections = [build_section(inp, f"s{i + 1}-{inp.kind}") for i, inp in enumerate(loaded)]
    provenance = [{"kind": inp.kind, "source": inp.source, **inp.provenance()} for inp in loaded]
    facts = {label: _unique(p[key] for p in provenance) for label, key in
             (("model", "model"), ("GPU", "gpu"), ("trace", "trace"), ("tiersim", "tiersim_version"))}
    from tiersim import __version__

    if title is None:
        single = len(facts["model"]) == 1 and len(facts["GPU"]) == 1 and "not recorded" not in facts["model"]
        title = f"tiersim report: {facts['model'][0]} on {facts['GPU'][0]}" if single else "tiersim report"
    meta = {
        **fileformat.header(fileformat.REPORT),
        "generator": f"tiersim {__version__}",
        "inputs": provenance,
        "figures": [figure_id(s.key, name) for s in sections for name, _ in s.figures],
    }
    return render_page(title, facts, provenance, sections, meta)


def _unique(values) -> list[str]:
    seen = list(dict.fromkeys(values))
    known = [v for v in seen if v != "not recorded"]
    return known or seen


def build_section(inp: ReportInput, key: str) -> Section:
    """Figures and key numbers for one input."""
    return BUILDERS[inp.kind](inp, key)


def _simulation(inp: ReportInput, key: str) -> Section:
    meta, timeline = inp.meta, inp.tables["timeline"]
    config = meta.get("config") or {}
    batch = meta.get("batch")
    label = figures.config_label(config) if {"hbm", "ddr", "evict"} <= set(config) else "unknown config"
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
    sub = f"{_model_name(meta)} on {_gpu_name(meta)}, {label}" + (f", batch {batch}" if batch else "")
    section.figures.append(("hbm_occupancy", figures.hbm_occupancy(timeline, full_cache_gb=_full_cache(meta, timeline),
                                                                   subtitle=sub)))
    section.figures.append(("pcie_traffic", figures.pcie_traffic(timeline, subtitle=sub)))
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


def _model_name(meta: dict) -> str:
    model = meta.get("model")
    return str(model.get("name", "model") if isinstance(model, Mapping) else model or "model")


def _gpu_name(meta: dict) -> str:
    gpu = meta.get("gpu")
    return str(gpu.get("name", "GPU") if isinstance(gpu, Mapping) else gpu or "GPU")


def _capacity(inp: ReportInput, key: str) -> Section:
    meta, rows, sweep = inp.meta, inp.tables["rows"], inp.tables["batch_sweep"]
    points = inp.tables.get("points", pd.DataFrame())
    grid_sub = None
    if "strategy" in rows and rows["batch"].nunique() > 1:  # a batch range: its rows are the planner's points
        rows = rows[rows["strategy"].isin(["none", "prefetch"]) & (rows["batch"] == rows["batch"].min())]
        grid_sub = f"prefetch at batch {int(rows['batch'].iloc[0])} (closed form)"
    budget = meta.get("max_overhead_pct")
    batch = meta.get("batch")
    batches = meta.get("batches") or []
    sub = f"{_model_name(meta)} on {_gpu_name(meta)}" + (
        f", batches {batches[0]}..{batches[-1]}" if len(batches) > 1 else f", batch {batch}" if batch else "")
    if meta.get("mean_length"):
        sub += f", ~{meta['mean_length']:.0f} generated tokens per sequence"
    section = Section(key, f"Capacity plan: {sub}", inp.source)
    if meta.get("recommendation"):
        section.summary.append(str(meta["recommendation"]))
    planner = meta.get("planner") or {}
    if not points.empty:
        slo = planner.get("tpot_slo_ms")
        section.figures.append(("throughput_frontier", figures.throughput_frontier(
            points, slo, planner.get("full_cache"), subtitle=sub + (f", TPOT budget {slo:g} ms" if slo else ""))))
    best = meta.get("best")
    budget_text = f"{budget:g}%" if budget is not None else "the budget"
    if best:
        section.summary.append(
            f"Best within {budget_text} overhead: {figures.config_label(best)} saves {best['hbm_saved_gb']:.1f} GB "
            f"of HBM at {best['overhead_pct']:+.1f}% step time"
            + (f" (largest batch {best['max_batch']})" if best.get("max_batch") else "") + ".")
    else:
        section.summary.append(f"No config saves HBM within {budget_text} overhead at this batch.")
    if meta.get("max_batch_full_cache"):
        section.summary.append(f"Largest batch with the whole KV cache in HBM: {meta['max_batch_full_cache']}.")
    section.figures.append(("capacity_frontier", figures.capacity_frontier(
        rows, budget, best, subtitle=sub + (f"; {grid_sub}" if grid_sub else ""))))
    if not sweep.empty:
        section.figures.append(("savings_vs_batch", figures.savings_vs_batch(sweep, budget, subtitle=_model_name(meta)
                                                                             + " on " + _gpu_name(meta))))
    return section


def _quality(inp: ReportInput, key: str) -> Section:
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
            f"{figures.BASELINE_NAMES.get(m, m)} {v:.2f}" for m, v in by_method.items()) + ".")
    full = meta.get("full_cache") or {}
    accuracy = full.get("accuracy")
    if accuracy is None and "full_cache_accuracy" in rows:
        values = rows["full_cache_accuracy"].dropna()
        accuracy = float(values.iloc[0]) if len(values) else None
    if accuracy is not None:
        section.summary.append(f"Full-cache answer accuracy: {accuracy:.2f}.")
    section.figures.append(("quality_heatmap", figures.quality_heatmap(rows, subtitle=f"{prov['model']}, {prov['trace']}")))
    return section


def _calibration(inp: ReportInput, key: str) -> Section:
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
        section.figures.append(("measured_vs_simulated", figures.measured_vs_simulated(points, subtitle=device,
                                                                                         where=measured_on(inp.meta))))
    if not sweep.empty:
        section.figures.append(("link_sweep", figures.link_sweep(sweep, link, subtitle=device)))
    if not section.figures:
        section.summary.append("This calibration file has neither validation points nor a link sweep to draw.")
    return section


BUILDERS: dict[str, Callable[[ReportInput, str], Section]] = {
    "simulation": _simulation, "capacity": _capacity, "quality-grid": _quality, "calibration": _calibration,
}

# Which figures each kind yields when its optional tables are present (tests and docs use it).
FIGURES_BY_KIND = {
    "simulation": ("hbm_occupancy", "pcie_traffic"),
    "capacity": ("throughput_frontier", "capacity_frontier", "savings_vs_batch"),
    "quality-grid": ("quality_heatmap",),
    "calibration": ("measured_vs_simulated", "link_sweep"),
}

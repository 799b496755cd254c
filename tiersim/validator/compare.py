"""Measured versus simulated, side by side: the rows and a plain-text rendering.

The rows are plain data so that ``tiersim validate --compare`` can draw them with rich and
``python -m tiersim.validator --compare`` (on a machine without rich) as aligned text.
"""

from __future__ import annotations

from pathlib import Path

COLUMNS = ("shape", "batch", "context", "hbm", "measured ms", "simulated ms", "error %",
           "baseline ms", "overhead %", "stall ms", "sim stall ms", "H2D MB/step", "prefetch GB/s")


def load(path: str | Path) -> dict:
    """A calibration document, refused with one clear line when it is not one."""
    from tiersim.errors import TiersimError
    from tiersim.simulator.calibration import load_calibration

    doc = load_calibration(path, label="--compare")
    if not isinstance(doc.get("points"), list):
        raise TiersimError(f"--compare: {path} has no 'points' list")
    return doc


def _missing(value) -> bool:
    """Not measured: absent, or NaN (a CPU smoke run has no stalls or copies to time)."""
    return value is None or (isinstance(value, float) and value != value)


def _num(value, digits: int) -> str:
    return "-" if _missing(value) else f"{value:.{digits}f}"


def _pct(value, digits: int = 1) -> str:
    """A percentage in a sentence: ``12.3%``, or ``not measured`` (never ``-%``)."""
    return "not measured" if _missing(value) else f"{value:.{digits}f}%"


def _signed(value, digits: int = 1) -> str:
    return "-" if _missing(value) else f"{value:+.{digits}f}"


def rows(doc: dict) -> list[list[str]]:
    """One row of strings per measured point, in ``COLUMNS`` order."""
    from tiersim.hierarchy.strategies import point_words

    out = []
    for p in doc["points"]:
        h2d = p.get("h2d_bytes")
        words = point_words(p.get("strategy"), p.get("fetch_share"))  # a strategy's point: 'hybrid fetch 0.5'
        out.append([
            str(p.get("model_shape", "")),
            str(p["batch"]),
            str(p["context"]),
            f"{p['hbm']:g}" + (f" +c{p['compressed']:g}" if p.get("compressed") else "")  # the compressed check
            + (f" {words}" if words else ""),
            _num(p.get("measured_step_ms"), 3),
            _num(p.get("simulated_step_ms"), 3),
            _signed(p.get("sim_error_pct")),
            _num(p.get("baseline_step_ms"), 3),
            _signed(p.get("overhead_pct")),
            _num(p.get("stall_ms"), 3),
            _num(p.get("simulated_stall_ms"), 3),
            _num(None if h2d is None else h2d / 1e6, 3),
            _num(p.get("prefetch_gbps"), 1),
        ])
    return out


def summary_lines(doc: dict) -> list[str]:
    """The device, the link and compute calibration, and the errors against the issue's targets."""
    dev = doc.get("device") or {}
    link = doc.get("link") or {}
    comp = doc.get("compute") or {}
    s = doc.get("summary") or {}
    lines = [
        f"device: {dev.get('name')} | torch {dev.get('torch')} | CUDA {dev.get('cuda')} | driver {dev.get('driver')}"
        f" | executor {doc.get('executor') or 'hf-eager'}",
        f"link: H2D {_num(link.get('h2d_gbps'), 1)} GB/s, D2H {_num(link.get('d2h_gbps'), 1)} GB/s, "
        f"both {_num(link.get('bidir_total_gbps'), 1)} GB/s, per-copy latency {_num(link.get('copy_latency_us'), 2)} us",
        f"compute: HBM {_num(comp.get('hbm_bw_gbps'), 1)} GB/s (decode fit), matmul {_num(comp.get('peak_tflops'), 1)} "
        f"TFLOP/s, layer overhead {_num(comp.get('layer_overhead_us'), 1)} us",
    ]
    strategy = (doc.get("settings") or {}).get("strategy")
    if strategy not in (None, "prefetch"):  # the graph executor's host strategies: where the stall comes from
        host = [(p["batch"], p["context"], p["hbm"], p["host_ms"]) for p in doc["points"]
                if not _missing(p.get("host_ms"))]
        share = (doc.get("settings") or {}).get("fetch_share")
        lines.append(f"strategy {strategy}" + (f" (fetch share {share:g})" if share is not None else "") + ": "
                     + ("; ".join(f"host {ms:.3f} ms at batch {b}, context {c}, hbm {h:g}" for b, c, h, ms in host)
                        or "no host part measured"))
    checked = (doc.get("settings") or {}).get("strategy_check") or []
    if checked:  # the strategy check's points: what to quote of them, and whether their segmented capture ran
        lines.append("strategy check: " + ("; ".join(_check_words(p) for p in doc["points"]
                                                     if p.get("strategy") in checked) or "no point measured"))
    if doc.get("error"):  # a run stopped by an error or its timeout: the points are the ones measured before it
        lines.append(f"stopped: {doc['error']}")
    if s:
        share = s.get("prefetch_share_of_peak_h2d")
        lines.append(
            f"simulator error: median |err| {_pct(s.get('median_abs_sim_error_pct'))} "
            f"(target < 10%), max {_pct(s.get('max_abs_sim_error_pct'))}; "
            f"max transfer overhead {_pct(s.get('max_overhead_pct'))}; "
            + ("prefetch: not measured (no copies in this grid)" if _missing(share) else
               f"prefetch reaches {100 * share:.0f}% of peak H2D (target >= 85%)")
        )
    return lines


def _check_words(p: dict) -> str:
    """One strategy-check point in a sentence: its host time and stall, and how it ran (``cuda-graph``: the
    segmented capture replayed; ``cuda-eager``: its capture failed, and why; ``failed``: the point's error)."""
    from tiersim.hierarchy.strategies import point_words

    where = f"{point_words(p.get('strategy'), p.get('fetch_share'))} at batch {p['batch']}, context {p['context']}, " \
            f"hbm {p['hbm']:g}"
    if _missing(p.get("measured_step_ms")):
        return f"{where}: {p.get('error') or 'not measured'}"
    why = p.get("capture_error")
    return (f"{where}: host {_num(p.get('host_ms'), 3)} ms, stall {_num(p.get('stall_ms'), 3)} ms, executor "
            f"{p.get('executor') or '-'}" + (f" (not captured: {why[:120]})" if why else ""))


def format_text(doc: dict) -> str:
    """An aligned plain-text table plus the summary lines."""
    table = [list(COLUMNS)] + rows(doc)
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    text = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in table]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text + [""] + summary_lines(doc))

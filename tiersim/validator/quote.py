"""``python -m tiersim.validator.quote GRAPH.json [AGAINST.txt]``: the figures issue 23 asks a GPU run to quote.

The GPU script's last lines: whoever reads the device's output tail (12,000 characters, nothing else for sure)
gets the numbers without opening a file. Standard library only, and every figure optional: it runs on a
partial file (a grid stopped by its timeout, a checkpoint), on a file without its ``--against`` log, and on a
file whose points failed, saying what is missing instead of failing. The last line is the median |error| of
``simulate --against`` when its log has one (else ``median |error|: not measured``), as the script always ended.

Figures (docs/validation/README.md, "What to quote"): the calibrated simulator's median |error| (``--against``
re-predicts with today's physics; the file's own summary was predicted at validation time), the overhead at
HBM 0.5 / batch 1 / 2K (the grid's first batch and context; target <= 3%), the prefetch rate against the sweep's
peak H2D (target >= 85%), the link-bound points' stall next to the simulated stall (the largest context at the
smallest HBM ratio), the copy-free step at HBM 1.0 per batch and context (the GPU's own time), the host
strategies' check points, and every point that was not replayed from a graph or not measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(value, fmt: str = ".3f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{unit}"


def _point(p: dict) -> str:
    return f"batch {p['batch']} x {p['context']} at HBM {p['hbm']:g}"


def median_line(against: str | None) -> str:
    """The ``--against`` log's median |error| line (its last of that kind), or ``median |error|: not measured``."""
    lines = (against or "").strip().splitlines()
    return next((line for line in reversed(lines) if line.startswith("median |error|")), "median |error|: not measured")


def quote_lines(doc: dict, against: str | None = None) -> list[str]:
    """The quoted figures of a calibration file (the graph executor's), one per line."""
    points = doc.get("points") or []
    measured = [p for p in points if p.get("measured_step_ms") is not None]
    summary = doc.get("summary") or {}
    lines = [f"quote: {doc.get('executor', '?')} on {(doc.get('device') or {}).get('name', '?')}, "
             f"{len(measured)} of {len(points)} points measured"
             + (f"; the file says: {doc['error']}" if doc.get("error") else "")]
    lossless = [p for p in measured if p.get("strategy", "prefetch") == "prefetch" and not p.get("compressed")]
    if lossless:
        b, c = min(p["batch"] for p in lossless), min(p["context"] for p in lossless)
        offloaded = sorted({p["hbm"] for p in lossless if p["hbm"] < 1.0 and p["batch"] == b and p["context"] == c})
        h = 0.5 if 0.5 in offloaded else (offloaded[-1] if offloaded else None)
        head = next((p for p in lossless if (p["batch"], p["context"], p["hbm"]) == (b, c, h)), None)
        if head:
            lines.append(f"overhead at {_point(head)}: {_f(head.get('overhead_pct'), '+.2f', '%')} "
                         f"(step {_f(head['measured_step_ms'])} ms vs HBM 1.0 {_f(head.get('baseline_step_ms'))} ms, "
                         f"stall {_f(head.get('stall_ms'))} ms; target <= 3%, the paper 5-7%)")
        else:
            lines.append(f"overhead at batch {b} x {c}: no offloaded point measured")
    else:
        lines.append("overhead: no lossless prefetch point measured")
    peak = (((doc.get("link") or {}).get("fit") or {}).get("h2d") or {}).get("peak_gbps")
    share = summary.get("prefetch_share_of_peak_h2d")
    lines.append(f"prefetch: best {_f(summary.get('prefetch_gbps_max'), '.1f')} GB/s of the sweep's peak H2D "
                 f"{_f(peak, '.1f')} GB/s = {_f(None if share is None else 100 * share, '.0f', '%')} (target >= 85%)")
    if lossless:
        low, top = min(p["hbm"] for p in lossless), max(p["context"] for p in lossless)
        for p in sorted((p for p in lossless if p["hbm"] == low and p["context"] == top and low < 1.0),
                        key=lambda p: p["batch"]):
            lines.append(f"link-bound {_point(p)}: stall {_f(p.get('stall_ms'))} ms, simulated "
                         f"{_f(p.get('simulated_stall_ms'))} ms (step {_f(p['measured_step_ms'])} ms, simulated "
                         f"{_f(p.get('simulated_step_ms'))} ms, error {_f(p.get('sim_error_pct'), '+.1f', '%')})")
        busy = [f"{p['batch']}x{p['context']} {_f(p.get('gpu_busy_ms'))}" for p in lossless
                if p["hbm"] == 1.0 and p.get("gpu_busy_ms") is not None]
        if busy:
            lines.append("copy-free step at HBM 1.0 (ms, batch x context): " + ", ".join(busy))
    for p in points:
        if p.get("strategy", "prefetch") != "prefetch":
            share_text = f" fetch {p.get('fetch_share'):g}" if p.get("strategy") == "hybrid" else ""
            if p.get("measured_step_ms") is None:
                lines.append(f"strategy check {p['strategy']}{share_text} at {_point(p)}: {p.get('error') or 'n/a'}")
                continue
            lines.append(f"strategy check {p['strategy']}{share_text} at {_point(p)}: overhead "
                         f"{_f(p.get('overhead_pct'), '+.1f', '%')}, host {_f(p.get('host_ms'))} ms, stall "
                         f"{_f(p.get('stall_ms'))} ms, error {_f(p.get('sim_error_pct'), '+.1f', '%')}, "
                         f"executor {p.get('executor')}")
    eager = [p for p in measured if p.get("executor") == "cuda-eager"]
    for p in eager:
        lines.append(f"not captured: {_point(p)} {p.get('strategy', 'prefetch')}: {p.get('capture_error')}")
    missing = [p for p in points if p.get("measured_step_ms") is None]
    if missing:
        reasons = sorted({str(p.get("error")) for p in missing})
        lines.append(f"not measured: {len(missing)} points ({'; '.join(reasons)[:300]})")
    lines.append(f"the file's own median |error| (predicted at validation time): "
                 f"{_f(summary.get('median_abs_sim_error_pct'), '.1f', '%')}")
    lines.append(median_line(against))
    return lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m tiersim.validator.quote GRAPH.json [AGAINST.txt]", file=sys.stderr)
        return 2
    against = None
    if len(args) == 2 and Path(args[1]).is_file():
        against = Path(args[1]).read_text(errors="replace")
    try:
        doc = json.loads(Path(args[0]).read_text())
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        print(f"quote: no figures: {args[0]}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")
        print(median_line(against))
        return 1
    try:
        lines = quote_lines(doc, against)
    except Exception as exc:  # noqa: BLE001 - a malformed field must not hide the median line the script ends on
        lines = [f"quote: the figures failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}",
                 median_line(against)]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

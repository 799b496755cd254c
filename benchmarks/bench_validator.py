"""The validator's targets (issue #5) as a benchmark section in docs/benchmarks.md.

With a calibration file (from `bash scripts/gpu_validate.sh`), report its numbers against the targets:
transfer overhead at hbm 0.5 / batch 1 / 2K <= 5-7% (aim < 3%), prefetch >= 85% of peak H2D, median
simulator error < 10% (aim 5%). Without one, run the validator: the full grid on CUDA, or the CPU smoke
mode on the tiny shape (then the section only records that the code path runs and how long it takes).
Run: python benchmarks/bench_validator.py [--calibration docs/validation/<gpu>.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _table import markdown_table, write_section


def _fmt(value, digits=1, suffix=""):
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from tiersim.validator import calibrate, compare

    elapsed = None
    if args.calibration:
        doc, source = compare.load(args.calibration), f"`{args.calibration}`"
        command = f"python benchmarks/bench_validator.py --calibration {args.calibration}"
    else:
        cuda = torch.cuda.is_available()
        grid = ({} if cuda else dict(shape_name="tiny", batches=[1, 2], contexts=[96, 160], hbms=[1.0, 0.5],
                                      steps=4, warmup=1, sweep_sizes=(4096, 1 << 16, 1 << 20)))
        start = time.perf_counter()
        doc = calibrate.run_validation(device="cuda" if cuda else "cpu", **grid)
        elapsed = time.perf_counter() - start
        source = "a fresh run" + ("" if cuda else " in CPU smoke mode (tiny shape)")
        command = "python benchmarks/bench_validator.py"

    print(compare.format_text(doc))
    gpu = doc["device"]["name"]
    head = next((p for p in doc["points"] if (p["batch"], p["context"], p["hbm"]) == (1, 2048, 0.5)), None)
    s = doc["summary"]
    share = s.get("prefetch_share_of_peak_h2d")
    rows = [
        ["transfer overhead, hbm 0.5 / batch 1 / 2K", "≤ 5–7% (aim < 3%)",
         _fmt(head["overhead_pct"] if head else None, 1, "%")],
        ["prefetch rate / peak H2D", "≥ 85%", _fmt(None if share is None else 100 * share, 0, "%")],
        ["median abs simulator error", "< 10% (aim 5%)", _fmt(s.get("median_abs_sim_error_pct"), 1, "%")],
        ["max overhead over the grid", "—", _fmt(s.get("max_overhead_pct"), 1, "%")],
    ]
    body = [f"Source: {source}; device: {gpu}; {len(doc['points'])} points."]
    if doc["device"].get("cuda") is None:
        body.append("**No GPU in this run: CPU smoke mode. It shows only that the code path runs "
                    f"({_fmt(elapsed, 1)} s end to end); the GPU numbers are still owed "
                    "(`bash scripts/gpu_validate.sh`, see docs/validation/README.md).**")
    elif elapsed is not None:
        body.append(f"End to end {elapsed:.0f} s.")
    body.append(markdown_table(["target", "goal", "measured"], rows))
    write_section("GPU validation (issue #5)", command, "\n\n".join(body))


if __name__ == "__main__":
    main()

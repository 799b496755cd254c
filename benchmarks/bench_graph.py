"""The graph executor's targets (issue 23) as a benchmark section in docs/benchmarks.md.

With a graph calibration file (``<gpu>-graph.json`` from ``bash scripts/gpu_validate.sh``): the calibrated
simulator's median |error| (<= 5%, goal 2%), the overhead at HBM 0.5 / batch 1 / 2K (<= 3%), the prefetch
rate against peak H2D (>= 85%), the link-bound points' stall against the simulator's, and the strategy
check's (host attention, hybrid) and the compressed check's overhead and simulator error. Without one: the
script's DRY_RUN=1 mode (every step on the CPU at tiny sizes), timed against its 30 s target.
Run: python benchmarks/bench_graph.py [--calibration docs/validation/<gpu>-graph.json]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

from _table import markdown_table, write_section

REPO = Path(__file__).resolve().parent.parent


def _fmt(value, digits=1, suffix=""):
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def _from_file(path: Path) -> str:
    from tiersim.hierarchy.strategies import point_words
    from tiersim.validator import compare

    doc = compare.load(path)
    points, s = doc["points"], doc["summary"]
    prefetch = [p for p in points if p.get("strategy") in (None, "prefetch")]
    lossless = [p for p in prefetch if not p.get("compressed")]
    strategies = [p for p in points if p.get("strategy") not in (None, "prefetch")]
    head = next((p for p in lossless if (p["batch"], p["context"], p["hbm"]) == (1, 2048, 0.5)), None)
    checks = [p for p in prefetch if p.get("compressed")]
    share = s.get("prefetch_share_of_peak_h2d")
    rows = [
        ["median abs simulator error (calibrated closed form)", "≤ 5% (goal 2%)",
         _fmt(s.get("median_abs_sim_error_pct"), 1, "%")],
        ["overhead, HBM 0.5 / batch 1 / 2K", "≤ 3%", _fmt(head["overhead_pct"] if head else None, 1, "%")],
        ["prefetch rate / peak H2D", "≥ 85%", _fmt(None if share is None else 100 * share, 0, "%")],
    ]
    bound = sorted((p for p in lossless if p["hbm"] == 0.25 and p.get("stall_ms")), key=lambda p: -p["stall_ms"])[:3]
    rows += [[f"stall, batch {p['batch']} / {p['context']} / HBM 0.25", "simulated "
              + _fmt(p.get("simulated_stall_ms"), 2, " ms"), _fmt(p["stall_ms"], 2, " ms")] for p in bound]
    rows += [[point_words(p["strategy"], p.get("fetch_share"))  # every point has a share: hybrid's is shown
              + f", HBM {p['hbm']:g} / batch {p['batch']} / {p['context']}: overhead (simulator's error), host ms", "—",
              f"{_fmt(p.get('overhead_pct'), 1, '%')} ({_fmt(p.get('sim_error_pct'), 1, '%')}), "
              f"{_fmt(p.get('host_ms'), 2, ' ms')}"] for p in strategies]
    rows += [[f"compressed check, HBM {p['hbm']:g} + compressed {p['compressed']:g} / batch {p['batch']} / "
              f"{p['context']}: overhead (simulator's error)", "—",
              f"{_fmt(p.get('overhead_pct'), 1, '%')} ({_fmt(p.get('sim_error_pct'), 1, '%')})"] for p in checks]
    return (f"Source: `{path}`; executor {doc.get('executor') or 'hf-eager'}; device {doc['device']['name']}; "
            f"{len(points)} points.\n\n" + markdown_table(["target", "wanted", "measured"], rows))


def _dry_run() -> str:
    with tempfile.TemporaryDirectory() as dest:
        env = {**os.environ, "DRY_RUN": "1", "DEST": dest, "OUT": ""}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_validate.sh")], capture_output=True, text=True,
                              env=env)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    rows = [["DRY_RUN=1 bash scripts/gpu_validate.sh, wall", "< 30 s", f"{wall:.1f} s"],
            ["the same, CPU time of all its processes", "—", f"{cpu:.1f} s"],
            ["exit status", "0", str(proc.returncode)],
            ["its last line", "the median abs error", "`" + last.replace("|", "\\|") + "`"]]
    return ("**No GPU in this run**: the graph executor's numbers are owed (docs/validation/README.md says what "
            "to run and quote). The dry run proves every step of the GPU script runs, in order.\n\n"
            + markdown_table(["what", "target", "measured"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=Path, default=None)
    args = parser.parse_args()
    body = _from_file(args.calibration) if args.calibration else _dry_run()
    print(body)
    command = "python benchmarks/bench_graph.py" + (f" --calibration {args.calibration}" if args.calibration else "")
    write_section("Graph executor (issue 23)", command, body)


if __name__ == "__main__":
    main()

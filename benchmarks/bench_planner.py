"""Planner speed: `tiersim capacity --batch 16..1024 --tpot-slo 50` end to end (every split x strategy
x batch of the range) and the default `tiersim capacity --batch 64`.

Target (issue #13): the range run finishes in under 10 s on a 2-core machine.
Run: python benchmarks/bench_planner.py [--repeats 3]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from _table import markdown_table, write_section

RUNS = [
    ["capacity", "--batch", "16..1024", "--tpot-slo", "50"],
    ["capacity", "--batch", "16..1024", "--tpot-slo", "50", "--model", "qwq-32b", "--lengths", "aime", "--gpu", "h200"],
    ["capacity", "--batch", "64"],
]


def seconds(args: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tiersim", *args], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    repeats = int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else 3
    rows = []
    for args in RUNS:
        times = seconds(args, repeats)
        rows.append([f"`tiersim {' '.join(args)}`", f"{statistics.median(times):.2f}", f"{max(times):.2f}"])
    body = (f"Load average {os.getloadavg()[0]:.1f} at the end; median and worst of {repeats} runs, end to end "
            "(interpreter start-up, trace fit, every point). A range runs the closed form only; one batch adds the "
            "SimPy grid (13 configs) and the largest-batch search per config.\n\n"
            + markdown_table(["command", "median s", "worst s"], rows) + "\n")
    print(body)
    write_section("Planner speed", "python benchmarks/bench_planner.py", body)


if __name__ == "__main__":
    main()

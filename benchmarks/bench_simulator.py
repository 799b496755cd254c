"""Simulator speed: the fast path against SimPy, `tiersim capacity --batch 64` and a 16K-step
`tiersim simulate`, end to end, with their real-time factors.

Targets (issue #16): >= 1000x real time (simulated GPU seconds per wall second of the whole command) for a
link-bound batch-64 run of 16,384 steps; `tiersim capacity --batch 64` < 5 s; the fast path within 0.5% of
SimPy. Prints a markdown section and rewrites it in docs/benchmarks.md.
Run: python benchmarks/bench_simulator.py [--quick]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from _table import markdown_table, write_section
from tiersim.hierarchy.config import TierConfig
from tiersim.simulator import analytic, fastpath
from tiersim.simulator.engine import simulate
from tiersim.simulator.presets import get_gpu, get_model


def engine_run(model_name: str, batch: int, steps: int, mean_length: float):
    """SimPy vs the fast path on one run: (SimPy s, events, fast s, mean step error %, p99 error %, engine auto picks)."""
    model, gpu = get_model(model_name), get_gpu("h100-sxm")
    policy = analytic.Offload(TierConfig(0.5, 0.5, 0.0, 0.0))
    rng = np.random.default_rng(0)
    work = analytic.build_workload(policy, batch, analytic.sample_lengths(batch, mean_length, 0.35, rng), 128, steps,
                                   churn=(0.02, 0.0))
    costs = analytic.layer_costs(model, gpu, policy, work)
    start = time.perf_counter()
    ref = simulate(costs, model.num_layers, gpu)
    simpy_s = time.perf_counter() - start
    start = time.perf_counter()
    fast = fastpath.recurrence(costs, model.num_layers, gpu)
    fast_s = time.perf_counter() - start
    mean_err = 100 * (fast.step_time.mean() / ref.step_time.mean() - 1)
    p99_err = 100 * (np.percentile(fast.step_time, 99) / np.percentile(ref.step_time, 99) - 1)
    return simpy_s, ref.events, fast_s, mean_err, p99_err, fastpath.simulate(costs, model.num_layers, gpu).engine


def command_seconds(args: list[str], repeats: int) -> tuple[list[float], str]:
    """Wall seconds of the whole command (interpreter start-up included), and its last stdout."""
    times, out = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "tiersim", *args], check=True, capture_output=True, text=True).stdout
        times.append(time.perf_counter() - start)
    return times, out


LONG_RUN = ["simulate", "--batch", "64", "--hbm", "0.5", "--ddr", "0.5", "--steps", "16384", "--format", "json"]


def main() -> None:
    quick = "--quick" in sys.argv
    repeats = 1 if quick else 3
    rows = []
    times, _ = command_seconds(["capacity", "--batch", "64"], repeats)
    rows.append(["`tiersim capacity --batch 64` (13 configs x 256 steps, batch sweep, planner)", "—",
                 f"{statistics.median(times):.2f}", "—", "< 5 s"])
    times, out = command_seconds(LONG_RUN, repeats)
    result = json.loads(out)
    simulated = (result["rows"][0]["step_ms"] + result["baseline"]["step_ms"]) * 16384 / 1e3
    wall = statistics.median(times)
    rows.append([f"`tiersim {' '.join(LONG_RUN[:-2])}` (the config and its baseline, {simulated:,.0f} simulated GPU s)",
                 result["rows"][0]["method"], f"{wall:.2f}", f"{simulated / wall:,.0f}x", ">= 1000x"])
    body = (
        f"Load average {os.getloadavg()[0]:.1f} at the end. Commands: median of {repeats}, wall time of the whole "
        "process (interpreter start-up and imports included).\n\n"
        + markdown_table(["command", "engine", "seconds", "real-time factor", "target"], rows) + "\n\n"
    )
    runs = [("r1-distill-qwen-7b", 1, 2048), ("r1-distill-qwen-7b", 64, 2048), ("r1-distill-qwen-7b", 1024, 2048),
            ("qwq-32b", 64, 4096)]
    if not quick:
        runs.append(("qwq-32b", 64, 16384))
    engine_rows = []
    for model, batch, steps in runs:
        simpy_s, events, fast_s, mean_err, p99_err, auto = engine_run(model, batch, steps,
                                                                       16384 if steps == 16384 else 4096)
        layers = get_model(model).num_layers
        engine_rows.append([f"{model} ({layers} layers), batch {batch}, {steps:,} steps", f"{events:,}",
                            f"{simpy_s:.2f}", f"{fast_s * 1e3:.1f}", f"{simpy_s / fast_s:,.0f}x",
                            f"{mean_err:+.3f}% / {p99_err:+.3f}%", auto])
    body += (
        "Engines on one run each (hbm 0.5 / ddr 0.5 on h100-sxm, staggered batch, MATH-500-like lengths; 16K for "
        "the 16K-step run): the SimPy event model (the reference) and the fast path's per-step recurrence "
        "(`tiersim.simulator.fastpath`), its error against SimPy on the mean and p99 step time, and which one "
        "`--engine auto` runs (SimPy only where demotions could move the result by more than 0.1%).\n\n"
        + markdown_table(["run", "SimPy events", "SimPy s", "fast path ms", "speed-up", "error mean / p99",
                          "auto"], engine_rows)
        + "\n"
    )
    print(body)
    write_section("Simulator speed", "python benchmarks/bench_simulator.py", body)


if __name__ == "__main__":
    main()

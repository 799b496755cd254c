"""Simulator speed: `tiersim capacity --batch 64` end to end, events/s, and a 64-layer x 16K-step run.

Targets (issue #4): capacity in under 10 s on a 2-core machine; cost independent of batch size and
linear in steps x layers. Prints a markdown section and rewrites it in docs/benchmarks.md.
Run: python benchmarks/bench_simulator.py [--quick]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np

from _table import markdown_table, write_section
from tiersim.hierarchy.config import TierConfig
from tiersim.simulator import analytic
from tiersim.simulator.engine import simulate
from tiersim.simulator.presets import get_gpu, get_model


def engine_run(model_name: str, batch: int, steps: int, mean_length: float, contention: bool = True):
    """(wall seconds, events, closed-form step error % without contention or None)."""
    model, gpu = get_model(model_name), get_gpu("h100-sxm")
    if not contention:
        gpu = replace(gpu, bidir_bw=gpu.h2d_bw + gpu.d2h_bw)
    policy = analytic.Offload(TierConfig(0.5, 0.5, 0.0, 0.0))
    rng = np.random.default_rng(0)
    work = analytic.build_workload(policy, batch, analytic.sample_lengths(batch, mean_length, 0.35, rng), 128, steps,
                                   churn=(0.02, 0.0))
    costs = analytic.layer_costs(model, gpu, policy, work)
    start = time.perf_counter()
    result = simulate(costs, model.num_layers, gpu)
    seconds = time.perf_counter() - start
    step, _ = analytic.closed_form(costs, model.num_layers)
    error = 100 * (result.step_time[1:].sum() / step[1:].sum() - 1)
    return seconds, result.events, error


def capacity_seconds(repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tiersim", "capacity", "--batch", "64"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    quick = "--quick" in sys.argv
    times = capacity_seconds(1 if quick else 3)
    rows = [["`tiersim capacity --batch 64` (end to end: start-up, trace, 13 configs × 256 steps + batch sweep)",
             "—", "—", f"{statistics.median(times):.2f} (median of {len(times)})", "—", "—"]]
    runs = [("r1-distill-qwen-7b", 1, 2048), ("r1-distill-qwen-7b", 64, 2048), ("r1-distill-qwen-7b", 1024, 2048),
            ("qwq-32b", 64, 4096)]
    if not quick:
        runs.append(("qwq-32b", 64, 16384))
    for model, batch, steps in runs:
        seconds, events, _ = engine_run(model, batch, steps, 16384 if steps == 16384 else 4096)
        _, _, error = engine_run(model, batch, min(steps, 512), 4096, contention=False)
        layers = get_model(model).num_layers
        rows.append([f"engine: {model} ({layers} layers), batch {batch}, {steps:,} steps", f"{events:,}",
                     f"{events / seconds:,.0f}", f"{seconds:.2f}", f"{seconds / (steps * layers) * 1e6:.1f}",
                     f"{error:+.3f}%"])
    load = os.getloadavg()[0]
    body = (
        f"Load average {load:.1f} at the end. "
        "hbm 0.5 / ddr 0.5 on h100-sxm, staggered batch (MATH-500-like lengths; 16K for the 16K-step run). "
        "Events are SimPy events scheduled. The batch is aggregated per layer, so events per layer-step are "
        "bounded (≤ 8: prefetch call + link, demotion call + link, compute) and flat once some slot re-tiers at "
        "every step (batch ≥ re-tier interval); batch 1 demotes only every 16th step. Closed-form error: the "
        "SimPy run against `L · max(compute, copy)` per step with the shared ceiling lifted (no contention), "
        "first 512 steps.\n\n"
        + markdown_table(["run", "events", "events/s", "seconds", "µs per layer-step", "vs closed form"], rows)
        + "\n"
    )
    print(body)
    write_section("Simulator speed", "python benchmarks/bench_simulator.py", body)


if __name__ == "__main__":
    main()

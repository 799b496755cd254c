"""Simulator speed: `tiersim capacity --batch 64` end to end, events/s, and a 64-layer x 16K-step run.

Targets (issue #4): capacity in under 10 s on a 2-core machine; cost independent of batch size and
linear in steps x layers. Run: python benchmarks/bench_simulator.py
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from _table import markdown_table, write_section  # noqa: E402
from tiersim.simulator import analytic  # noqa: E402
from tiersim.simulator.engine import simulate  # noqa: E402
from tiersim.simulator.presets import get_gpu, get_model  # noqa: E402


def engine_run(model_name: str, batch: int, steps: int, mean_length: float):
    model, gpu = get_model(model_name), get_gpu("h100-sxm")
    policy = analytic.Policy(0.5, 0.5, 0.0, 0.0)
    rng = np.random.default_rng(0)
    work = analytic.build_workload(policy, batch, analytic.sample_lengths(batch, mean_length, 0.35, rng), 128, steps,
                                   churn=(0.02, 0.0))
    costs = analytic.layer_costs(model, gpu, policy, work)
    start = time.perf_counter()
    result = simulate(costs, model.num_layers, gpu)
    seconds = time.perf_counter() - start
    return seconds, result.events


def main() -> None:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tiersim", "capacity", "--batch", "64"], check=True, capture_output=True)
    capacity_s = time.perf_counter() - start
    rows = [["`tiersim capacity --batch 64` (end to end, 13 configs + batch sweep)", "—", "—", f"{capacity_s:.2f}", "—"]]
    for model, batch, steps in (("r1-distill-qwen-7b", 1, 2048), ("r1-distill-qwen-7b", 64, 2048),
                                ("r1-distill-qwen-7b", 1024, 2048), ("qwq-32b", 64, 4096), ("qwq-32b", 64, 16384)):
        seconds, events = engine_run(model, batch, steps, 16384 if steps == 16384 else 4096)
        layers = get_model(model).num_layers
        rows.append([f"engine: {model} ({layers} layers), batch {batch}, {steps:,} steps", f"{events:,}",
                     f"{events / seconds:,.0f}", f"{seconds:.2f}", f"{seconds / (steps * layers) * 1e6:.1f}"])
    body = (
        "hbm 0.5 / ddr 0.5 on h100-sxm. Events are SimPy events scheduled; the per-layer-step cost is flat across "
        "batch sizes (the batch is aggregated per layer) and steps × layers.\n\n"
        + markdown_table(["run", "events", "events/s", "seconds", "µs per layer-step"], rows)
    )
    print(body)
    write_section("Simulator speed", "python benchmarks/bench_simulator.py", body)


if __name__ == "__main__":
    main()

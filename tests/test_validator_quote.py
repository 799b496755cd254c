"""``python -m tiersim.validator.quote``: the figures the GPU script prints last, from whatever file the grid left."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _doc(**extra) -> dict:
    def point(batch, context, hbm, step, strategy="prefetch", **kw):
        return {"batch": batch, "context": context, "hbm": hbm, "measured_step_ms": step, "baseline_step_ms": 10.0,
                "overhead_pct": None if hbm == 1.0 else 100 * (step / 10.0 - 1), "stall_ms": 0.5,
                "simulated_step_ms": 11.0, "simulated_stall_ms": 0.4, "sim_error_pct": 100 * (11.0 / step - 1),
                "gpu_busy_ms": 9.5, "strategy": strategy, "compressed": 0.0, "executor": "cuda-graph", **kw}

    points = [point(1, 2048, 1.0, 10.0), point(1, 2048, 0.5, 10.2), point(1, 2048, 0.5, 12.0, "host-attention",
                                                                           host_ms=1.5),
              point(1, 2048, 0.25, 10.4, executor="cuda-eager", capture_error="RuntimeError: capture"),
              point(8, 8192, 0.25, 40.0), point(32, 8192, 0.25, 90.0),
              {"batch": 64, "context": 8192, "hbm": 0.25, "measured_step_ms": None,
               "error": "skipped: time budget of 120 s spent"}]
    return {"executor": "cuda-graph", "device": {"name": "NVIDIA H200"}, "points": points,
            "link": {"fit": {"h2d": {"peak_gbps": 55.0}}},
            "summary": {"median_abs_sim_error_pct": 4.0, "prefetch_gbps_max": 50.0, "prefetch_share_of_peak_h2d": 50 / 55},
            **extra}


def test_the_figures_name_each_target_and_the_against_median_is_last():
    from tiersim.validator.quote import quote_lines

    against = "table\nmedian |error| 3.2% (worst +9.0%, 6 points)\n"
    lines = quote_lines(_doc(error="unfinished: a checkpoint after 7 points"), against)
    assert lines[0] == ("quote: cuda-graph on NVIDIA H200, 6 of 7 points measured; the file says: unfinished: a "
                        "checkpoint after 7 points")
    assert lines[1].startswith("overhead at batch 1 x 2048 at HBM 0.5: +2.00% (step 10.200 ms vs HBM 1.0 10.000 ms")
    assert lines[2] == "prefetch: best 50.0 GB/s of the sweep's peak H2D 55.0 GB/s = 91% (target >= 85%)"
    bound = [line for line in lines if line.startswith("link-bound")]  # the largest context at the smallest ratio
    assert [line.split(":")[0] for line in bound] == ["link-bound batch 8 x 8192 at HBM 0.25",
                                                      "link-bound batch 32 x 8192 at HBM 0.25"]
    assert "stall 0.500 ms, simulated 0.400 ms" in bound[0]
    assert any(line.startswith("strategy check host-attention at batch 1 x 2048 at HBM 0.5: overhead +20.0%, host "
                               "1.500 ms") for line in lines)
    assert "not captured: batch 1 x 2048 at HBM 0.25 prefetch: RuntimeError: capture" in lines
    assert "not measured: 1 points (skipped: time budget of 120 s spent)" in lines
    assert lines[-1] == "median |error| 3.2% (worst +9.0%, 6 points)"


def test_a_missing_against_or_a_broken_file_still_ends_on_the_median_line(tmp_path):
    graph = tmp_path / "g.json"
    graph.write_text(json.dumps(_doc()))
    run = [sys.executable, "-m", "tiersim.validator.quote"]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([*run, str(graph), str(tmp_path / "absent.txt")], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and ok.stdout.strip().splitlines()[-1] == "median |error|: not measured"
    (tmp_path / "a.txt").write_text("median |error| 7.0% (worst -9.0%, 3 points)\n")
    for broken in ("{not json", "[1, 2]", json.dumps({"points": [{"batch": 1}]})):
        graph.write_text(broken)
        proc = subprocess.run([*run, str(graph), str(tmp_path / "a.txt")], capture_output=True, text=True, env=env)
        assert "Traceback" not in proc.stdout + proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == "median |error| 7.0% (worst -9.0%, 3 points)", proc.stdout

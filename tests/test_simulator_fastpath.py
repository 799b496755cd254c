"""The fast path (tiersim.simulator.fastpath) against the SimPy engine, its reference.

Claims: without link sharing between directions the recurrence *is* the event model (every step, to float
rounding); with sharing, the two differ by no more than the contention bound; ``auto`` takes SimPy when
that bound is not negligible; over a matrix of presets, splits, batches and compute models the step
times agree within 0.5%.
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tiersim.simulator import analytic, fastpath
from tiersim.hierarchy.config import TierConfig
from tiersim.simulator.analytic import GB, LayerCosts, Offload
from tiersim.simulator.engine import simulate as simulate_events
from tiersim.simulator.presets import get_gpu, get_model
from tiersim.simulator.profile import load_profile, table_for

H100_PROFILE = Path(__file__).resolve().parent.parent / "docs" / "validation" / "h100-80gb-hbm3-operators.json"


def costs_for(model, gpu, split, batch, steps, churn=(0.27, -0.55), length=3900.0, lockstep=False, table=None,
              seed=0):
    model, gpu = get_model(model), get_gpu(gpu)
    policy = Offload(TierConfig(*split))
    if lockstep:
        lengths = np.full(batch, steps + 2)
    else:
        lengths = analytic.sample_lengths(batch, length, 0.35, np.random.default_rng(seed))
    work = analytic.build_workload(policy, batch, lengths, 128, steps, churn=churn, seed=seed, lockstep=lockstep)
    return analytic.layer_costs(model, gpu, policy, work, table), model.num_layers, gpu


def rel(a, b):
    return abs(a / b - 1.0)


# The matrix: link-bound and compute-bound, small and large batches, compressed and evicted tiers, a
# lockstep batch, two models and three link presets (PCIe Gen5, Gen4 and GH200's C2C).
MATRIX = [
    ("r1-distill-qwen-7b", "h100-sxm", (0.5, 0.5, 0.0, 0.0), 64, False),
    ("r1-distill-qwen-7b", "h100-sxm", (0.9, 0.1, 0.0, 0.0), 8, False),
    ("r1-distill-qwen-7b", "h100-sxm", (0.25, 0.5, 0.2, 0.05), 512, False),
    ("r1-distill-qwen-7b", "h100-sxm", (1.0, 0.0, 0.0, 0.0), 64, False),
    ("r1-distill-qwen-7b", "a100-80g", (0.75, 0.25, 0.0, 0.0), 1, False),
    ("qwq-32b", "h200", (0.5, 0.47, 0.0, 0.03), 32, True),
    ("qwq-32b", "gh200", (0.25, 0.75, 0.0, 0.0), 64, False),
]


@pytest.mark.parametrize("model,gpu,split,batch,lockstep", MATRIX)
def test_the_fast_path_agrees_with_simpy_within_half_a_percent(model, gpu, split, batch, lockstep):
    costs, layers, hw = costs_for(model, gpu, split, batch, 384, lockstep=lockstep)
    ref = simulate_events(costs, layers, hw)
    fast = fastpath.recurrence(costs, layers, hw)
    assert ref.engine == "simpy" and fast.engine == "fast"
    assert rel(fast.step_time.mean(), ref.step_time.mean()) <= 0.005
    for q in (50, 99):
        assert rel(np.percentile(fast.step_time, q), np.percentile(ref.step_time, q)) <= 0.005
    assert abs(fast.stall.mean() - ref.stall.mean()) <= 0.005 * ref.step_time.mean()
    assert rel(fast.wall_time, ref.wall_time) <= 0.005
    np.testing.assert_array_equal(fast.h2d_bytes, ref.h2d_bytes)
    np.testing.assert_array_equal(fast.d2h_bytes, ref.d2h_bytes)


@pytest.mark.parametrize("model,gpu,split,batch,lockstep", MATRIX)
def test_without_link_sharing_the_recurrence_is_the_event_model_step_by_step(model, gpu, split, batch, lockstep):
    costs, layers, hw = costs_for(model, gpu, split, batch, 256, lockstep=lockstep)
    roomy = replace(hw, bidir_bw=hw.h2d_bw + hw.d2h_bw)  # each direction keeps its cap: nothing is shared
    ref = simulate_events(costs, layers, roomy)
    fast = fastpath.recurrence(costs, layers, roomy)
    assert fastpath.contention_bound(costs, layers, roomy) == 0.0
    np.testing.assert_allclose(fast.step_time, ref.step_time, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fast.stall, ref.stall, rtol=1e-9, atol=1e-12)
    assert fast.wall_time == pytest.approx(ref.wall_time, rel=1e-12)


def test_a_host_floor_and_per_step_work_are_stepped_as_the_engine_does():
    table, _ = table_for(load_profile(H100_PROFILE), get_model("r1-distill-qwen-7b"))
    costs, layers, hw = costs_for("r1-distill-qwen-7b", "h100-sxm", (0.5, 0.5, 0.0, 0.0), 8, 128, table=table)
    roomy = replace(hw, bidir_bw=hw.h2d_bw + hw.d2h_bw)
    step, _ = analytic.closed_form(costs, layers)
    # A host floor that binds every other step (an eager harness issuing slower than the GPU runs).
    floored = replace(costs, host_floor=np.where(np.arange(len(step)) % 2 == 0, 1.5 * step, 0.0))
    ref, fast = simulate_events(floored, layers, roomy), fastpath.recurrence(floored, layers, roomy)
    assert (ref.step_time > 1.4 * step).sum() >= len(step) // 2 - 1
    np.testing.assert_allclose(fast.step_time, ref.step_time, rtol=1e-9)
    np.testing.assert_allclose(fast.stall, ref.stall, rtol=1e-9, atol=1e-12)


def _demotion_heavy(gpu, steps=64, layers=6):
    """Hand-made costs where every layer demotes as much as it prefetches: the link is really shared."""
    ones = np.ones(steps)
    up = ones * 0.2 * GB
    return LayerCosts(compute=ones * 1e-3, h2d=up / gpu.h2d_bw, d2h=up / gpu.d2h_bw, h2d_bytes=up, d2h_bytes=up.copy(),
                      step_extra=2e-4), layers


@pytest.mark.parametrize("gpu", ["h100-sxm", "a100-80g"])
def test_where_copies_compete_the_difference_stays_within_the_bound_and_auto_runs_simpy(gpu):
    hw = get_gpu(gpu)
    costs, layers = _demotion_heavy(hw)
    ref = simulate_events(costs, layers, hw)
    fast = fastpath.recurrence(costs, layers, hw)
    bound = fastpath.contention_bound(costs, layers, hw)
    gap = ref.step_time.sum() - fast.step_time.sum()
    assert 0.0 < gap <= bound * (1 + 1e-9)  # sharing only slows the prefetches, and no more than the bound says
    assert gap > fastpath.CONTENTION_TOLERANCE * ref.wall_time  # a run the recurrence alone would get wrong
    chosen = fastpath.simulate(costs, layers, hw)
    assert chosen.engine == "simpy"
    np.testing.assert_array_equal(chosen.step_time, ref.step_time)


def test_in_every_matrix_run_the_bound_covers_the_gap():
    for model, gpu, split, batch, lockstep in MATRIX:
        costs, layers, hw = costs_for(model, gpu, split, batch, 128, lockstep=lockstep)
        ref, fast = simulate_events(costs, layers, hw), fastpath.recurrence(costs, layers, hw)
        gap = ref.step_time.sum() - fast.step_time.sum()
        assert -1e-9 * ref.wall_time <= gap <= fastpath.contention_bound(costs, layers, hw) + 1e-9 * ref.wall_time


def test_auto_takes_the_recurrence_for_the_default_link_bound_run_and_engines_can_be_forced():
    costs, layers, hw = costs_for("r1-distill-qwen-7b", "h100-sxm", (0.5, 0.5, 0.0, 0.0), 64, 256)
    assert fastpath.contention_bound(costs, layers, hw) > 0  # demotions do overlap prefetches here...
    assert fastpath.simulate(costs, layers, hw).engine == "fast"  # ...by too little to matter
    assert fastpath.simulate(costs, layers, hw, engine="simpy").engine == "simpy"
    assert fastpath.simulate(costs, layers, hw, engine="fast").engine == "fast"
    with pytest.raises(ValueError, match="engine must be one of"):
        fastpath.simulate(costs, layers, hw, engine="warp")


def test_the_workload_is_the_cache_rule_applied_slot_by_slot_and_step_by_step():
    # build_workload tabulates one slot's counts per decode index and adds slices; the reference here applies
    # the scalar rule (hierarchy.config.tier_targets) to every slot and step directly.
    from tiersim.hierarchy.config import TierConfig, tier_targets

    policy = Offload(TierConfig(0.5, 0.3, 0.15, 0.05, retier_every=8))
    cfg = TierConfig(hbm=0.5, ddr=0.3, compressed=0.15, evict=0.05, sink_tokens=4, recent_window=64, retier_every=8)
    prompt, steps, churn = 40, 90, (0.3, -0.2)
    lengths = np.array([30, 55, 200, 7])
    work = analytic.build_workload(policy, 4, lengths, prompt, steps, churn=churn, seed=5)
    phase = analytic.slot_phases(lengths, 5, lockstep=False)
    expect = {k: np.zeros(steps) for k in analytic.COUNT_KEYS}
    for p, n in zip(phase, lengths):
        for s in range(steps):
            pos = max((p + s) % n, 1)
            last, t = pos - pos % 8, prompt + pos
            tg = tier_targets(cfg, prompt + last, 4 + 64)
            prev = tier_targets(cfg, max(prompt + last - 8, prompt), 4 + 64)
            swap = min(round(churn[0] * t ** churn[1] * t), prev["ddr"]) if pos % 8 == 0 else 0
            counts = {"hbm": tg["hbm"] + pos - last, "ddr": tg["ddr"], "compressed": tg["compressed"],
                      "full_context": t, "context": t - tg["evicted"],
                      "demoted": max(tg["ddr"] - prev["ddr"], 0) + swap if pos % 8 == 0 else 0}
            for k, v in counts.items():
                expect[k][s] += v
    for key in analytic.COUNT_KEYS:
        np.testing.assert_array_equal(getattr(work, key), expect[key], err_msg=key)
    assert work.demoted.sum() > 0 and work.compressed.sum() > 0


# -- the default run's fast start: the bundled trace's projection ships beside it -------------------------
def test_the_shipped_projection_is_a_fresh_fit_of_the_bundled_trace(trace):
    from tiersim.simulator import capacity as cap

    shipped = cap.bundled_projection()
    assert shipped is not None, "sidecar missing or stale: run python scripts/refresh_bundled_projection.py"
    fresh = cap.trace_projection(trace)
    assert shipped == {**fresh, "churn": list(fresh["churn"])}, "run python scripts/refresh_bundled_projection.py"
    model, gpu = get_model("r1-distill-qwen-7b"), get_gpu("h100-sxm")
    from_file = cap.scenario_from_trace(None, model, gpu, 64, None, projection=shipped)
    from_trace = cap.scenario_from_trace(trace, model, gpu, 64, None)
    assert from_file == from_trace


def test_a_sidecar_made_from_another_trace_is_ignored(monkeypatch, tmp_path):
    import shutil

    import tiersim.traces as traces
    from tiersim.simulator import capacity as cap

    copy = tmp_path / "default-trace.parquet"
    shutil.copy(traces.default_trace_path(), copy)
    shutil.copy(cap.projection_path(traces.default_trace_path()), cap.projection_path(copy))
    monkeypatch.setattr(traces, "default_trace_path", lambda: copy)
    assert cap.bundled_projection() is not None
    with copy.open("ab") as f:  # the trace changes; its sidecar no longer describes it
        f.write(b"\0")
    assert cap.bundled_projection() is None


def test_the_default_plan_imports_neither_pandas_nor_pyarrow():
    import subprocess
    import sys

    code = ("import sys; from tiersim.cli.main import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['capacity', '--batch', '8', '--steps', '16']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('pandas', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_simulate_engines_agree_and_say_which_ran():
    import json

    from cli_run import invoke

    rows = {}
    for engine in ("simpy", "fast", "auto"):
        code, out, err = invoke(["simulate", "--batch", "64", "--steps", "96", "--format", "json", "--engine", engine])
        assert code == 0, err
        rows[engine] = json.loads(out)["rows"][0]
    assert rows["simpy"]["method"] == "SimPy" and rows["fast"]["method"] == rows["auto"]["method"] == "fast path"
    for key in ("step_ms", "step_p99_ms", "tokens_per_s"):
        assert rel(rows["fast"][key], rows["simpy"][key]) <= 0.005, key
    assert rows["fast"]["max_batch"] == rows["simpy"]["max_batch"]
    code, _, err = invoke(["simulate", "--engine", "warp"])
    # The scenario's check reads the fast path's own list (the CLI keeps no copy of it).
    assert code == 2 and err.strip().endswith(f"--engine must be one of {', '.join(fastpath.ENGINES)}, got 'warp'")
    assert len(err.strip().splitlines()) == 1


def test_a_measured_uneven_split_is_how_an_a100_host_shares_its_link():
    # nvbandwidth on A100 Gen4 hosts: both ways at once, D2H keeps ~24 GB/s while H2D falls to ~11 (of ~35).
    from tiersim.simulator.engine import shared_rates

    a100, h100 = get_gpu("a100-80g"), get_gpu("h100-sxm")
    both = shared_rates(a100, {"h2d": 1, "d2h": 1})
    assert both["h2d"] == pytest.approx(11 * GB) and both["d2h"] == pytest.approx(24 * GB)
    assert shared_rates(a100, {"h2d": 1}) == {"h2d": 25 * GB}  # alone, each direction runs at its own cap
    assert shared_rates(a100, {"h2d": 2, "d2h": 1})["h2d"] == pytest.approx(5.5 * GB)
    fair = shared_rates(h100, {"h2d": 1, "d2h": 1})  # no measured split: max-min fair
    assert fair["h2d"] == fair["d2h"] == pytest.approx(47.5 * GB)
    # In the event model a prefetch that overlaps a demotion moves at the collapsed rate while they overlap.
    import simpy

    from tiersim.simulator.engine import Link

    env = simpy.Environment()
    link = Link(env, a100)
    up, down = link.transfer("h2d", 1.1 * GB), link.transfer("d2h", 24 * GB)
    env.run(up)
    assert env.now == pytest.approx(0.1)
    env.run(down)
    assert env.now == pytest.approx(0.1 + (24 - 2.4) / 25)

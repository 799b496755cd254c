"""The simulator: physics, the closed form, determinism, the capacity grid and its CLI."""

import json
from dataclasses import replace

import numpy as np
import pytest
import simpy

from tiersim.simulator import analytic
from tiersim.hierarchy.config import TierConfig
from tiersim.simulator.analytic import GB, Offload
from tiersim.simulator.calibration import apply_calibration
from tiersim.simulator.capacity import run, scenario_from_trace
from tiersim.simulator.engine import Link, simulate
from tiersim.simulator.presets import get_gpu, get_model, model_from_config
from cli_run import tiersim_process as _tiersim

MODEL = get_model("r1-distill-qwen-7b")
H100 = get_gpu("h100-sxm")


def scenario(trace, gpu=H100, batch=16, steps=64, length=2000.0, seed=0):
    return scenario_from_trace(trace, MODEL, gpu, batch, length, steps=steps, seed=seed)


def costs_for(policy, batch=16, steps=48, gpu=H100, churn=(0.02, 0.0)):
    rng = np.random.default_rng(0)
    work = analytic.build_workload(policy, batch, analytic.sample_lengths(batch, 2000, 0.35, rng), 100, steps,
                                   churn=churn)
    return analytic.layer_costs(MODEL, gpu, policy, work), work


# -- the link ---------------------------------------------------------------------------------
def _timed_transfers(gpu, transfers):
    env = simpy.Environment()
    link = Link(env, gpu)
    finished = {}

    def start(name, direction, nbytes, at):
        yield env.timeout(at)
        yield link.transfer(direction, nbytes)
        finished[name] = env.now

    for name, (direction, nbytes, at) in transfers.items():
        env.process(start(name, direction, nbytes, at))
    env.run()
    return finished


def test_a_transfer_moves_at_its_link_rate():
    done = _timed_transfers(H100, {"a": ("h2d", 5 * GB, 0.0)})
    assert done["a"] == pytest.approx(5 * GB / H100.h2d_bw, rel=1e-9)


def test_both_directions_share_the_ceiling():
    done = _timed_transfers(H100, {"up": ("h2d", 4 * GB, 0.0), "down": ("d2h", 4 * GB, 0.0)})
    # Neither faster than its own cap, and together not faster than the bidirectional ceiling.
    assert min(done.values()) >= 4 * GB / H100.h2d_bw
    assert max(done.values()) == pytest.approx(8 * GB / H100.bidir_bw, rel=1e-6)


def test_processor_sharing_reallocates_when_a_transfer_ends():
    # A tiny D2H arriving mid-way slows the H2D only while both run; time never stalls.
    done = _timed_transfers(H100, {"big": ("h2d", 10 * GB, 0.0), "tiny": ("d2h", 1.0, 0.05)})
    assert done["tiny"] > 0.05
    assert done["big"] == pytest.approx(10 * GB / H100.h2d_bw, rel=1e-6)


# -- physics of the engine -------------------------------------------------------------------------
def test_nothing_moves_faster_than_its_link():
    policy = Offload(TierConfig(0.5, 0.5, 0.0, 0.0))
    costs, _ = costs_for(policy)
    result = simulate(costs, MODEL.num_layers, H100)
    total_time = result.step_time.sum()
    assert result.h2d_bytes.sum() / total_time <= H100.h2d_bw * (1 + 1e-9)
    assert (result.h2d_bytes.sum() + result.d2h_bytes.sum()) / total_time <= H100.bidir_bw * (1 + 1e-9)


def test_all_in_hbm_has_no_stall_and_no_savings(trace):
    sc = scenario(trace)
    row, timeline = run(sc, sc.policy(1.0, 0.0, 0.0, 0.0))
    assert row["stall_ms"] == 0.0 and row["hbm_saved_gb"] == 0.0 and row["staging_gb"] == 0.0
    assert row["h2d_gb_per_step"] == 0.0 and row["d2h_gb_per_step"] == 0.0
    assert np.allclose(timeline["step_ms"], timeline["compute_ms"])


@pytest.mark.parametrize("hbm", [0.75, 0.5, 0.25])
def test_savings_are_the_offloaded_bytes_minus_staging(trace, hbm):
    sc = scenario(trace)
    row, _ = run(sc, sc.policy(hbm, 1 - hbm, 0.0, 0.0))
    offloaded = row["kv_full_gb"] - row["kv_hbm_gb"]
    assert row["hbm_saved_gb"] == pytest.approx(offloaded - row["staging_gb"], rel=1e-9)
    assert row["staging_gb"] > 0
    full, _ = run(sc, sc.policy(1.0, 0.0, 0.0, 0.0))
    assert row["peak_hbm_gb"] == pytest.approx(full["peak_hbm_gb"] - row["hbm_saved_gb"], rel=1e-9)


@pytest.mark.parametrize("hbm,batch", [(0.75, 4), (0.5, 32), (0.25, 64), (0.9, 1)])
def test_doubling_link_bandwidth_never_increases_stall(trace, hbm, batch):
    faster = replace(H100, h2d_bw=2 * H100.h2d_bw, d2h_bw=2 * H100.d2h_bw, bidir_bw=2 * H100.bidir_bw)
    slow_sc, fast_sc = scenario(trace, batch=batch), scenario(trace, gpu=faster, batch=batch)
    policy = slow_sc.policy(hbm, round(1 - hbm, 6), 0.0, 0.0)
    slow, _ = run(slow_sc, policy)
    fast, _ = run(fast_sc, policy)
    assert fast["stall_ms"] <= slow["stall_ms"] + 1e-12
    assert fast["step_ms"] <= slow["step_ms"] + 1e-12


def test_stall_grows_with_batch_when_the_link_is_the_bottleneck(trace):
    stalls = []
    for batch in (16, 64, 256):
        sc = scenario(trace, batch=batch)
        row, _ = run(sc, sc.policy(0.5, 0.5, 0.0, 0.0))
        stalls.append(row["stall_ms"])
    assert stalls[0] > 0 and stalls[0] < stalls[1] < stalls[2]


def test_closed_form_agrees_with_simpy_without_contention():
    # A ceiling above both directions' sum removes the only contention the closed form ignores.
    gpu = replace(H100, bidir_bw=H100.h2d_bw + H100.d2h_bw)
    for split, batch in (((0.5, 0.5, 0, 0), 16), ((0.9, 0.1, 0, 0), 2), ((1.0, 0, 0, 0), 8), ((0.3, 0.5, 0.1, 0.1), 32)):
        policy = Offload(TierConfig(*split))
        costs, _ = costs_for(policy, batch=batch, steps=64, gpu=gpu)
        result = simulate(costs, MODEL.num_layers, gpu)
        step, stall = analytic.closed_form(costs, MODEL.num_layers)
        # Skip the first step (pipeline fill) and compare the rest.
        assert result.step_time[1:].sum() == pytest.approx(step[1:].sum(), rel=0.01)
        assert result.stall[1:].sum() == pytest.approx(stall[1:].sum(), rel=0.01, abs=1e-9)


def test_event_count_does_not_grow_with_batch():
    policy = Offload(TierConfig(0.5, 0.5, 0.0, 0.0))
    events = []
    steps = 32
    for batch in (64, 256, 1024):
        costs, _ = costs_for(policy, batch=batch, steps=steps)
        events.append(simulate(costs, MODEL.num_layers, H100).events)
    # A bounded number of events per layer-step, the same at every batch size.
    assert max(events) <= 1.05 * min(events)
    assert max(events) <= 32 * steps * MODEL.num_layers


def test_deterministic_bit_for_bit(trace):
    rows = []
    for _ in range(2):
        sc = scenario(trace, seed=7)
        rows.append(json.dumps(run(sc, sc.policy(0.5, 0.47, 0.0, 0.03))[0], sort_keys=True))
    assert rows[0] == rows[1]
    other = scenario(trace, seed=8)
    assert json.dumps(run(other, other.policy(0.5, 0.47, 0.0, 0.03))[0], sort_keys=True) != rows[0]


# -- presets and calibration ------------------------------------------------------------------------
def test_model_from_transformers_config(tmp_path):
    cfg = {"num_hidden_layers": 28, "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4,
           "intermediate_size": 18944, "vocab_size": 152064}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = model_from_config(tmp_path / "config.json")
    assert model.kv_bytes_per_token == MODEL.kv_bytes_per_token == 57344
    assert model.params == pytest.approx(MODEL.params, rel=0.05)


def test_calibration_overrides_the_preset():
    cal = {"kind": "calibration", "schema_version": 1, "device": {"name": "test"},
           "link": {"h2d_gbps": 25.0, "copy_latency_us": 9.0}, "compute": {"hbm_bw_gbps": 2500.0}}
    gpu = apply_calibration(H100, cal)
    assert gpu.h2d_bw == 25 * GB and gpu.copy_latency == pytest.approx(9e-6) and gpu.d2h_bw == H100.d2h_bw
    assert gpu.hbm_bw * gpu.hbm_efficiency == pytest.approx(2500 * GB)


# -- the command line -----------------------------------------------------------------------------
def test_capacity_json_answers_the_planning_questions():
    proc = _tiersim("capacity", "--batch", "64", "--steps", "48", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    required = {"hbm", "ddr", "compressed", "evict", "context_tokens_mean", "kv_full_gb", "kv_hbm_gb", "staging_gb",
                "hbm_saved_gb", "peak_hbm_gb", "fits", "step_ms", "stall_ms", "overhead_pct", "tokens_per_s"}
    rows = result["rows"]
    assert len(rows) >= 12 and all(required <= set(r) for r in rows)
    hbm_evict = {(round(r["hbm"], 2), r["evict"]) for r in rows}
    for h in (0.75, 0.5, 0.25):
        for e in (0.0, 0.03, 0.1):
            assert (h, e) in hbm_evict
    assert result["max_batch_full_cache"] > 0
    for r in rows:
        assert abs(r["hbm"] + r["ddr"] + r["compressed"] + r["evict"] - 1) < 1e-6
    best = result["best"]
    if best is not None:
        assert best["overhead_pct"] <= result["max_overhead_pct"] and best["fits"]
        assert best["hbm_saved_gb"] == max(r["hbm_saved_gb"] for r in rows
                                           if r["fits"] and r["overhead_pct"] <= result["max_overhead_pct"])
    assert {s["batch"] for s in result["batch_sweep"]} >= {1, 64, 256}


def test_simulate_writes_a_timeline(tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "sim.parquet"
    proc = _tiersim("simulate", "--batch", "8", "--hbm", "0.5", "--ddr", "0.5", "--steps", "32", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(out)
    meta = json.loads(table.schema.metadata[b"tiersim"])
    assert meta["kind"] == "simulation" and meta["summary"]["stall_ms"] >= 0
    frame = table.to_pandas()
    assert len(frame) == 32 and {"weights_gb", "kv_hbm_gb", "staging_gb", "free_gb", "h2d_gb", "stall_ms"} <= set(frame)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["capacity", "--gpu", "tpu-v9"], "unknown GPU preset"),
        (["capacity", "--model", "gpt-9"], "unknown model preset"),
        (["simulate", "--hbm", "0.5", "--ddr", "0.4"], "sum to 1"),
        (["capacity", "--batch", "0"], "--batch"),
        (["simulate", "--batch", "-3"], "--batch"),
        (["capacity", "--format", "yaml"], "--format"),
        (["capacity", "--lengths", "forever"], "--lengths"),
    ],
)
def test_bad_input_is_one_clear_line(args, needle):
    proc = _tiersim(*args)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_unreadable_trace_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("not a trace")
    proc = _tiersim("capacity", "--trace", str(bad))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "trace" in proc.stderr


@pytest.mark.parametrize("args", [["capacity", "--batch", "many"], ["capacity", "--no-such-option"], ["nosuchcommand"]])
def test_usage_errors_are_one_line(args):
    proc = _tiersim(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

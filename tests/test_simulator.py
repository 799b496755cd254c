"""Scenarios priced by the engine: memory and savings, the workload, presets and calibration, the
capacity grid, the result file and the CLI's answers and errors. (The engine itself:
test_simulator_engine.py; strategies and the planner: test_simulator_strategies.py.)"""

import json
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from tiersim.simulator import capacity as cap
from tiersim.simulator.analytic import GB
from tiersim.simulator.calibration import apply_calibration
from tiersim.simulator.capacity import SYNTHETIC_PROFILE, run, scenario_from_trace
from tiersim.simulator.presets import get_gpu, get_model, model_from_config
from tiersim.simulator.results import read_timeline, simulation_meta, write_timeline
from cli_run import tiersim_process as _tiersim

MODEL = get_model("r1-distill-qwen-7b")
H100 = get_gpu("h100-sxm")


def scenario(trace, gpu=H100, batch=16, steps=64, length=2000.0, seed=0):
    return scenario_from_trace(trace, MODEL, gpu, batch, length, steps=steps, seed=seed)


# -- memory, savings and stalls ---------------------------------------------------------------------
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


def test_host_memory_bounds_the_ddr_tier(trace):
    small_host = replace(H100, host_bytes=2e9)
    sc = scenario_from_trace(trace, MODEL, small_host, 64, 3900.0, steps=16)
    roomy = scenario_from_trace(trace, MODEL, H100, 64, 3900.0, steps=16)
    policy = sc.policy(0.25, 0.75, 0.0, 0.0)
    row, _ = run(sc, policy)
    ok, _ = run(roomy, policy)
    assert row["ddr_gb"] > 2.0 and not row["ddr_fits"] and row["hbm_fits"] and not row["fits"]
    assert ok["ddr_fits"] and ok["fits"] and ok["ddr_gb"] == row["ddr_gb"]
    # DDR tier per sequence ~ 0.75 x 2K tokens x 57 KB: about 2e9 / 88 MB sequences fit in host memory.
    per_sequence = row["ddr_gb"] * 1e9 / 64
    assert row["max_batch"] < ok["max_batch"]
    assert abs(row["max_batch"] - 2e9 / per_sequence) <= 0.05 * row["max_batch"] + 1


def test_deterministic_bit_for_bit(trace):
    rows = []
    for _ in range(2):
        sc = scenario(trace, seed=7)
        rows.append(json.dumps(run(sc, sc.policy(0.5, 0.47, 0.0, 0.03))[0], sort_keys=True))
    assert rows[0] == rows[1]
    other = scenario(trace, seed=8)
    assert json.dumps(run(other, other.policy(0.5, 0.47, 0.0, 0.03))[0], sort_keys=True) != rows[0]


# -- the workload ---------------------------------------------------------------------------------
def test_fixed_context_holds_exactly_that_many_tokens(trace):
    sc = scenario_from_trace(trace, MODEL, H100, 16, None, steps=40, context=8192)
    row, timeline = run(sc, sc.policy(0.5, 0.5, 0.0, 0.0))
    assert timeline["context_tokens_mean"][0] == 8192 and timeline["context_tokens_mean"][-1] == 8192 + 39
    assert row["kv_full_gb"] == pytest.approx(16 * (8192 + 39) * MODEL.kv_bytes_per_token / 1e9, rel=1e-12)
    # Lockstep: every slot re-tiers at the same steps, so demotions come in bursts.
    assert np.count_nonzero(timeline["d2h_gb"]) == len(range(16, 40 + 1, 16))


def test_selective_prefetch_moves_the_traces_cover_share(trace):
    full = scenario_from_trace(trace, MODEL, H100, 32, 3000.0, steps=48)
    sel = scenario_from_trace(trace, MODEL, H100, 32, 3000.0, steps=48, prefetch="cover99")
    # The share comes from the trace: the DDR tokens holding 99% of the DDR tier's attention mass.
    steps = trace.steps[(trace.steps["step"] > 0) & (trace.steps["n_ddr"] > 0)]
    observed = float((steps["ddr_cover99"] / steps["n_ddr"]).mean())
    assert sel.cover["cover99"] == pytest.approx(observed, abs=0.05)
    assert 0 < sel.cover["cover90"] < sel.cover["cover99"] < 1
    a, _ = run(full, full.policy(0.5, 0.5, 0.0, 0.0))
    b, _ = run(sel, sel.policy(0.5, 0.5, 0.0, 0.0))
    assert b["h2d_gb_per_step"] == pytest.approx(a["h2d_gb_per_step"] * sel.cover["cover99"], rel=1e-9)
    assert b["staging_gb"] == pytest.approx(a["staging_gb"] * sel.cover["cover99"], rel=1e-9)
    assert b["stall_ms"] < a["stall_ms"] and b["hbm_saved_gb"] > a["hbm_saved_gb"]


def test_without_a_trace_the_synthetic_profile_is_used_and_named():
    sc = scenario_from_trace(None, MODEL, H100, 8, None, steps=32)
    assert sc.trace_label == cap.SYNTHETIC_LABEL
    assert sc.mean_length == SYNTHETIC_PROFILE["mean_length"] and sc.churn == SYNTHETIC_PROFILE["churn"]
    row, _ = run(sc, sc.policy(0.5, 0.5, 0.0, 0.0))
    assert row["hbm_saved_gb"] > 0


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


# -- the capacity grid ----------------------------------------------------------------------------
def test_capacity_answers_largest_batches_and_best_lossless(trace):
    sc = scenario_from_trace(trace, MODEL, H100, 32, 3900.0, steps=32)
    result = cap.grid_result(sc, max_overhead=300.0)
    rows = result["rows"]
    full = result["max_batch_full_cache"]
    for r in rows:
        # Offloading only ever frees HBM per sequence (staging is one layer's share, doubled).
        assert r["max_batch"] >= full
        if r["hbm"] < 1.0 and r["evict"] == 0.0:
            assert r["max_batch"] > full
    lossless = result["best_lossless"]
    assert lossless is not None and lossless["evict"] == 0.0 and lossless["overhead_pct"] <= 300.0
    assert lossless["hbm_saved_gb"] == max(r["hbm_saved_gb"] for r in rows if r["evict"] == 0.0 and r["fits"]
                                           and r["overhead_pct"] <= 300.0)
    # A full-cache batch beyond the largest that fits really does not fit.
    over = run(sc, sc.policy(1.0, 0.0, 0.0, 0.0), batch=full + 64, steps=8)[0]
    assert not over["fits"]


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


def test_capacity_falls_back_with_a_note_when_the_bundled_trace_is_missing(monkeypatch, tmp_path):
    import tiersim.traces

    monkeypatch.setattr(tiersim.traces, "default_trace_path", lambda: tmp_path / "gone.parquet")
    from tiersim.cli.main import app

    result = CliRunner().invoke(app, ["capacity", "--batch", "8", "--steps", "32", "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # stdout is only the JSON; the note goes to stderr
    assert doc["trace"] == cap.SYNTHETIC_LABEL
    assert "synthetic" in result.stderr


def test_capacity_says_when_the_baseline_does_not_fit():
    proc = _tiersim("capacity", "--model", "qwq-32b", "--lengths", "aime", "--batch", "64", "--steps", "32")
    assert proc.returncode == 0, proc.stderr
    assert "does NOT fit" in proc.stdout


# -- the result file ------------------------------------------------------------------------------
def test_timeline_round_trip_and_contract(trace, tmp_path):
    sc = scenario_from_trace(trace, MODEL, H100, 8, 2000.0, steps=24)
    row, timeline = run(sc, sc.policy(0.5, 0.5, 0.0, 0.0))
    meta = simulation_meta(sc, {"hbm": 0.5, "ddr": 0.5, "compressed": 0.0, "evict": 0.0}, row)
    path = write_timeline(tmp_path / "sim.parquet", timeline, meta)
    back, frame = read_timeline(path)
    for key in ("kind", "schema_version", "tiersim_version", "model", "gpu", "trace", "batch", "config", "summary"):
        assert key in back
    assert back["kind"] == "simulation" and back["summary"]["step_ms"] == row["step_ms"]
    assert list(frame.columns) == ["step", "context_tokens_mean", "weights_gb", "kv_hbm_gb", "staging_gb",
                                   "activations_gb", "free_gb", "hbm_capacity_gb", "h2d_gb", "d2h_gb",
                                   "compute_ms", "stall_ms", "step_ms"]
    # HBM occupancy adds up to the capacity every step.
    parts = frame[["weights_gb", "kv_hbm_gb", "staging_gb", "activations_gb", "free_gb"]].sum(axis=1)
    assert np.allclose(parts, frame["hbm_capacity_gb"])
    assert np.allclose(frame["step_ms"], np.maximum(frame["compute_ms"], frame["step_ms"]))


def test_the_summary_row_is_the_capacity_row_record(trace):
    """A row's keys are the Row's grid fields then the two the baseline adds; the docs name every one, and
    every key of the planner's view of the same row."""
    import re
    from dataclasses import fields
    from pathlib import Path

    from tiersim.simulator.rows import GRID_KEYS, Row

    sc = scenario_from_trace(trace, MODEL, H100, 8, 2000.0, steps=8)
    row, _ = run(sc, sc.policy(0.5, 0.5, 0.0, 0.0), largest=False)
    names = list(GRID_KEYS)
    assert names == [f.name for f in fields(Row)][: len(names)] and names[-1] == "compute_model"
    assert list(row) == names and row["max_batch"] is None
    assert list(cap.with_overhead(row, row)) == [*names, "overhead_pct", "baseline_fits"]
    names += [k for k in Row(**{f.name: 0 for f in fields(Row)}).as_point() if k not in names]
    text = (Path(__file__).resolve().parent.parent / "docs" / "file-formats.md").read_text()
    section = text[text.index("## Capacity grid"):text.index("## Quality grid")]
    documented = set(re.findall(r"[a-z0-9_]+", section))
    assert not [n for n in [*names, "overhead_pct", "baseline_fits"] if n not in documented]


def test_reading_a_trace_as_a_result_is_one_clear_error(trace):
    from tiersim.errors import TiersimError

    with pytest.raises(TiersimError, match="not a tiersim simulation file"):
        read_timeline(trace.path)


def test_simulate_out_writes_the_timeline_bit_for_bit_reproducibly(tmp_path):
    import pyarrow.parquet as pq

    files = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.parquet"
        proc = _tiersim("simulate", "--batch", "16", "--hbm", "0.6", "--ddr", "0.37", "--evict", "0.03",
                        "--steps", "32", "--seed", "5", "--out", str(out), "--format", "json")
        assert proc.returncode == 0, proc.stderr
        files.append((out.read_bytes(), proc.stdout))
    assert files[0] == files[1]
    json.loads(files[0][1])
    table = pq.read_table(tmp_path / "a.parquet")
    meta = json.loads(table.schema.metadata[b"tiersim"])
    assert meta["kind"] == "simulation" and meta["summary"]["stall_ms"] >= 0
    frame = table.to_pandas()
    assert len(frame) == 32 and {"weights_gb", "kv_hbm_gb", "staging_gb", "free_gb", "h2d_gb", "stall_ms"} <= set(frame)


# -- bad input ------------------------------------------------------------------------------------
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
        (["simulate", "--context", "4096", "--lengths", "gsm8k"], "--context"),
        (["simulate", "--context", "0"], "--context"),
        (["capacity", "--prefetch", "half"], "--prefetch"),
        (["capacity", "--host-overhead", "async"], "--host-overhead"),
        (["simulate", "--engine", "warp"], "--engine"),
        (["capacity", "--steps", "0"], "--steps"),
        (["simulate", "--hbm", "1.5", "--ddr", "-0.5"], "--hbm"),
        (["capacity", "--max-overhead", "-1"], "--max-overhead"),
        (["simulate", "--model-config", "/nonexistent/config.json"], "--model-config"),
        (["simulate", "--calibration", "/nonexistent/cal.json"], "calibration"),
        (["simulate", "--lengths", "inf"], "--lengths"),
        (["capacity", "--batch", "100000000"], "--batch"),
        # usage errors, caught by the option parser
        (["capacity", "--batch", "many"], "--batch"),
        (["capacity", "--no-such-option"], "--no-such-option"),
        (["nosuchcommand"], "nosuchcommand"),
    ],
)
def test_bad_input_is_one_clear_line(args, needle):
    proc = _tiersim(*args)
    assert proc.returncode == 2
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unreadable_trace_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("not a trace")
    proc = _tiersim("capacity", "--trace", str(bad))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "trace" in proc.stderr

"""The simulator's physics fixes of issue 16 and its profile-driven compute model.

Each physics item has a test that fails on the old model: the embedding table is not read every step
(only B rows), the LM head is; the vocabulary is the model's; small ops cost per layer; a per-step host
overhead is charged once per step; measured operator tables are interpolated, the roofline is the
fallback outside them and the output says which was used; a profile from another device is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tiersim.errors import TiersimError
from tiersim.simulator import analytic
from tiersim.hierarchy.config import TierConfig
from tiersim.simulator.analytic import Offload
from tiersim.simulator.engine import simulate
from tiersim.simulator.presets import get_gpu, get_model, model_from_config
from tiersim.simulator.profile import LAYER_GEMMS, check_device, load_profile, table_for

REPO = Path(__file__).resolve().parent.parent
H100_PROFILE = REPO / "docs" / "validation" / "h100-80gb-hbm3-operators.json"
QWEN = get_model("r1-distill-qwen-7b")
LLAMA = get_model("llama-3.1-8b")
H100 = get_gpu("h100-sxm")
ALL_HBM = Offload(TierConfig(1.0, 0.0, 0.0, 0.0))
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def lockstep(policy: analytic.Offload, batch: int, context: int, steps: int = 8) -> analytic.Workload:
    lengths = np.full(batch, steps + 2, dtype=np.int64)
    return analytic.build_workload(policy, batch, lengths, context - 1, steps, lockstep=True)


def pure_bandwidth(gpu=H100):
    """A GPU whose roofline is bytes / bandwidth exactly: no flops bound, no fixed costs."""
    return replace(gpu, peak_flops=1e30, layer_overhead=0.0, step_overhead=0.0, hbm_efficiency=1.0,
                   weight_efficiency=1.0, attn_efficiency=1.0, gemm_kernel_s=0.0, attn_kernel_s=0.0,
                   gemm_batch_slowdown=0.0, layer_overhead_per_width=0.0)


# -- item 3: only B embedding rows are read; the LM head is read every step -------------------------
@pytest.mark.parametrize("model", [QWEN, LLAMA])
def test_a_step_reads_the_lm_head_and_only_b_embedding_rows(model):
    row = model.hidden_size * model.param_bytes
    assert model.step_weight_bytes(8) - model.step_weight_bytes(1) == pytest.approx(7 * row)
    # Everything but the embedding table (less the rows gathered) and the final norm is read.
    assert model.weight_bytes - model.step_weight_bytes(1) == pytest.approx(model.embedding_bytes - row + row)
    tied = replace(model, tie_word_embeddings=True, params=model.params - model.embedding_bytes / model.param_bytes)
    assert tied.step_weight_bytes(1) == pytest.approx(model.step_weight_bytes(1))  # the head's table once


@pytest.mark.parametrize("batch", [1, 16])
def test_the_roofline_step_is_the_step_bytes_over_bandwidth(batch):
    gpu = pure_bandwidth()
    work = lockstep(ALL_HBM, batch, 2048)
    costs = analytic.layer_costs(QWEN, gpu, ALL_HBM, work)
    step, stall = analytic.closed_form(costs, QWEN.num_layers)
    kv = work.context * QWEN.kv_bytes_per_token
    expected = (QWEN.step_weight_bytes(batch) + kv) / gpu.hbm_bw
    np.testing.assert_allclose(step, expected, rtol=1e-12)
    assert not stall.any()
    # The old accounting read the whole embedding table every step: 1.09 GB (7%) more for this model.
    assert (QWEN.weight_bytes + kv[0]) / gpu.hbm_bw - step[0] == pytest.approx(
        (QWEN.embedding_bytes - batch * QWEN.hidden_size * 2 + QWEN.hidden_size * 2) / gpu.hbm_bw, rel=1e-9)


# -- item 8: the vocabulary is the model's ----------------------------------------------------------
def test_logits_memory_follows_each_models_vocabulary(tmp_path):
    assert (QWEN.vocab_size, LLAMA.vocab_size, get_model("qwen3-8b").vocab_size) == (152_064, 128_256, 151_936)
    for model in (QWEN, LLAMA):
        work = lockstep(ALL_HBM, 4, 1024)
        mem = analytic.memory(model, H100, ALL_HBM, work)
        assert mem.activations == pytest.approx(4 * (analytic.ACTIVATION_HIDDEN_MULTIPLE * model.hidden_size * 2
                                                     + 4 * model.vocab_size))
    cfg = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 128, "vocab_size": 32_000, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    custom = model_from_config(tmp_path)
    assert custom.vocab_size == 32_000 and custom.tie_word_embeddings
    assert custom.lm_head_bytes == 32_000 * 64 * 2


# -- item 4: small ops per layer ----------------------------------------------------------------------
def test_small_ops_cost_per_layer_in_the_roofline():
    work = lockstep(ALL_HBM, 1, 2048)
    bare = analytic.layer_costs(QWEN, pure_bandwidth(), ALL_HBM, work)
    with_ops = analytic.layer_costs(QWEN, replace(pure_bandwidth(), layer_overhead=51e-6), ALL_HBM, work)
    np.testing.assert_allclose(with_ops.compute - bare.compute, 51e-6, rtol=1e-9)
    # The preset's fused small ops (fitted on vidur's H100 profiles) grow with the layer's width.
    wide = analytic.layer_costs(QWEN, replace(pure_bandwidth(), layer_overhead_per_width=1e-9), ALL_HBM, work)
    np.testing.assert_allclose(wide.compute - bare.compute, 1e-9 * (QWEN.hidden_size + QWEN.mlp_width), rtol=1e-9)
    assert QWEN.mlp_width == 18_944  # R1-Distill-Qwen-7B's intermediate_size (config.json)
    assert replace(QWEN, intermediate_size=0).mlp_width == pytest.approx(18_944, rel=1e-3)  # from its size


# -- item 5: a per-step host overhead, once per step ---------------------------------------------------
@pytest.mark.parametrize("policy", [ALL_HBM, Offload(TierConfig(0.5, 0.5, 0.0, 0.0))])
def test_step_overhead_is_charged_once_per_step_in_both_engines(policy):
    gpu = replace(H100, bidir_bw=H100.h2d_bw + H100.d2h_bw)  # no contention: the closed form's premise
    work = lockstep(policy, 8, 4096, steps=12)
    base = analytic.layer_costs(QWEN, gpu, policy, work)
    more = analytic.layer_costs(QWEN, replace(gpu, step_overhead=2e-3), policy, work)
    s0, _ = analytic.closed_form(base, QWEN.num_layers)
    s1, _ = analytic.closed_form(more, QWEN.num_layers)
    if policy.tiers.hbm == 1.0:
        np.testing.assert_allclose(s1 - s0, 2e-3, rtol=1e-9)
    else:  # link-bound: the overhead overlaps the next step's first prefetch, so it costs at most 2 ms
        assert np.all(s1 - s0 <= 2e-3 + 1e-12) and np.all(s1 > s0)
    for costs, closed in ((base, s0), (more, s1)):
        run = simulate(costs, QWEN.num_layers, gpu)
        np.testing.assert_allclose(run.step_time[1:], closed[1:], rtol=1e-9)


def test_a_host_floor_bounds_the_step_from_below_in_both_engines():
    work = lockstep(ALL_HBM, 1, 2048)
    costs = analytic.layer_costs(QWEN, H100, ALL_HBM, work)
    gpu_step, _ = analytic.closed_form(costs, QWEN.num_layers)
    floored = replace(costs, host_floor=float(gpu_step[0]) * 3)
    step, _ = analytic.closed_form(floored, QWEN.num_layers)
    np.testing.assert_allclose(step, gpu_step[0] * 3)
    np.testing.assert_allclose(simulate(floored, QWEN.num_layers, H100).step_time, gpu_step[0] * 3)


# -- the profile-driven compute model --------------------------------------------------------------
def synthetic_profile(model=QWEN, device="NVIDIA H100 80GB HBM3", preset="h100-sxm") -> dict:
    """Tables with known power laws: GEMMs 10 us at 1 token growing as tokens^0.5, small ops 2 us x tokens,
    attention 1 us per (batch x 1K context), host 30 ms per step."""
    tokens = [1, 4, 16, 64]
    gemm = [{"op": op, "tokens": t, "k": 64, "n": 64, "device_us": 10.0 * t ** 0.5}
            for op in (*LAYER_GEMMS, "lm_head") for t in tokens]
    small = [{"op": op, "tokens": t, "device_us": 2.0 * t}
             for op in ("rmsnorm", "rope", "silu_mul", "residual_add", "embedding", "rotary_emb", "final_norm")
             for t in tokens]
    attention = [{"op": "sdpa_decode", "batch": b, "context": c, "device_us": b * c / 1024}
                 for b in (1, 2, 4, 8) for c in (1024, 2048, 4096)]
    decode = [{"cache": "dynamic", "batch": b, "cpu_issue_ms": 30.0, "sdpa": "no-cudnn"} for b in (1, 8)]
    decode.append({"cache": "dynamic", "batch": 1, "cpu_issue_ms": 90.0, "sdpa": "default"})
    return {"kind": "operator-profile", "schema_version": 1, "device": {"name": device}, "gpu_preset": preset,
            "models": {model.name: {"shape": {"hidden_size": model.hidden_size, "num_layers": model.num_layers},
                                    "gemm": gemm, "small": small, "attention": attention, "decode": decode}}}


def test_tables_interpolate_log_log_and_fall_back_to_the_roofline_outside():
    table, why = table_for(synthetic_profile(), QWEN)
    assert why == "" and table is not None
    assert table.gemm_s("q_proj", 2, 1e12, 1e15) == pytest.approx(10e-6 * 2 ** 0.5, rel=1e-12)  # a power law, exact
    assert table.small_s("rope", 8) == pytest.approx(16e-6, rel=1e-12)
    assert table.attention_s(2, np.array([1500.0]), 1.0, 1e12)[0] == pytest.approx(2 * 1500 / 1024 * 1e-6, rel=1e-12)
    assert table.attention_s(3, np.array([3000.0]), 1.0, 1e12)[0] == pytest.approx(3 * 3000 / 1024 * 1e-6, rel=1e-12)
    assert not table.fallbacks
    assert table.host_s(4) == pytest.approx(30e-3)  # the no-cudnn rows win over the default-SDPA one
    # Outside: GEMM and attention use the roofline, element-wise ops grow linearly; the description says so.
    assert table.gemm_s("q_proj", 256, 1e12, 1e30) == pytest.approx((2 * 64 * 64 + 2 * 256 * 128) / 1e12)
    assert table.small_s("rope", 128) == pytest.approx(256e-6)
    assert table.attention_s(16, np.array([2048.0]), 100.0, 1e12)[0] == pytest.approx(16 * 2048 * 100 / 1e12)
    words = table.describe()
    assert "q_proj at 256 tokens: roofline" in words and "attention at batch 16" in words and "rope" in words


def test_default_sdpa_steps_alone_give_no_host_floor():
    """cuDNN's per-length plan builds sit inside default-SDPA decode steps: a floor from them would exceed
    real steps (55.7 ms against 29.7 ms on the H100 run), so there is none, and the table says why."""
    doc = synthetic_profile()
    entry = doc["models"][QWEN.name]
    entry["decode"] = [r for r in entry["decode"] if r["sdpa"] == "default"]
    table, _ = table_for(doc, QWEN)
    assert table.host_s(1) == 0.0 and "default SDPA" in table.host_source


def test_profile_costs_are_the_sum_of_the_measured_operators():
    table, _ = table_for(synthetic_profile(), QWEN)
    work = lockstep(ALL_HBM, 4, 2048, steps=4)
    costs = analytic.layer_costs(QWEN, H100, ALL_HBM, work, table)
    context = work.hbm / 4
    layer = (7 * 10 * 2 + (2 + 1 + 1 + 2) * 2 * 4) * 1e-6 + 4 * context / 1024 * 1e-6
    np.testing.assert_allclose(costs.compute, layer, rtol=1e-12)
    assert costs.step_extra == pytest.approx((10 * 2 + 3 * 2 * 4) * 1e-6)
    assert costs.host_floor == pytest.approx(30e-3)
    assert costs.compute_model.startswith("profile (r1-distill-qwen-7b on NVIDIA H100 80GB HBM3)")


def test_a_model_without_a_table_falls_back_and_says_why():
    table, why = table_for(synthetic_profile(), LLAMA)
    assert table is None and "no table for llama-3.1-8b" in why
    costs = analytic.layer_costs(LLAMA, H100, ALL_HBM, lockstep(ALL_HBM, 1, 1024), table, why)
    assert costs.compute_model == why


def test_the_committed_h100_profile_loads_for_both_models():
    doc = load_profile(H100_PROFILE)
    for model in (QWEN, LLAMA):
        table, why = table_for(doc, model)
        assert why == "" and table.attn_batches[-1] == 64 and table.gemm["gate_proj"][0][-1] == 512
        costs = analytic.layer_costs(model, H100, ALL_HBM, lockstep(ALL_HBM, 8, 4096), table)
        assert 100e-6 < costs.compute[0] < 1e-3 and not table.fallbacks


def test_a_profile_or_calibration_from_another_device_is_refused_in_one_line(tmp_path):
    from tiersim.errors import TiersimError

    check_device(synthetic_profile(), "h100-sxm")
    with pytest.raises(TiersimError, match="not on --gpu a100-80g"):
        check_device(synthetic_profile(), "a100-80g")
    with pytest.raises(TiersimError, match="smoke mode"):
        check_device(synthetic_profile(device="cpu (x86_64)"), "h100-sxm")
    path = tmp_path / "p.json"
    path.write_text(json.dumps(synthetic_profile()))
    for option in ("--profile", "--calibration"):
        doc = synthetic_profile() if option == "--profile" else {
            "kind": "calibration", "schema_version": 1, "device": {"name": "NVIDIA H100 80GB HBM3"},
            "gpu_preset": "h100-sxm", "link": {}, "compute": {}}
        path.write_text(json.dumps(doc))
        proc = subprocess.run([sys.executable, "-m", "tiersim", "simulate", "--gpu", "a100-80g", option, str(path),
                               "--steps", "4"], capture_output=True, text=True, env=ENV, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and option in lines[0] and "a100-80g" in lines[0]


def test_simulate_names_the_compute_model_it_used(tmp_path):
    from tiersim.cli.main import app

    path = tmp_path / "p.json"
    path.write_text(json.dumps(synthetic_profile()))
    args = ["simulate", "--context", "2048", "--batch", "4", "--steps", "4", "--format", "json"]
    plain = json.loads(CliRunner().invoke(app, args).output)
    profiled = json.loads(CliRunner().invoke(app, [*args, "--profile", str(path)]).output)
    device_only = json.loads(CliRunner().invoke(app, [*args, "--profile", str(path), "--no-host-floor"]).output)
    # the roofline, and the engine preset it priced (none: device time only)
    assert plain["rows"][0]["compute_model"] == "roofline (no --profile given); engine overhead none (device time only)"
    assert profiled["rows"][0]["compute_model"].startswith("profile (r1-distill-qwen-7b")
    assert profiled["rows"][0]["step_ms"] >= 30.0  # the host floor
    assert device_only["rows"][0]["step_ms"] < 30.0 and "host floor" not in device_only["rows"][0]["compute_model"]
    table = CliRunner().invoke(app, args[:-2] + ["--profile", str(path)])
    assert "compute model: profile (r1-distill-qwen-7b" in table.output


# -- the --against gate -------------------------------------------------------------------------------
def _calibration_doc(points: list[tuple[int, int, float, float]]) -> dict:
    return {"kind": "calibration", "schema_version": 1, "device": {"name": "NVIDIA H100 80GB HBM3"},
            "gpu_preset": "h100-sxm", "model_shape": {"name": QWEN.name}, "settings": {"steps": 8, "warmup": 2},
            "points": [{"model_shape": QWEN.name, "batch": b, "context": c, "hbm": h, "measured_step_ms": ms}
                       for b, c, h, ms in points]}


def test_against_reports_each_points_error_and_the_median_and_worst(tmp_path):
    from tiersim.simulator.against import compare, load_measurements
    from tiersim.simulator.capacity import load_trace, run, scenario_from_trace

    scenario = scenario_from_trace(load_trace(None), QWEN, H100, 1, None, steps=8, context=2050)
    truth = {}
    for b, c, h in ((1, 2048, 1.0), (8, 4096, 1.0), (8, 4096, 0.5)):
        sc = replace(scenario, batch=b, context=c + 2, steps=8)
        truth[(b, c, h)] = run(sc, sc.policy(h, 1.0 - h, 0.0, 0.0))[0]["step_ms"]
    scale = {(1, 2048, 1.0): 1.25, (8, 4096, 1.0): 0.8, (8, 4096, 0.5): 1.0}  # errors -20%, +25%, 0%
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(_calibration_doc([(*k, v * scale[k]) for k, v in truth.items()])))
    _, points = load_measurements(path)
    result = compare(scenario, points)
    assert [round(r["error_pct"], 6) for r in result["rows"]] == [-20.0, 25.0, 0.0]
    assert result["median_abs_error_pct"] == pytest.approx(20.0) and result["worst_error_pct"] == pytest.approx(25.0)
    for limit, code in ((19.0, 1), (21.0, 0)):
        proc = subprocess.run([sys.executable, "-m", "tiersim", "simulate", "--against", str(path), "--max-error",
                               str(limit), "--format", "json"], capture_output=True, text=True, env=ENV, timeout=120)
        assert proc.returncode == code, proc.stderr
        assert json.loads(proc.stdout)["median_abs_error_pct"] == pytest.approx(20.0)


def test_against_refuses_a_foreign_file_and_a_model_it_has_no_points_for(tmp_path):
    from tiersim.errors import TiersimError
    from tiersim.simulator.against import compare, load_measurements
    from tiersim.simulator.capacity import load_trace, scenario_from_trace

    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"kind": "simulation"}))
    with pytest.raises(TiersimError, match="not a tiersim calibration or operator-profile file"):
        load_measurements(bad)
    good = tmp_path / "cal.json"
    good.write_text(json.dumps(_calibration_doc([(1, 1024, 1.0, 10.0)])))
    with pytest.raises(TiersimError, match="no measured point is of model llama-3.1-8b"):
        compare(scenario_from_trace(load_trace(None), LLAMA, H100, 1, None, steps=4, context=1024),
                load_measurements(good)[1])


# -- per-step host overhead (issue 16 item 5) -----------------------------------------------------------
#: vidur's public CPU profile of a serving engine (github.com/microsoft/vidur @ 0633efa,
#: data/profiling/a100/cpu_overheads.csv, Llama-2-7b-hf, TP 1): batch -> medians of schedule + sampler
#: end to end + prepare inputs end to end + process model outputs, ms.
VIDUR_CPU_MS = {8: 1.9705, 16: 2.7974, 24: 3.5080, 32: 4.6229, 40: 5.1360, 48: 6.0511, 56: 6.7340, 64: 7.5937}


def test_the_sync_host_overhead_is_the_public_profile_fitted_linearly():
    from tiersim.simulator.presets import HOST_OVERHEADS

    fixed, per_sequence = HOST_OVERHEADS["sync"]
    for batch, ms in VIDUR_CPU_MS.items():
        assert (fixed + per_sequence * batch) * 1e3 == pytest.approx(ms, abs=0.35), batch
    slope, intercept = np.polyfit(list(VIDUR_CPU_MS), list(VIDUR_CPU_MS.values()), 1)
    assert per_sequence * 1e3 == pytest.approx(slope, rel=0.02) and fixed * 1e3 == pytest.approx(intercept, rel=0.05)


@pytest.mark.parametrize("batch", [1, 8, 64])
def test_a_host_overhead_adds_its_time_once_per_step(batch):
    from tiersim.simulator import fastpath
    from tiersim.simulator.presets import with_host_overhead

    work = lockstep(ALL_HBM, batch, 2048)
    plain = analytic.layer_costs(QWEN, H100, ALL_HBM, work)
    sync_gpu = with_host_overhead(H100, "sync")
    synced = analytic.layer_costs(QWEN, sync_gpu, ALL_HBM, work)
    added = (1.17e-3 + 0.100e-3 * batch)
    step, _ = analytic.closed_form(plain, QWEN.num_layers)
    step_sync, _ = analytic.closed_form(synced, QWEN.num_layers)
    np.testing.assert_allclose(step_sync - step, added, rtol=1e-9)
    run = fastpath.simulate(synced, QWEN.num_layers, sync_gpu, engine="simpy").step_time
    np.testing.assert_allclose(run - fastpath.simulate(plain, QWEN.num_layers, H100, engine="simpy").step_time,
                               added, rtol=1e-6)
    assert "host overhead" in synced.compute_model and "host overhead" not in plain.compute_model
    with pytest.raises(TiersimError, match="--host-overhead must be one of none, sync"):
        with_host_overhead(H100, "async")


def test_capacity_batch_range_names_the_compute_model_it_used(tmp_path):
    """A batch range is the planner's closed form: its points and the table must name the profile and the
    engine preset they priced, not fall back to 'roofline' (found in review: --batch 1..4 --profile X said roofline)."""
    from tiersim.cli.main import app

    path = tmp_path / "p.json"
    path.write_text(json.dumps(synthetic_profile()))
    args = ["capacity", "--context", "2048", "--batch", "1..4", "--profile", str(path)]
    doc = json.loads(CliRunner().invoke(app, [*args, "--format", "json"]).stdout)
    assert doc["baseline"]["compute_model"].startswith("profile (r1-distill-qwen-7b")
    assert all(r["compute_model"].startswith("profile (") for r in doc["rows"])
    table = CliRunner().invoke(app, args)
    assert "compute model: profile (r1-distill-qwen-7b" in table.output
    eager = json.loads(CliRunner().invoke(app, ["capacity", "--context", "2048", "--batch", "1..2",
                                               "--engine-overhead", "hf-eager", "--format", "json"]).stdout)
    assert "engine overhead hf-eager" in eager["baseline"]["compute_model"]

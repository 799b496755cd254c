"""The simulator against public per-operator GPU profiles (issue 16's fidelity target), and the physics
behind it: each term of ``tiersim.simulator.physics`` does what docs/simulator.md says it does.

The median held-out error is a fidelity assertion: it fails if a change to the roofline or the presets
moves the simulator away from the public A100/H100 tables (tiersim/data/public-decode-profiles.json).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tiersim.simulator import analytic, fidelity, physics
from tiersim.hierarchy.config import TierConfig
from tiersim.simulator.analytic import Offload
from tiersim.simulator.presets import get_gpu, get_model, model_from_config

A100 = get_gpu("a100-80g")
H100 = get_gpu("h100-sxm")
REF = fidelity.load_reference()
CASES = {(c["gpu"], c["model"]): c for c in REF["cases"]}
LLAMA3 = fidelity.model_for(CASES[("a100", "Meta-Llama-3-8B")])


def test_the_held_out_median_error_is_within_the_target():
    points = fidelity.compare()
    held = [p for p in points if not p.fit]
    assert {p.gpu for p in held} == {"a100", "h100"} and len({p.model for p in held}) >= 2
    assert any(p.context >= 2048 for p in held)  # attention at long context is held out too (A100 Llama-2-7b)
    summary = fidelity.summary(points)
    assert summary["held_out"]["median_pct"] <= 3.0  # issue 16: <= 3% now (goal 1.5%)
    assert summary["fit"]["median_pct"] <= 3.0


def test_fit_and_held_out_cases_are_disjoint_and_the_fit_uses_only_fit_cases():
    assert fidelity.FIT <= set(CASES) and set(CASES) - fidelity.FIT
    # Changing a held-out case's numbers cannot move the fitted constants.
    doctored = {**REF, "cases": [
        {**c, "ops": [{**o, "gemm_ms": o["gemm_ms"] * 3} for o in c["ops"]]} if (c["gpu"], c["model"]) not in fidelity.FIT
        else c for c in REF["cases"]]}
    assert fidelity.fit(doctored) == fidelity.fit(REF)


@pytest.mark.parametrize("gpu_key", ["a100", "h100"])
def test_the_presets_carry_the_fitted_constants(gpu_key):
    gpu = get_gpu(fidelity.PRESET[gpu_key])
    for name, value in fidelity.fit()[gpu_key].items():
        assert getattr(gpu, name) == pytest.approx(value, rel=0.005), name  # the fit to 3 significant figures


# -- the layer's structure: gated vs plain MLP ---------------------------------------------------------------
def test_a_plain_mlp_layer_holds_two_mlp_matrices_and_its_width_is_derived_with_two():
    """phi-2's MLP is up, GELU, down (vidur's model_config: use_gated_mlp False; transformers' PhiMLP fc1/fc2):
    its layer is 4 h^2 of attention (MHA) + 2 h x 10240, not 3 h x 10240 as a gated MLP would have."""
    case = CASES[("a100", "phi-2")]
    phi = fidelity.model_for(case)
    h, ff = case["hidden_size"], case["intermediate_size"]
    assert not phi.gated_mlp and phi.mlp_matrices == 2
    assert phi.layer_weight_bytes == pytest.approx(2.0 * (4 * h * h + 2 * h * ff), rel=1e-12)
    assert replace(phi, intermediate_size=0).mlp_width == ff  # derived back from the layer's bytes
    assert replace(phi, intermediate_size=0, gated_mlp=True).mlp_width != ff
    assert fidelity.model_for(CASES[("a100", "Meta-Llama-3-8B")]).mlp_matrices == 3


@pytest.mark.parametrize("model_type, gated", [("phi", False), ("gpt_neox", False), ("llama", True), ("qwen2", True)])
def test_model_from_config_reads_the_mlp_layout_from_the_model_type(tmp_path, model_type, gated):
    import json

    h, ff, layers = 2560, 10240, 32  # phi-2's config.json shape
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": model_type, "num_hidden_layers": layers, "hidden_size": h, "num_attention_heads": 32,
        "intermediate_size": ff, "vocab_size": 51200}))
    model = model_from_config(tmp_path)
    assert model.gated_mlp is gated
    per_layer = 4 * h * h + (3 if gated else 2) * h * ff  # MHA attention + the MLP's matrices
    # layer_weight_bytes takes one final norm (h) off the total, which model_from_config does not count
    assert model.layer_weight_bytes == pytest.approx(2.0 * (per_layer - h / layers), rel=1e-12)
    assert replace(model, intermediate_size=0).mlp_width == ff


# -- item 1: what is streamed sets the efficiency --------------------------------------------------------
def efficiency(bytes_, seconds, gpu):
    return bytes_ / seconds / gpu.hbm_bw


def test_weights_stream_near_80_percent_and_attention_at_batch_1_long_context_near_half_on_a100():
    w = LLAMA3.layer_weight_bytes
    assert efficiency(w, physics.weight_stream_s(A100, w, 1), A100) == pytest.approx(0.78, abs=0.02)
    rows = {(r["batch"], r["context"]): (r["decode_ms"] + r["kv_save_ms"]) * 1e-3
            for r in CASES[("a100", "Meta-Llama-3-8B")]["attention"]}
    for batch in (1, 64):  # measured (decode + KV append): 43% at batch 1 / 8K, 78% at batch 64 / 8K
        kv = batch * 8192 * LLAMA3.kv_bytes_per_token_layer
        measured = efficiency(kv, rows[(batch, 8192)], A100)
        assert efficiency(kv, physics.attention_s(A100, kv), A100) == pytest.approx(measured, abs=0.04)
    assert efficiency(kv, rows[(64, 8192)], A100) > 1.5 * efficiency(kv / 64, rows[(1, 8192)], A100)
    assert float(physics.attention_s(A100, 0.0)) == 0.0  # no KV read, no attention kernel


def test_attention_efficiency_rises_with_batch_and_context():
    per_token = LLAMA3.kv_bytes_per_token_layer
    effs = [efficiency(b * c * per_token, physics.attention_s(A100, b * c * per_token), A100)
            for b, c in [(1, 1024), (1, 8192), (8, 8192), (64, 8192)]]
    assert effs == sorted(effs) and effs[0] < 0.2


# -- item 2: batch-dependent GEMM slowdown ---------------------------------------------------------------
@pytest.mark.parametrize("gpu", [A100, H100])
def test_weight_streaming_slows_with_tokens_by_the_preset_factor(gpu):
    w = LLAMA3.layer_weight_bytes
    fixed = physics.GEMMS_PER_LAYER * gpu.gemm_kernel_s
    one, sixty_four = physics.weight_stream_s(gpu, w, 1) - fixed, physics.weight_stream_s(gpu, w, 64) - fixed
    assert sixty_four / one == pytest.approx(1 + gpu.gemm_batch_slowdown, rel=1e-12)
    times = [physics.weight_stream_s(gpu, w, t) for t in (1, 2, 8, 32, 64)]
    assert times == sorted(times)
    assert A100.gemm_batch_slowdown > H100.gemm_batch_slowdown > 0  # measured: +11% vs +4.5% at 64 tokens


# -- item 4: small ops, checked against the public tables -------------------------------------------------
def test_small_ops_grow_with_width_as_the_public_tables_do():
    for gpu_key, gpu in (("a100", A100), ("h100", H100)):
        narrow = fidelity.model_for(CASES[(gpu_key, "Llama-2-7b")])
        wide = fidelity.model_for(CASES[(gpu_key, "CodeLlama-34b")])
        measured = {m: CASES[(gpu_key, m)]["ops"][0]["small_ms"] * 1e-3 for m in ("Llama-2-7b", "CodeLlama-34b")}
        assert physics.small_ops_s(gpu, wide) > physics.small_ops_s(gpu, narrow)
        assert physics.small_ops_s(gpu, narrow) == pytest.approx(measured["Llama-2-7b"], rel=0.2)
        assert physics.small_ops_s(gpu, wide) == pytest.approx(measured["CodeLlama-34b"], rel=0.2)


def test_counting_phi2s_small_ops_by_its_block_structure_would_help_h100_and_hurt_a100():
    """Why the small ops stay `floor + width x (hidden + intermediate)` (physics.py's docstring): counting the
    elements the per-token ops read (2 norms x hidden + SiLU x mul over 2 x intermediate for the gated fit
    cases; phi-2's one norm + GELU over 1 x intermediate) is, on the gated fit cases, the same width doubled,
    so the fit halves the coefficient and keeps the floor. Then phi-2 moves toward H100's table and away from
    A100's: no single structural count fits both GPUs' LayerNorm/GELU kernels."""
    h, ff = CASES[("a100", "phi-2")]["hidden_size"], CASES[("a100", "phi-2")]["intermediate_size"]
    phi = fidelity.model_for(CASES[("a100", "phi-2")])
    closer = {}
    for gpu_key, gpu in (("a100", A100), ("h100", H100)):
        measured = np.array([o["small_ms"] * 1e-3 for o in CASES[(gpu_key, "phi-2")]["ops"]])
        today = physics.small_ops_s(gpu, phi)
        structural = gpu.layer_overhead + gpu.layer_overhead_per_width / 2 * (1 * h + 1 * ff)
        closer[gpu_key] = np.median(abs(structural - measured)) < np.median(abs(today - measured))
    assert closer == {"a100": False, "h100": True}


# -- the simulator charges exactly this physics -------------------------------------------------------------
@pytest.mark.parametrize("gpu", [A100, H100])
def test_the_roofline_layer_and_step_extra_are_the_physics(gpu):
    model = get_model("llama-3.1-8b")
    policy = Offload(TierConfig(1.0, 0.0, 0.0, 0.0))
    lengths = np.full(16, 10, dtype=np.int64)
    work = analytic.build_workload(policy, 16, lengths, 2047, 8, lockstep=True)
    costs = analytic.layer_costs(model, gpu, policy, work)
    kv = work.hbm * model.kv_bytes_per_token_layer
    np.testing.assert_allclose(costs.compute, physics.layer_s(model, gpu, 16, kv, 0.0, work.hbm), rtol=1e-12)
    assert costs.step_extra == pytest.approx(physics.lm_head_s(model, gpu, 16) + gpu.step_overhead, rel=1e-12)


def test_a_calibration_replaces_the_per_stream_physics_with_its_measured_rates():
    from tiersim.simulator.calibration import apply_calibration

    calibrated = apply_calibration(H100, {"compute": {"hbm_bw_gbps": 2000.0, "layer_overhead_us": 30.0}, "link": {}})
    w = LLAMA3.layer_weight_bytes
    assert physics.weight_stream_s(calibrated, w, 64) == pytest.approx(w / 2000e9, rel=1e-12)
    assert physics.small_ops_s(calibrated, LLAMA3) == pytest.approx(30e-6, rel=1e-12)
    kv = 1e8
    assert float(physics.attention_s(calibrated, kv)) == pytest.approx(kv / 2000e9, rel=1e-12)


def test_the_old_roofline_misses_h100_by_more_than_the_fitted_one():
    """The fit is what brings H100 within the target: with one 0.80 efficiency and 51 us small ops it was not."""
    old = replace(H100, weight_efficiency=0.8, attn_efficiency=0.8, gemm_kernel_s=0.0, attn_kernel_s=0.0,
                  gemm_batch_slowdown=0.0, layer_overhead=51e-6, layer_overhead_per_width=0.0)
    old_points = [p for p in fidelity.compare({"a100": A100, "h100": old}) if p.gpu == "h100"]
    new_points = [p for p in fidelity.compare() if p.gpu == "h100"]
    assert fidelity.summary(old_points)["held_out"]["median_pct"] > 3 * fidelity.summary(new_points)["held_out"]["median_pct"]

"""The prefill physics against public measurements (tiersim.simulator.prefill_fidelity): the presets carry the
constants fitted on the fit sources only, and each source's error is what docs/simulator.md ("Prefill") states.
Editing a prefill constant on a preset, or a number in the data file, fails one of these."""

from __future__ import annotations

import copy
import statistics

import pytest

from tiersim.simulator import prefill_fidelity as pf
from tiersim.simulator.presets import get_gpu

REF = pf.load_reference()
ROWS = pf.rows()
SUMMARY = pf.summary(ROWS)


@pytest.mark.parametrize("gpu_key", ["a100", "h100"])
def test_the_presets_carry_the_fitted_prefill_constants(gpu_key):
    gpu = get_gpu(pf.PRESET[gpu_key])
    fitted = pf.fit()[gpu_key]
    assert {"prefill_gemm_efficiency", "prefill_small_ops_efficiency"} <= set(fitted)
    for name, value in fitted.items():
        assert getattr(gpu, name) == pytest.approx(value, rel=0.005), name


def test_the_fit_reads_only_the_fit_sources():
    assert set(REF["sources"]) >= pf.FIT_SOURCES
    held = {k for k, v in REF["sources"].items() if v["role"] == "held_out"}
    assert held and not held & pf.FIT_SOURCES
    doctored = copy.deepcopy(REF)
    for case in doctored["ttft_cases"]:
        for p in case["points"]:
            p["ttft_ms"] *= 3
    for case in doctored["operator_gemm_cases"]:
        for p in case["points"]:
            p["gemm_ms"] *= 3
    for case in doctored["gemm_cases"]:
        if case["tp"] > 1:  # vidur's TP rows are a check, not fitted on
            for o in case["ops"]:
                o["gemm_ms"] *= 3
    assert pf.fit(doctored) == pf.fit(REF)


def test_each_source_is_within_its_stated_error():
    """The figures docs/simulator.md quotes (median |error| per source, %), to the rounding stated there."""
    stated = {"vidur-ops": 3.5, "fa3-h100": 0.6, "vidur-ops-tp": 3.6, "tiersim-h100-operators": 7.3, "splitwise": 23.3}
    for source, median in stated.items():
        assert SUMMARY[source]["median_pct"] == pytest.approx(median, abs=0.1), source
    assert SUMMARY["held_out"]["median_pct"] == pytest.approx(22.4, abs=0.1)


def test_the_cleanest_held_out_case_is_within_the_target():
    """Splitwise's Llama-2-70B on two A100s (the engine's fixed cost small against the prefill, little TP) is within
    the issue's 10%; its TP 4/8 and H100 rows are not (docs: the engine's own cost and its long-prompt attention)."""
    sel = [abs(r.error_pct) for r in ROWS if r.source == "splitwise" and r.gpu == "a100" and r.tp == 2]
    assert len(sel) == 7 and statistics.median(sel) < 6.0 and max(sel) < 13.0
    # The simulator is faster than that engine everywhere else: the signed error says which way it misses.
    assert SUMMARY["splitwise"]["median_signed_pct"] < -15


def test_error_rows_are_plain_rows_per_source_and_regime():
    rows = pf.error_rows()
    assert {r["regime"] for r in rows} == {"gemm", "attention", "ttft"}
    assert {r["role"] for r in rows} == {"fit", "held_out", "check"}
    assert all(r["reference_ms"] > 0 and r["simulated_ms"] > 0 for r in rows)
    r = rows[0]
    assert r["error_pct"] == pytest.approx(100 * (r["simulated_ms"] / r["reference_ms"] - 1))

"""Issue 13: one definition of fits / largest batch, the offload strategies' physics, and the
planner's answer (throughput within a TPOT budget, compared with the full cache)."""

import json
from pathlib import Path
from dataclasses import replace

import numpy as np
import pytest

from tiersim.hierarchy.config import TierConfig
from tiersim.simulator import analytic, capacity as cap, planner
from tiersim.simulator.capacity import run, scenario_from_trace
from tiersim.simulator.presets import Model, get_gpu, get_model
from tiersim.simulator.strategies import STRATEGIES, host_attention_time, step_times
from cli_run import tiersim_process as _tiersim

GQA = get_model("r1-distill-qwen-7b")
#: A multi-head model (every head has its own K and V): a Llama-2-7B-shaped config.
MHA = Model("mha-7b", 32, 32, 128, 4096, 32, 6.74e9)
H100 = get_gpu("h100-sxm")


def _work(model, policy, batch, length=3000.0, steps=48):
    rng = np.random.default_rng(1)
    return analytic.build_workload(policy, batch, analytic.sample_lengths(batch, length, 0.35, rng), 128, steps,
                                   churn=(0.01, 0.0))


# -- one definition of "fits" and "largest batch" -----------------------------------------------
@pytest.mark.parametrize("model,gpu,length,split", [
    ("r1-distill-qwen-7b", "h100-sxm", 3900.0, (1.0, 0.0)),
    ("r1-distill-qwen-7b", "h100-sxm", 3900.0, (0.5, 0.5)),
    ("qwq-32b", "h200", 13800.0, (1.0, 0.0)),
    ("qwq-32b", "h200", 13800.0, (0.25, 0.75)),
])
def test_the_largest_batch_fits_and_one_more_does_not(trace, model, gpu, length, split):
    sc = scenario_from_trace(trace, get_model(model), get_gpu(gpu), 64, length, steps=64)
    policy = sc.policy(split[0], split[1], 0.0, 0.0)
    largest = cap.largest_batch(sc, policy)
    assert largest > 0
    assert run(sc, policy, batch=largest, largest=False)[0]["fits"]
    assert not run(sc, policy, batch=largest + 1, largest=False)[0]["fits"]


def test_the_largest_batch_does_not_depend_on_the_batch_asked(trace):
    # The issue: --batch 64 said 521, --batch 521 said 496, --batch 4096 said 535.
    answers = set()
    for batch in (64, 497, 498, 4096):
        sc = scenario_from_trace(trace, GQA, H100, batch, 3900.0, steps=64)
        answers.add(cap.largest_batch(sc, cap.baseline_policy(sc)))
    assert len(answers) == 1
    largest = answers.pop()
    at = scenario_from_trace(trace, GQA, H100, largest, 3900.0, steps=64)
    over = scenario_from_trace(trace, GQA, H100, largest + 1, 3900.0, steps=64)
    assert run(at, cap.baseline_policy(at), largest=False)[0]["fits"]
    assert not run(over, cap.baseline_policy(over), largest=False)[0]["fits"]


def test_capacity_json_is_consistent_with_itself():
    doc = json.loads(_tiersim("capacity", "--batch", "64", "--steps", "48", "--format", "json").stdout)
    largest = doc["max_batch_full_cache"]
    assert doc["planner"]["max_batch_full_cache"] == largest == doc["rows"][0]["max_batch"]
    # The planner's full cache at its largest batch is that batch, and it fits.
    assert doc["planner"]["full_cache"]["batch"] == largest and doc["planner"]["full_cache"]["fits"]
    over = json.loads(_tiersim("capacity", "--batch", str(largest + 1), "--steps", "48", "--format", "json").stdout)
    assert over["max_batch_full_cache"] == largest
    assert over["baseline"]["fits"] is False and all(r["baseline_fits"] is False for r in over["rows"])
    # The sweep's cell at the grid's batch is the grid's row, on the same steps.
    for r in doc["batch_sweep"]:
        assert r["steps"] == 48
        if r["batch"] == 64:
            grid = next(g for g in doc["rows"] if g["hbm"] == r["hbm"] and g["evict"] == r["evict"])
            assert r["step_ms"] == grid["step_ms"] and r["overhead_pct"] == grid["overhead_pct"]


# -- strategy physics ----------------------------------------------------------------------------
@pytest.mark.parametrize("gpu", ["h100-sxm", "a100-80g", "gh200"])
@pytest.mark.parametrize("batch", [1, 16, 256])
def test_host_attention_is_never_faster_than_its_host_memory_bytes(gpu, batch):
    hw = get_gpu(gpu)
    policy = analytic.Offload(TierConfig(0.25, 0.75, 0.0, 0.0))
    work = _work(GQA, policy, batch)
    t = step_times("host-attention", GQA, hw, policy, work)
    floor = GQA.num_layers * work.ddr * GQA.kv_bytes_per_token_layer / hw.host_bw_per_gpu
    assert np.all(t.step >= floor) and floor.min() > 0
    # The host share of a DGX-class host is its sockets' bandwidth split 8 ways.
    assert get_gpu("h100-sxm").host_bw_per_gpu == pytest.approx(2 * 307.2e9 * 0.7 / 8)


def test_host_attention_time_grows_with_tokens_and_costs_nothing_without_them():
    tokens = np.array([0.0, 1e3, 1e5, 1e6])
    t = host_attention_time(GQA, H100, tokens, 64)
    assert t[0] == 0.0 and np.all(np.diff(t) > 0)


@pytest.mark.parametrize("model", ["r1-distill-qwen-7b", "qwq-32b", "llama-3.1-8b"])
@pytest.mark.parametrize("batch", [8, 64, 512])
def test_recompute_never_beats_prefetch_on_grouped_query_models(model, batch):
    mdl = get_model(model)
    assert mdl.hidden_size * 2 > mdl.kv_bytes_per_token_layer  # the layer input is larger than K + V
    policy = analytic.Offload(TierConfig(0.5, 0.5, 0.0, 0.0))
    work = _work(mdl, policy, batch)
    pre = step_times("prefetch", mdl, H100, policy, work).step.mean()
    rec = step_times("recompute", mdl, H100, policy, work)
    assert rec.step.mean() >= pre and rec.share == 0.0


@pytest.mark.parametrize("batch", [32, 128])
def test_recompute_beats_prefetch_on_a_multi_head_model_when_the_link_binds(batch):
    assert MHA.hidden_size * 2 < MHA.kv_bytes_per_token_layer  # the input is half of K + V
    policy = analytic.Offload(TierConfig(0.5, 0.5, 0.0, 0.0))
    work = _work(MHA, policy, batch)
    pre = step_times("prefetch", MHA, H100, policy, work)
    rec = step_times("recompute", MHA, H100, policy, work)
    assert rec.step.mean() < 0.9 * pre.step.mean() and rec.share > 0


@pytest.mark.parametrize("model", [GQA, MHA, get_model("qwq-32b")])
@pytest.mark.parametrize("gpu", ["h100-sxm", "gh200", "a100-80g"])
@pytest.mark.parametrize("batch,split", [(1, 0.5), (16, 0.25), (64, 0.75), (256, 0.5)])
def test_hybrid_is_never_worse_than_the_better_of_its_parts(model, gpu, batch, split):
    hw = get_gpu(gpu)
    policy = analytic.Offload(TierConfig(split, 1 - split, 0.0, 0.0))
    work = _work(model, policy, batch)
    times = {s: step_times(s, model, hw, policy, work).step.mean() for s in ("prefetch", "host-attention", "hybrid")}
    assert times["hybrid"] <= min(times["prefetch"], times["host-attention"]) * (1 + 1e-12)


def test_hybrid_beats_both_parts_where_link_and_host_memory_are_both_slow():
    policy = analytic.Offload(TierConfig(0.5, 0.5, 0.0, 0.0))
    work = _work(GQA, policy, 64)
    t = {s: step_times(s, GQA, H100, policy, work) for s in ("prefetch", "host-attention", "hybrid")}
    assert t["hybrid"].step.mean() < 0.8 * min(t["prefetch"].step.mean(), t["host-attention"].step.mean())
    assert 0 < t["hybrid"].share < 1


def test_without_a_ddr_tier_every_strategy_is_the_full_cache():
    policy = analytic.Offload(TierConfig(1.0, 0.0, 0.0, 0.0))
    work = _work(GQA, policy, 32)
    steps = [step_times(s, GQA, H100, policy, work) for s in STRATEGIES]
    assert all(np.array_equal(s.step, steps[0].step) for s in steps) and not any(s.approximate for s in steps)


def test_selective_and_compressed_transfer_move_less_and_are_flagged():
    policy = analytic.Offload(TierConfig(0.5, 0.5, 0.0, 0.0))
    work = _work(GQA, policy, 64)
    pre = step_times("prefetch", GQA, H100, policy, work)
    for name in ("selective", "compressed-transfer"):
        t = step_times(name, GQA, H100, policy, work, cover=0.8)
        assert t.approximate and t.step.mean() < pre.step.mean()
    assert not any(step_times(s, GQA, H100, policy, work).approximate
                   for s in ("prefetch", "host-attention", "hybrid", "recompute"))


def test_a_faster_host_never_slows_host_attention():
    policy = analytic.Offload(TierConfig(0.5, 0.5, 0.0, 0.0))
    work = _work(GQA, policy, 64)
    slow = step_times("host-attention", GQA, H100, policy, work).step
    fast = step_times("host-attention", GQA, replace(H100, host_socket_bw=4 * H100.host_socket_bw), policy, work).step
    assert np.all(fast <= slow) and fast.mean() < slow.mean()


# -- the planner -----------------------------------------------------------------------------------
def test_batch_ranges_parse_to_powers_of_two_between_the_ends():
    assert planner.parse_batches("64") == [64]
    assert planner.parse_batches("16..1024") == [16, 32, 64, 128, 256, 512, 1024]
    assert planner.parse_batches("20..100") == [20, 32, 64, 100]


def test_the_plan_answers_within_the_slo_and_never_recommends_an_approximation(trace):
    sc = scenario_from_trace(trace, GQA, H100, 16, 3900.0, steps=32)
    answer = planner.plan(sc, planner.parse_batches("16..1024"), tpot_slo_ms=50.0)
    best = answer["best"]
    eligible = [r for r in answer["points"] if r["fits"] and r["tpot_ms"] <= 50.0 and not r["approximate"]
                and r["evict"] == 0]
    assert best["tokens_per_s"] == max(r["tokens_per_s"] for r in eligible)
    assert {r["strategy"] for r in answer["points"]} == {"none", *STRATEGIES}
    assert all(r["approximate"] == (r["strategy"] in ("selective", "compressed-transfer")) for r in answer["points"])
    full = answer["full_cache"]
    assert full["batch"] == cap.largest_batch(sc, cap.baseline_policy(sc)) and full["tpot_ms"] <= 50.0
    assert answer["recommendation"].startswith(f"Full cache fits up to batch {full['batch']:,}")


def test_a_tight_slo_caps_the_full_cache_batch(trace):
    sc = scenario_from_trace(trace, GQA, H100, 16, 3900.0, steps=32)
    largest, full = planner.full_cache_best(sc, 12.0)
    assert full["tpot_ms"] <= 12.0 and full["batch"] < largest
    above = planner.evaluate(sc, cap.baseline_policy(sc), full["batch"] + 1, tpot_slo_ms=12.0)[0]
    assert not above["within_slo"]


def test_the_recommendation_is_the_first_line_and_top_level_in_json():
    proc = _tiersim("capacity", "--batch", "64", "--steps", "32")
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("The full cache fits at batch 64 (") and "no tiering needed up to batch" in first
    doc = json.loads(_tiersim("capacity", "--batch", "64", "--steps", "32", "--format", "json").stdout)
    assert doc["recommendation"] == first
    assert all("strategy" in r for r in doc["rows"]) and all("strategy" in r for r in doc["points"])


def test_when_the_full_cache_does_not_fit_the_planner_compares_a_smaller_batch():
    proc = _tiersim("capacity", "--model", "qwq-32b", "--lengths", "aime", "--gpu", "h200", "--batch", "64",
                    "--steps", "32", "--tpot-slo", "50", "--format", "json")
    doc = json.loads(proc.stdout)
    full = doc["planner"]["full_cache"]
    assert full["batch"] < 64 and full["fits"] and full["tpot_ms"] <= 50
    assert doc["recommendation"].startswith(f"Full cache fits up to batch {doc['max_batch_full_cache']}")
    assert f"run the full cache at batch {full['batch']}" in doc["recommendation"]


def test_the_quickest_option_named_when_nothing_meets_the_slo_is_exact_and_within_the_eviction_budget():
    proc = _tiersim("capacity", "--model", "qwq-32b", "--lengths", "aime", "--gpu", "h200", "--batch", "64",
                    "--steps", "32", "--tpot-slo", "50", "--max-evict", "0.1", "--format", "json")
    doc = json.loads(proc.stdout)
    sentence = doc["recommendation"]
    assert "No exact config at batch 64" in sentence and "the quickest that fits is" in sentence
    exact = [r for r in doc["points"] if r["fits"] and not r["approximate"] and r["evict"] <= 0.1 + 1e-9]
    quickest = min(exact, key=lambda r: r["tpot_ms"])
    assert f"({quickest['tpot_ms']:.1f} ms)" in sentence
    assert "compressed-transfer" not in sentence and "selective" not in sentence


def test_a_range_run_lists_every_strategy_and_fits_100_columns():
    proc = _tiersim("capacity", "--batch", "16..256", "--tpot-slo", "50", "--steps", "32")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    tables = [ln for ln in lines if ln.startswith(" ")]  # table rows; prose lines start at column 0
    assert tables and max(len(ln.rstrip()) for ln in tables) <= 100
    for label in ("full @ largest", "prefetch", "host-attention", "hybrid", "recompute", "selective*", "int8 transfer*"):
        assert any(label in ln for ln in lines), label
    assert "ctx mean/peak" in proc.stdout and "32 steps each" in proc.stdout


@pytest.mark.parametrize("args,needle", [
    (["--batch", "64..16"], "--batch"),
    (["--batch", "lots"], "--batch"),
    (["--tpot-slo", "0"], "--tpot-slo"),
    (["--max-evict", "1.5"], "--max-evict"),
    (["--strategy", "teleport"], "--strategy"),
])
def test_bad_planner_input_is_one_clear_line(args, needle):
    proc = _tiersim("capacity", *args)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("hbm", [1.0, 0.75])
@pytest.mark.parametrize("profiled", [False, True])
def test_the_planner_prices_prefetch_as_the_engine_does(trace, hbm, profiled):
    """The planner's step is the engine's: LM head, per-step work, host floor and measured tables included."""
    from dataclasses import replace as with_

    from tiersim.simulator.profile import load_profile, table_for

    sc = scenario_from_trace(trace, GQA, H100, 64, 3900.0, steps=64)
    if profiled:
        doc = load_profile(Path(__file__).resolve().parent.parent / "docs" / "validation" /
                           "h100-80gb-hbm3-operators.json")
        table, note = table_for(doc, GQA)
        sc = with_(sc, table=table, compute_note=note)
    policy = sc.policy(hbm, round(1 - hbm, 6), 0.0, 0.0)
    planned = planner.evaluate(sc, policy, 64, strategies=["prefetch"])[0]
    engine, _ = cap.run(sc, policy, largest=False)
    assert planned["tpot_ms"] == pytest.approx(engine["step_ms"], rel=0.01)
    # The capacity batch sweep's closed-form cells price the same step.
    assert cap.closed_form_row(sc, policy, 64)["step_ms"] == pytest.approx(engine["step_ms"], rel=0.01)


@pytest.mark.parametrize("strategy", ["host-attention", "hybrid"])
def test_host_split_strategies_charge_the_engines_gqa_rereads_in_their_hbm_window(strategy):
    """The HBM-tier attention that host attention hides under is priced as ``physics.layer_s`` prices decode
    attention: with the model's GQA group, so an engine preset whose kernel re-reads KV heads per query head
    (``--engine-overhead trtllm``) lengthens that window on a GQA model at a batch whose layer KV outgrows L2, and
    a multi-head model (group 1) is unchanged."""
    from tiersim.simulator import engines, physics
    from tiersim.simulator.strategies import step_costs

    policy = analytic.Offload(TierConfig(0.5, 0.5, 0.0, 0.0))
    for model, grows in ((GQA, True), (MHA, False)):
        trt = engines.apply(H100, "trtllm", model.num_layers)
        off = replace(trt, attn_kv_reread_share=0.0)
        assert trt.attn_kv_reread_share > 0 and physics.gqa_group(model) == (7 if model is GQA else 1)
        work = _work(model, policy, 64)
        hbm_kv = work.hbm * model.kv_bytes_per_token_layer
        assert hbm_kv.min() > H100.l2_bytes  # the layer's HBM-tier KV is past L2: re-reads reach HBM
        on, base = (step_costs(strategy, model, g, policy, work, share=1.0) for g in (trt, off))
        want = np.minimum(physics.attention_s(trt, hbm_kv, blocks=64 * model.num_kv_heads,
                                              group=physics.gqa_group(model)), on.compute)
        np.testing.assert_allclose(on.host_window, want)
        if grows:
            assert np.all(on.host_window > base.host_window) and np.all(on.compute > base.compute)
        else:
            np.testing.assert_array_equal(on.host_window, base.host_window)

"""The serving simulator's checks (issue 21): conservation, Little's law, the low-load and saturation limits
against the step model, policy equality without memory pressure, spill, tensor parallel, determinism."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tiersim.errors import TiersimError
from tiersim.serving import memory, metrics, workload
from tiersim.serving.engine import EngineConfig
from tiersim.serving.run import ServeSpec, simulate
from tiersim.serving.stepcost import StepPricer
from tiersim.simulator import parallel, prefill, presets

MODEL = presets.get_model("r1-distill-qwen-1.5b")
GPU = presets.get_gpu("h100-sxm")


def tight_gpu(model, kv_gb: float, tp: int = 1):
    """The H100 with only ~``kv_gb`` GB of HBM left for KV per GPU: memory pressure at small sizes."""
    rank = parallel.shard(model, tp)
    return presets.with_overrides(GPU, hbm_bytes=rank.weight_bytes + GPU.reserved_bytes + 0.5e9 + kv_gb * 1e9)


def decode_step_reference(model, gpu, batch: int, hbm) -> np.ndarray:
    """The step model's decode step held in HBM, straight from ``prefill.mixed_step_s`` (``physics.layer_s``) rather
    than through the serving pricer: what the low-load and saturation checks compare the engine against."""
    kv = np.asarray(hbm, dtype=float) * model.kv_bytes_per_token_layer
    return np.array([prefill.mixed_step_s(model, gpu, batch, k, 0.0) for k in np.atleast_1d(kv)])


def prefill_alone_s(pricer: StepPricer, prompt: int, chunk: int) -> float:
    """One prompt prefilled alone in chunks of ``chunk`` tokens, one pricer step per chunk (the low-load TTFT)."""
    t, done = 0.0, 0
    while done < prompt:
        n = min(chunk, prompt - done)
        t += pricer.step_s(0, 0.0, 0.0, [(n, done, done + n == prompt)])
        done += n
    return t


def spec(on_full="preempt-recompute", gpu=GPU, model=MODEL, **engine) -> ServeSpec:
    return ServeSpec(model, gpu, engine=EngineConfig(on_full=on_full, **engine))


@pytest.mark.parametrize("on_full", memory.ON_FULL)
def test_every_request_finishes_once_with_its_tokens_under_memory_pressure(on_full):
    reqs = workload.synthetic(150, 8.0, 200, 400, sigma=0.8, seed=1)
    result = simulate(spec(on_full, tight_gpu(MODEL, 0.4)), reqs)
    e, rows = result.engine, result.rows
    assert all(r.generated == r.output for r in e.requests)  # tokens out == tokens asked
    assert np.isfinite(rows["finish_s"]).all() and (rows["ttft_s"] > 0).all()
    assert (rows["finish_s"] >= rows["arrival_s"] + rows["ttft_s"] - 1e-12).all()
    assert e.done == len(reqs) and not e.decoding and not e.prefilling and not e.waiting
    assert (e.pool.used, e.pool.reserved, e.pool.staging) == (0, 0, 0)  # every block returned
    if on_full != "queue":
        assert result.summary["preemptions"] + (result.summary["spilled_gb"] > 0) > 0  # the pressure was real


def test_littles_law():
    """L = lambda W: the engine's own count of requests in system, integrated over time, against the rows;
    and against the offered rate over the arrival window (edge effects ~W/T, here < 1%)."""
    reqs = workload.synthetic(3000, 6.0, 200, 300, seed=4)
    result = simulate(spec(), reqs)
    law = result.summary["littles_law"]
    assert law["mean_in_system"] == pytest.approx(law["lambda_times_e2e"], rel=1e-9)
    e = result.engine
    window_l = e.area_at_last_arrival / reqs.arrival[-1]
    lam = (len(reqs) - 1) / reqs.span_s
    assert window_l == pytest.approx(lam * result.rows["e2e_s"].mean(), rel=0.02)


def test_low_load_ttft_is_one_prefill_and_tpot_the_step_model_at_batch_one():
    reqs = workload.synthetic(6, 0.002, 700, 60, seed=2)  # ~500 s apart: each request alone
    result = simulate(spec(token_budget=4096), reqs)
    for r, ttft, tpot in zip(result.engine.requests, result.rows["ttft_s"], result.rows["tpot_s"]):
        assert ttft == pytest.approx(prefill.prefill_s(MODEL, GPU, r.prompt), rel=1e-12)
        contexts = r.prompt + np.arange(1, r.output, dtype=float)  # decode step j attends prompt + j tokens
        assert tpot == pytest.approx(decode_step_reference(MODEL, GPU, 1, contexts).mean(), rel=1e-9)


def test_chunked_prefill_alone_costs_the_chunks():
    reqs = workload.check([0.0], [3000], [2], "x")
    result = simulate(spec(token_budget=512), reqs)
    expected = prefill_alone_s(StepPricer(MODEL, GPU), 3000, 512)
    assert result.rows["ttft_s"][0] == pytest.approx(expected, rel=1e-12)
    starts = np.arange(0, 3000, 512)
    assert expected == pytest.approx(prefill.chunked_prefill_s(MODEL, GPU, 3000, 512), rel=0.02)
    assert len(starts) == result.engine.prefill_steps


def test_saturated_tpot_is_the_step_model_at_the_measured_mean_batch():
    """High load, no memory pressure: decode-only steps cost what the step model says at the mean batch and
    context (the step is near-linear in both, so the mean of steps is the step of the means, within 1%)."""
    reqs = workload.synthetic(400, 40.0, 100, 600, seed=5)
    result = simulate(spec(max_batch=64), reqs)
    t = metrics.timeline(result.engine)
    decode = (t["prefill_tokens"] == 0) & (t["batch"] == 64)
    steps = t["steps"][decode]
    assert steps.sum() > 2000
    measured = t["seconds"][decode].sum() / steps.sum()
    context = (t["hbm_tokens"][decode] + 64 * (steps - 1) / 2) * steps
    model = decode_step_reference(MODEL, GPU, 64, [context.sum() / steps.sum()])[0]
    assert measured == pytest.approx(model, rel=0.01)


def test_without_memory_pressure_every_policy_gives_the_same_run():
    reqs = workload.synthetic(120, 5.0, 300, 500, seed=6)
    runs = [simulate(spec(p), reqs) for p in memory.ON_FULL]
    for other in runs[1:]:
        for key in ("ttft_s", "tpot_s", "e2e_s", "queue_s"):
            assert np.array_equal(other.rows[key], runs[0].rows[key]), key
        assert other.summary["preemptions"] == 0 and other.summary["spilled_gb"] == 0


def test_deterministic_for_a_seed():
    reqs = workload.synthetic(100, 10.0, 200, 300, sigma=0.8, seed=7)
    a, b = (simulate(spec("spill", tight_gpu(MODEL, 0.3)), reqs) for _ in range(2))
    for key in a.rows:
        assert np.array_equal(a.rows[key], b.rows[key]), key


def test_spill_with_prefetch_keeps_every_token_and_only_adds_stalls():
    """Spill is exact with an exact strategy: every request runs to its length without a preemption while
    DDR has room; the DDR tokens cost link time (prefetch: each step's DDR tokens cross PCIe)."""
    reqs = workload.synthetic(150, 8.0, 200, 400, sigma=0.8, seed=1)
    spilled = simulate(spec("spill", tight_gpu(MODEL, 0.4)), reqs)
    free = simulate(spec("spill"), reqs)
    assert spilled.summary["spilled_gb"] > 0 and spilled.summary["preemptions"] == 0
    assert spilled.summary["link_gb"]["h2d"] > 0  # spilled tokens came back once HBM freed up
    assert [r.generated for r in spilled.engine.requests] == [r.generated for r in free.engine.requests]
    assert spilled.summary["tpot_ms"]["p99"] > free.summary["tpot_ms"]["p99"]
    pricer = StepPricer(MODEL, GPU)
    assert pricer.decode_s(32, 20_000, 20_000)[0] > pricer.decode_s(32, 40_000)[0]  # the same tokens, a stall


def test_staging_buffers_follow_the_strategy():
    """Spilled tokens take two one-layer staging buffers in HBM where the strategy stages them (the step model's
    StepCosts.staged): prefetch all of them, host attention none."""
    prefetch, host = StepPricer(MODEL, GPU, 1, "prefetch"), StepPricer(MODEL, GPU, 1, "host-attention")
    assert (prefetch.staged_share(), host.staged_share()) == (1.0, 0.0)
    b = memory.budget(MODEL, MODEL, GPU, 256, 2048)
    assert b.staging_blocks(28 * 16 * 10) == 20 and replace(b, staged=0.0).staging_blocks(28 * 16 * 10) == 0


def test_tensor_parallel_halves_the_kv_and_weights_per_gpu():
    model = presets.get_model("qwq-32b")
    one, two = StepPricer(model, GPU, 1), StepPricer(model, GPU, 2)
    assert two.kv_per_token * 2 == one.kv_per_token
    assert two.rank.weight_bytes * 2 == pytest.approx(one.rank.weight_bytes, rel=0.001)
    b1 = memory.budget(model, one.rank, GPU, 256, 2048)
    b2 = memory.budget(model, two.rank, GPU, 256, 2048)
    assert b2.blocks * b2.block_bytes > 2 * b1.blocks * b1.block_bytes  # the weights' half freed too
    with pytest.raises(Exception, match="must divide"):
        StepPricer(presets.get_model("r1-distill-qwen-1.5b"), GPU, 4)  # 2 KV heads


def test_a_request_that_can_never_fit_is_one_line():
    reqs = workload.check([0.0], [200], [50_000], "x")
    with pytest.raises(Exception, match="use a larger --tp or --on-full spill") as info:
        simulate(spec(gpu=tight_gpu(MODEL, 0.5)), reqs)
    assert "\n" not in str(info.value)


def test_policy_ordering_under_memory_pressure_at_long_tail_lengths():
    """What the numbers show (docs/serving.md, measured here): a long-tailed length mix (sigma 1) on 0.2 GB of KV
    per GPU. Queueing, even with the oracle's reservation of every true output, keeps TPOT at the unpressured
    step but its TTFT explodes (queue reserving max_tokens cannot even hold this tail); preempting recomputes
    (or swaps) the newest requests and stretches their tail; spilling the least-attended half of the longest
    requests to DDR (within its cap) keeps nearly every request running: a handful of preemptions against
    ~90, and its p99 TTFT, TPOT and E2E beat preempt-recompute's, its goodput at least as high."""
    reqs = workload.synthetic(200, 6.0, 200, 600, sigma=1.0, seed=3)
    gpu = tight_gpu(MODEL, 0.2)
    names = ("spill", "preempt-recompute", "preempt-swap", memory.ORACLE)
    s = {p: simulate(spec(p, gpu), reqs).summary for p in names}
    spill, recompute, swap, oracle = (s[p] for p in names)
    assert spill["ttft_ms"]["p99"] < recompute["ttft_ms"]["p99"] < oracle["ttft_ms"]["p99"]
    assert spill["tpot_ms"]["p99"] < recompute["tpot_ms"]["p99"] and spill["e2e_ms"]["p99"] < recompute["e2e_ms"]["p99"]
    assert spill["goodput_qps"] >= recompute["goodput_qps"] > oracle["goodput_qps"]
    assert oracle["tpot_ms"]["p99"] == min(x["tpot_ms"]["p99"] for x in s.values())
    assert oracle["preemptions"] == 0 and recompute["recomputed_tokens"] > 0
    assert spill["preemptions"] * 10 < recompute["preemptions"]
    assert swap["link_gb"]["d2h"] > 0 and swap["recomputed_tokens"] == 0
    with pytest.raises(memory.Unservable, match="reserving max_tokens"):
        simulate(spec("queue", gpu), reqs)


def test_a_search_point_stopped_early_has_the_full_runs_verdict():
    """The early stop (more than 1% of first tokens late) never changes whether a point meets the SLOs."""
    from tiersim.serving import search

    reqs = workload.synthetic(300, 1.0, 200, 300, seed=9)
    s = spec(max_batch=8)
    verdicts = []
    for qps in (5.0, 20.0, 40.0, 200.0):
        full = simulate(s, workload.at_rate(reqs, qps, seed=9)).summary
        point = search.point(s, reqs, qps, 1.0, 9)
        assert point["within_slo"] == full["within_slo"]
        assert not point["stopped_early"] or point["ttft_p99_ms"] > s.slo.ttft_s * 1e3
        verdicts.append((full["within_slo"], point["stopped_early"]))
    assert (True, False) in verdicts and (False, True) in verdicts  # both sides of the knee were tried


def test_spec_policy_replace_keeps_the_rest():
    s = spec("queue", max_batch=7)
    assert s.with_policy("spill").engine == replace(s.engine, on_full="spill")


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tiersim.hierarchy.strategies import NAMES as STRATEGIES  # noqa: E402


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(n=st.integers(1, 40), qps=st.floats(0.5, 200), sigma=st.floats(0, 1.5), kv=st.floats(0.05, 0.6),
       on_full=st.sampled_from(memory.POLICIES), max_batch=st.integers(1, 64), budget=st.integers(16, 4096),
       seed=st.integers(0, 1000), tp=st.sampled_from([1, 2]), strategy=st.sampled_from(sorted(STRATEGIES)))
def test_any_small_workload_conserves_requests_tokens_and_blocks(n, qps, sigma, kv, on_full, max_batch, budget, seed,
                                                                 tp, strategy):
    """Random workloads, memory budgets and engine limits: every request finishes once with its tokens, in order
    of its own events, and every block comes back (no deadlock, no overdrawn pool)."""
    reqs = workload.synthetic(n, qps, 120, 300, sigma=sigma, seed=seed)
    try:
        s = replace(spec(on_full, tight_gpu(MODEL, kv, tp), max_batch=max_batch, token_budget=budget), tp=tp,
                    strategy=strategy)
        result = simulate(s, reqs)
    except TiersimError as exc:  # no KV left beside the workspace, or a request longer than the budget
        assert ("use a larger --tp" in str(exc) or "use a smaller --token-budget" in str(exc)) and "\n" not in str(exc)
        return
    e, rows = result.engine, result.rows
    assert all(r.generated == r.output for r in e.requests)
    assert (rows["queue_s"] >= 0).all() and (rows["ttft_s"] >= rows["queue_s"]).all()
    assert (rows["e2e_s"] >= rows["ttft_s"]).all()
    assert (e.pool.used, e.pool.reserved, e.pool.staging, e.sum_spilled, e.swapped_tokens) == (0, 0, 0, 0, 0)


def test_an_engine_overhead_raises_low_load_tpot_by_its_per_step_line():
    """--engine-overhead reaches serving through engines.apply, the step model's one place: at batch 1 every
    decode step costs the engine's fixed + per-sequence line more, and nothing else changes."""
    from tiersim.simulator import engines

    reqs = workload.synthetic(4, 0.002, 300, 40, seed=3)  # requests alone: every decode step at batch 1
    plain = simulate(spec(gpu=engines.apply(GPU, "none", MODEL.num_layers)), reqs)
    vllm = simulate(spec(gpu=engines.apply(GPU, "vllm", MODEL.num_layers)), reqs)
    line = engines.get("vllm").host_s(1)
    assert line > 0
    np.testing.assert_allclose(vllm.rows["tpot_s"] - plain.rows["tpot_s"], line, rtol=1e-9)
    assert "vllm" in vllm.spec.describe()["engine_overhead"]


def test_a_host_floor_holds_for_prefill_only_steps_too():
    from tiersim.simulator import engines

    eager = engines.apply(GPU, "hf-eager", MODEL.num_layers)
    pricer, plain = StepPricer(MODEL, eager), StepPricer(MODEL, GPU)
    chunk = [(4, 0, True)]
    assert plain.step_s(0, 0.0, 0.0, chunk) < eager.step_host_floor == pricer.step_s(0, 0.0, 0.0, chunk)


def test_out_of_hbm_names_the_token_budget_when_the_workspace_is_the_cause():
    """The weights fit, a huge --token-budget's step workspace does not: the message names --token-budget,
    not the weights / --tp; with too little HBM for the weights themselves it still names --tp."""
    with pytest.raises(TiersimError) as info:
        memory.budget(MODEL, MODEL, GPU, 256, 10_000_000)
    assert "--token-budget 10,000,000" in str(info.value) and "--tp" not in str(info.value)
    memory.budget(MODEL, MODEL, GPU, 256, 2048)  # the same weights with the default budget fit
    small = replace(GPU, hbm_bytes=MODEL.weight_bytes * 0.9)
    with pytest.raises(TiersimError, match="use a larger --tp") as info:
        memory.budget(MODEL, MODEL, small, 256, 2048)
    assert "--token-budget" not in str(info.value)


@pytest.mark.parametrize("batch", [0, 4])
def test_a_mixed_step_pays_one_prefill_attention_kernel_per_layer_however_many_chunks_it_packs(batch):
    """The prefill chunks of one iteration run in one packed variable-length attention call (as
    ``prefill.prefill_attention_s(sequences=n)`` prices a batched prefill): raising the kernel's fixed cost by X
    raises the step by X per layer for the chunks (plus X per layer for the decode rows' own call), not X per chunk."""
    extra = 1e-3
    slower = replace(GPU, attn_kernel_s=GPU.attn_kernel_s + extra)
    for k in (1, 2, 3):
        chunks = [(256, 0, False)] * k
        rise = StepPricer(MODEL, slower).step_s(batch, 2000.0 * batch, 0, chunks) - \
            StepPricer(MODEL, GPU).step_s(batch, 2000.0 * batch, 0, chunks)
        assert rise / extra / MODEL.num_layers == pytest.approx(1 + (batch > 0), rel=1e-9)


def test_a_one_token_request_has_no_tpot_and_is_judged_on_its_ttft_alone():
    """One output token has no inter-token gap: its TPOT is NaN (not 0 s, which pulled the percentiles down), it
    meets the SLO on TTFT alone, and a run of only such requests is within the SLO on TTFT alone."""
    reqs = workload.check([0.0, 0.0, 0.0, 0.0], [64] * 4, [1, 1, 1, 40], "x")
    result = simulate(spec(), reqs)
    rows, s = result.rows, result.summary
    assert np.isnan(rows["tpot_s"][:3]).all() and rows["tpot_s"][3] > 0
    assert s["tpot_ms"]["p50"] == pytest.approx(rows["tpot_s"][3] * 1e3, rel=1e-12)  # the one real gap, not 0
    assert rows["meets_slo"].all() and s["within_slo"]
    strict = simulate(replace(spec(), slo=metrics.SLO(ttft_s=2.0, tpot_s=rows["tpot_s"][3] / 2)), reqs)
    assert strict.rows["meets_slo"].tolist() == [True, True, True, False] and not strict.summary["within_slo"]
    only_one = simulate(spec(), workload.check([0.0, 0.0], [64, 64], [1, 1], "x"))
    assert np.isnan(only_one.summary["tpot_ms"]["p99"]) and only_one.summary["within_slo"]

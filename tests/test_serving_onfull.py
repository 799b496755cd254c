"""Spill's cap and queue's reservation (docs/serving.md, "When the next step does not fit"): spill past its
knee stays near preemption instead of collapsing, and changes nothing where its reads hide behind compute;
queue reserves what a request asked for (max_tokens), the true output only as the named oracle."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from test_serving import MODEL, spec, tight_gpu
from tiersim.errors import TiersimError
from tiersim.serving import memory, metrics, workload
from tiersim.serving.memory import blocks
from tiersim.serving.run import simulate

UNCAPPED = float("inf")


def capped(s, cap):
    return replace(s, engine=replace(s.engine, spill_cap=cap))


def _spill_step_slowdowns(result) -> np.ndarray:
    """Per decode-only step where the DDR tokens rose (a spill was decided for it): its price over the same
    batch with every token in HBM."""
    t, pricer = metrics.timeline(result.engine), result.engine.pricer
    rose = np.r_[False, np.diff(t["ddr_tokens"]) > 0] & (t["prefill_tokens"] == 0) & (t["batch"] > 1)
    return np.array([pricer.decode_s(int(b), h, d)[0] / pricer.decode_s(int(b), h + d)[0]
                     for b, h, d in zip(t["batch"][rose], t["hbm_tokens"][rose], t["ddr_tokens"][rose])])


def test_the_spill_cap_keeps_spill_near_preemption_past_the_knee():
    """Overload (20 requests/s of ~1.5K tokens on 0.5 GB of KV): uncapped, spilled tokens read every step slow
    the batch and the queue behind it starves (p99 TTFT ~2x preemption's here, 10x on QwQ-32B TP 2); within
    the default cap spill's p99 TTFT stays within 1.5x preempt-recompute's, and it still preempts less."""
    reqs = workload.synthetic(150, 20.0, 200, 1500, seed=3)
    gpu = tight_gpu(MODEL, 0.5)
    recompute = simulate(spec("preempt-recompute", gpu), reqs).summary
    spill = simulate(spec("spill", gpu), reqs).summary
    run = simulate(capped(spec("spill", gpu), UNCAPPED), reqs)
    uncapped = run.summary
    assert _spill_step_slowdowns(run).max() > 2  # uncapped, a spilled step cost 3x its all-HBM price
    ttft = {name: s["ttft_ms"]["p99"] for name, s in (("recompute", recompute), ("spill", spill),
                                                      ("uncapped", uncapped))}
    assert ttft["spill"] <= 1.5 * ttft["recompute"], ttft
    assert ttft["uncapped"] >= 1.5 * ttft["spill"], ttft  # the cap is what keeps it there
    assert 0 < spill["preemptions"] < recompute["preemptions"] and spill["spilled_gb"] > 0


def test_below_the_knee_the_cap_changes_nothing():
    """Light pressure: spilled tokens' reads hide behind the step's compute, so the cap never refuses a spill and
    the run is the uncapped one bit for bit (tokens were spilled, none preempted)."""
    reqs = workload.synthetic(150, 8.0, 200, 400, sigma=0.8, seed=1)
    gpu = tight_gpu(MODEL, 0.4)
    a, b = simulate(spec("spill", gpu), reqs), simulate(capped(spec("spill", gpu), UNCAPPED), reqs)
    assert a.summary["spilled_gb"] > 0 and a.summary["preemptions"] == 0
    for key in a.rows:
        assert np.array_equal(a.rows[key], b.rows[key]), key


@pytest.mark.parametrize("cap", [0.0, memory.SPILL_CAP, 0.2])
def test_a_spill_never_slows_its_step_past_the_cap(cap):
    """The cap is checked with the step model when tokens are spilled: every step whose DDR tokens rose costs at
    most (1 + cap) x the all-HBM step (0: only what the prefetch hides behind compute)."""
    reqs = workload.synthetic(150, 20.0, 200, 1500, seed=3)
    gpu = tight_gpu(MODEL, 0.5)
    slowdowns = _spill_step_slowdowns(simulate(capped(spec("spill", gpu), cap), reqs))
    assert len(slowdowns) > 10 and slowdowns.max() <= (1 + cap) * (1 + 1e-12)


def test_queue_reserves_max_tokens_and_equals_the_oracle_when_they_agree():
    """Every output the same length: reserving max_tokens = that length is the oracle's reservation, bit for
    bit; the default max_tokens (the power of two covering it) reserves more, so fewer run at once."""
    reqs = workload.synthetic(120, 8.0, 200, 700, sigma=0.0, seed=2)
    output = int(reqs.output[0])
    assert (reqs.output == output).all() and (reqs.prompt == reqs.prompt[0]).all()
    gpu = tight_gpu(MODEL, 0.3)
    oracle = simulate(spec(memory.ORACLE, gpu), reqs)
    exact = simulate(spec("queue", gpu, max_tokens=output), reqs)
    for key in oracle.rows:
        assert np.array_equal(oracle.rows[key], exact.rows[key]), key
    default = simulate(spec("queue", gpu), reqs)
    assert default.engine.max_tokens == 1024 == memory.default_max_tokens(reqs.output)
    held = blocks(int(reqs.prompt[0]) + 1024 - 1)  # a request's blocks with its reservation
    most = default.engine.budget.blocks // held
    assert metrics.timeline(default.engine)["batch"].max() <= most < metrics.timeline(oracle.engine)["batch"].max()
    assert default.summary["ttft_ms"]["p99"] > oracle.summary["ttft_ms"]["p99"]
    assert oracle.spec.describe()["oracle"] and not default.spec.describe()["oracle"]


@pytest.mark.parametrize("longest,expected", [(1, 1), (2, 2), (3, 4), (4096, 4096), (4097, 8192)])
def test_the_default_max_tokens_is_the_power_of_two_covering_the_longest_output(longest, expected):
    assert memory.default_max_tokens([1, longest]) == expected


def test_an_output_past_max_tokens_is_cut_by_the_workload_and_refused_by_the_engine():
    reqs = workload.check([0.0, 1.0], [10, 10], [50, 500], "x")
    cut, n = workload.cut_outputs(reqs, 100)
    assert n == 1 and cut.output.tolist() == [50, 100] and reqs.output.tolist() == [50, 500]
    with pytest.raises(TiersimError, match="request 2 asks for 500 output tokens, more than max_tokens 100"):
        simulate(spec("spill", max_tokens=100), reqs)


def test_queue_names_max_tokens_when_its_reservation_cannot_fit():
    reqs = workload.check([0.0], [200], [300], "x")
    with pytest.raises(memory.Unservable, match=r"reserving max_tokens 100,000\) .* or a smaller --max-tokens"):
        simulate(spec("queue", tight_gpu(MODEL, 0.5), max_tokens=100_000), reqs)
    simulate(spec(memory.ORACLE, tight_gpu(MODEL, 0.5), max_tokens=100_000), reqs)  # the oracle reserves 300


def test_a_request_files_own_max_tokens_is_what_queue_reserves(tmp_path):
    """A trace that carries each request's max_tokens: queue reserves exactly that, so a file whose max_tokens are
    the outputs is the oracle bit for bit, lengths varying; the column round-trips and is never below the output."""
    from tiersim.serving import workload as w

    reqs = w.synthetic(120, 8.0, 200, 500, sigma=0.8, seed=4)
    own = replace(reqs, max_tokens=reqs.output.copy())
    path = w.write_requests(tmp_path / "trace.jsonl", own)
    back = w.read_requests(path)
    assert np.array_equal(back.max_tokens, reqs.output) and "max_tokens per request" in back.describe()
    gpu = tight_gpu(MODEL, 0.3)
    queue, oracle = simulate(spec("queue", gpu), back), simulate(spec(memory.ORACLE, gpu), reqs)
    for key in oracle.rows:
        assert np.array_equal(queue.rows[key], oracle.rows[key]), key
    assert simulate(spec("queue", gpu), reqs).summary["ttft_ms"]["p99"] > oracle.summary["ttft_ms"]["p99"]
    (tmp_path / "bad.csv").write_text("arrival_s,prompt_tokens,output_tokens,max_tokens\n0,5,30,20\n")
    with pytest.raises(TiersimError, match="row 1 has output_tokens 30 above its max_tokens 20"):
        w.read_requests(tmp_path / "bad.csv")
    cut, n = w.cut_outputs(back, 100)
    assert cut.max_tokens.max() <= 100 and (cut.output <= cut.max_tokens).all()

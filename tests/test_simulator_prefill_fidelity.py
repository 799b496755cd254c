"""The prefill physics against public measurements (tiersim.simulator.prefill_fidelity): the presets carry the
constants fitted on the fit sources only, and each source's error is what docs/simulator.md ("Prefill") states.
Editing a prefill constant on a preset, or a number in the data file, fails one of these."""

from __future__ import annotations

import copy
import re
import statistics
from dataclasses import replace
from pathlib import Path

import pytest

from tiersim.simulator import parallel
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


DOC = (Path(__file__).resolve().parent.parent / "docs" / "simulator.md").read_text()
PREFILL_DOC = DOC[DOC.index("## Prefill"):]
ROLE = {"fit": "fit", "check": "check", "held out": "held_out"}


def _pct(cell: str) -> float:
    return float(cell.strip().replace("\u2212", "-").rstrip("%"))


def _stated_table() -> dict[str, dict]:
    """docs/simulator.md's "Fit and check, by source" table: source -> role, points, median, worst, signed (%)."""
    out = {}
    for line in PREFILL_DOC.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[1] in ROLE and cells[3].isdigit():
            out[cells[0]] = {"role": ROLE[cells[1]], "points": int(cells[3]), "median_pct": _pct(cells[4]),
                             "worst_pct": _pct(cells[5]), "median_signed_pct": _pct(cells[6])}
    return out


def test_each_source_reproduces_what_the_docs_state():
    """docs/simulator.md ("Prefill") states each source's role, points, median, worst and median signed error (%, one
    decimal): the code must give those, so a changed constant or data row fails here until the docs say so too, and
    every source the code reports is in the table (none dropped from the docs)."""
    stated = _stated_table()
    assert set(stated) == set(SUMMARY) - {"held_out"}
    for source, row in stated.items():
        got = SUMMARY[source]
        assert (got["role"], got["points"]) == (row["role"], row["points"]), source
        for key in ("median_pct", "worst_pct", "median_signed_pct"):
            assert got[key] == pytest.approx(row[key], abs=0.05 + 1e-9), (source, key)


def test_the_pooled_held_out_figures_are_the_stated_ones():
    """The bold sentence after the table: all held-out points' median, and the TTFT points' alone."""
    m = re.search(r"Held out, all (\d+) points: median \|error\| ([\d.]+)%; the (\d+) TTFT points: ([\d.]+)%",
                  PREFILL_DOC)
    assert m, "docs/simulator.md no longer states the pooled held-out prefill figures"
    held = SUMMARY["held_out"]
    assert held["points"] == int(m[1]) and held["median_pct"] == pytest.approx(float(m[2]), abs=0.05 + 1e-9)
    ttft = [abs(r.error_pct) for r in ROWS if r.regime == "ttft" and r.role == "held_out"]
    assert len(ttft) == int(m[3]) and statistics.median(ttft) == pytest.approx(float(m[4]), abs=0.05 + 1e-9)


def _ttft_sources(role: str) -> set[str]:
    return {c["source"] for c in REF["ttft_cases"] if REF["sources"][c["source"]]["role"] == role}


def test_no_ttft_source_is_fitted_on_and_every_one_is_reported():
    assert _ttft_sources("held_out") == {"splitwise", "trtllm-v0.5-a100", "trtllm-v0.9-a100", "argonne-vllm",
                                         "argonne-trtllm",
                                         "argonne-dsmii", "distserve-swift", "distserve-vllm",
                                         "distserve-vllm-trace", "distserve-swift-trace"}
    assert not _ttft_sources("fit")
    ttft = {r.source for r in ROWS if r.regime == "ttft" and r.role == "held_out"}
    assert ttft == _ttft_sources("held_out")


def test_the_gpu_physics_is_never_much_slower_than_a_real_engine():
    """An engine adds host work to the GPU's; it cannot make the GPU's work faster than the physics by much. So a
    held-out TTFT source the simulator misses by more than the issue's 10% must be missed on the fast side (the
    engine's own cost, not charged here), and no held-out TTFT point may be priced over 15% slower than measured.
    The worst, named in the docs: Falcon-180B on 8 A100s at 2K tokens, both TensorRT-LLM releases (+13.1% v0.5,
    +13.3% 0.9: GEMMs of a hidden width no fit table reaches). A GEMM, attention or all-reduce term made too slow
    fails here; one made too fast fails the stated medians above."""
    for source in _ttft_sources("held_out"):
        s = SUMMARY[source]
        assert s["median_pct"] <= 10.0 or s["median_signed_pct"] < -10.0, source
    held = [r for r in ROWS if r.regime == "ttft" and r.role == "held_out"]
    worst = max(r.error_pct for r in held)
    assert 10.0 < worst < 15.0
    # the points priced over 10% slow, as the docs name them: the two Falcon-180B 2K-token rows and "one of
    # LLM-Inference-Bench's 40 GB A100 rows (+a%)" (or "two of ... (+a%, +b%)"), their errors read from the text;
    # none >= 11% but Falcon's
    slow = [r for r in held if r.error_pct > 10.0]
    assert {(r.source, r.model, r.tokens) for r in slow if r.model == "falcon-180b"} == {
        ("trtllm-v0.5-a100", "falcon-180b", 2048), ("trtllm-v0.9-a100", "falcon-180b", 2048)}
    others = sorted((r for r in slow if r.model != "falcon-180b"), key=lambda r: r.error_pct)
    named = re.search(r"only other points? over \+10% (is one|are two) of LLM-Inference-Bench's 40 GB A100 rows "
                      r"\(([^)]*)\)", re.sub(r"\s+", " ", PREFILL_DOC))
    assert named and [round(r.error_pct, 1) for r in others] == [float(x) for x in re.findall(r"\+([\d.]+)%", named[2])]
    assert len(others) == {"is one": 1, "are two": 2}[named[1]]  # the count the text says, not only its figures
    assert all(r.source.startswith("argonne-") and r.gpu == "a100-40gb" for r in others)
    assert {r.model for r in held if r.error_pct >= 11.0} == {"falcon-180b"}
    stated = re.search(r"no held-out TTFT point is priced\s+more than \+([\d.]+)% above", PREFILL_DOC)
    assert stated and worst == pytest.approx(float(stated[1]), abs=0.05 + 1e-9)  # and the docs say which


def test_falcon_is_priced_with_the_all_reduces_each_release_runs():
    """TensorRT-LLM 0.9's Falcon sums its parallel attention and MLP outputs and all-reduces once per layer; v0.5's
    reduced after each (docs/simulator.md, "Prefill"). The shape says the first (its layout: a Falcon parallel
    block), v0.5's case states its engine's own two, the pricing reads both: the two releases' Falcon rows differ by
    exactly one all-reduce of the prompt's rows per layer, and with the two of a sequential block the 0.9 row at 2K
    tokens would be priced over 25% slow, past the bound above."""
    cases = {c["source"]: c for c in REF["ttft_cases"] if c["model"] == "falcon-180b"}
    assert "allreduces_per_layer" not in cases["trtllm-v0.9-a100"]
    assert cases["trtllm-v0.5-a100"]["allreduces_per_layer"] == 2
    model = pf.model_from_shape("falcon-180b", REF["models"]["falcon-180b"])
    assert model.parallel_block and model.allreduces_per_layer == 1
    # every other TTFT model is a sequential block or runs at TP 1 (GPT-J): the case override is Falcon v0.5's only
    assert {c["model"] for c in REF["ttft_cases"] if "allreduces_per_layer" in c} == {"falcon-180b"}
    gpu = get_gpu(pf.PRESET["a100"])
    rows = {(r.source, r.tokens): r for r in ROWS if r.model == "falcon-180b"}
    assert {r.allreduces_per_layer for r in rows.values()} == {1, 2}
    for n in (128, 2048):
        one, two = rows[("trtllm-v0.9-a100", n)], rows[("trtllm-v0.5-a100", n)]
        assert one.allreduces_per_layer == 1 and two.allreduces_per_layer == 2
        reduce_ms = model.num_layers * parallel.allreduce_s(gpu, 8, n * model.hidden_size * model.param_bytes) * 1e3
        assert two.simulated_ms - one.simulated_ms == pytest.approx(reduce_ms, rel=1e-9)
    two_reduces = parallel.tp_prefill_s(model, gpu, 8, 2048, allreduces=2) * 1e3
    assert 100 * (two_reduces / rows[("trtllm-v0.9-a100", 2048)].reference_ms - 1) > 25.0


def test_current_engines_meet_the_ttft_target_per_source():
    """TensorRT-LLM (v0.5, 0.9 and 2024) and vLLM (2024), no server in the path, A100/H100/GH200, 128-16K tokens per
    forward: each within the issue's 10% median, and within 10% pooled (the points and figure docs/simulator.md quote)."""
    current = {"trtllm-v0.5-a100", "trtllm-v0.9-a100", "argonne-vllm", "argonne-trtllm"}
    for source in current:
        assert SUMMARY[source]["median_pct"] <= 10.0, source
    pooled = [abs(r.error_pct) for r in ROWS if r.source in current]
    stated = re.search(r"together (\d+) points, ([\d.]+)%", PREFILL_DOC)
    assert stated and len(pooled) == int(stated[1])
    median = statistics.median(pooled)
    assert median <= 10.0 and median == pytest.approx(float(stated[2]), abs=0.05 + 1e-9)


def test_the_cleanest_held_out_case_is_within_the_target():
    """Splitwise's Llama-2-70B on two A100s (the engine's fixed cost small against the prefill, little TP) is within
    the issue's 10%; its TP 4/8 and H100 rows are not (docs: the engine's own cost and its long-prompt attention)."""
    sel = [abs(r.error_pct) for r in ROWS if r.source == "splitwise" and r.gpu == "a100" and r.tp == 2]
    assert len(sel) == 7 and statistics.median(sel) < 6.0 and max(sel) < 13.0
    # The simulator is faster than that engine everywhere else: the signed error says which way it misses.
    assert SUMMARY["splitwise"]["median_signed_pct"] < -15


def test_the_engine_step_check_charges_that_engines_own_decode_excess():
    """Each Splitwise point is checked a second time with that engine's batch-1 decode step minus the simulated one
    added (the same runs' token_time): the miss that remains is its long-prompt, TP >= 4 rows, not its small prompts."""
    plain = {(r.gpu, r.model, r.tp, r.tokens): r for r in ROWS if r.source == "splitwise"}
    check = [r for r in ROWS if r.source == "splitwise+engine-step"]
    assert len(check) == len(plain) and {r.role for r in check} == {"check"}
    for r in check:
        p = plain[(r.gpu, r.model, r.tp, r.tokens)]
        assert r.reference_ms == p.reference_ms
    short = [abs(r.error_pct) for r in check if r.gpu == "a100" and r.tokens <= 2048]
    long_tp = [r.error_pct for r in check if r.tp >= 4 and r.tokens >= 4096]
    assert statistics.median(short) < 6.0 and max(long_tp) < -13.0



def test_the_engine_step_check_prices_the_decode_step_with_the_prefill_s_all_reduce_count():
    """The check subtracts the simulated decode step of the same engine build its prefill is priced as: a case that
    states its engine's all-reduce count (Falcon at two) charges that count in the decode step too, and its rows carry
    it (found in review: the decode step took the model's one, the check rows the default)."""
    falcon = copy.deepcopy(REF["models"]["falcon-180b"])
    case = {"source": "splitwise", "gpu": "a100", "model": "falcon-180b", "tp": 8, "sequences": 1, "decode_ms": 60.0,
            "points": [{"prompt": 1024, "ttft_ms": 300.0}]}
    ref = {"gemm_cases": [], "attention_kernels": [], "operator_gemm_cases": [], "models": {"falcon-180b": falcon},
           "sources": {"splitwise": {"role": "held_out"}}}
    check = {}
    for count in (None, 2):
        stated = {**case, **({} if count is None else {"allreduces_per_layer": count})}
        rows = pf.rows(reference={**ref, "ttft_cases": [stated]})
        plain = next(r for r in rows if r.source == "splitwise")
        check[count] = next(r for r in rows if r.source == "splitwise+engine-step")
        assert check[count].allreduces_per_layer == plain.allreduces_per_layer == (count or 1)
        check[count] = check[count].simulated_ms - plain.simulated_ms  # the excess charged
    model, gpu = pf.model_from_shape("falcon-180b", falcon), get_gpu(pf.PRESET["a100"])
    one_reduce = model.num_layers * parallel.allreduce_s(gpu, 8, model.hidden_size * model.param_bytes) * 1e3
    assert check[None] - check[2] == pytest.approx(one_reduce, rel=1e-9)


def test_error_rows_are_plain_rows_per_source_and_regime():
    rows = pf.error_rows()
    assert {r["regime"] for r in rows} == {"gemm", "attention", "ttft"}
    assert {r["role"] for r in rows} == {"fit", "held_out", "check"}
    assert all(r["reference_ms"] > 0 and r["simulated_ms"] > 0 for r in rows)
    r = rows[0]
    assert r["error_pct"] == pytest.approx(100 * (r["simulated_ms"] / r["reference_ms"] - 1))


@pytest.mark.parametrize("name", sorted(REF["models"]))
def test_every_reference_model_prices_monotone_in_prompt_and_tp(name):
    """Each TTFT model of the data file, on each GPU it was measured on: a longer prompt takes longer at every TP it
    can shard to, and from 1K tokens up a wider TP is faster (the GEMMs and attention split, the all-reduces do not
    grow with TP): the mechanisms the held-out rows test, checked where no row exists too."""
    model = pf.model_from_shape(name, REF["models"][name])
    gpus = pf._gpus(None)
    for key in sorted({c["gpu"] for c in REF["ttft_cases"] if c["model"] == name}):
        gpu = gpus[key]
        tps = [tp for tp in (1, 2, 4, 8) if model.num_kv_heads % tp == 0 and model.num_attention_heads % tp == 0
               and model.weight_bytes / tp < 0.9 * gpu.hbm_bytes and (tp == 1 or gpu.name in parallel.NVLINK_OF)]
        for tp in tps:
            t = [parallel.tp_prefill_s(model, gpu, tp, n) for n in (128, 512, 1024, 2048, 4096, 8192)]
            assert all(b > a for a, b in zip(t, t[1:])), (key, tp)
        for n in (1024, 4096):
            t = [parallel.tp_prefill_s(model, gpu, tp, n) for tp in tps]
            assert all(b < a for a, b in zip(t, t[1:])), (key, n)


def test_the_dli_first_token_latencies_are_a_check_priced_as_one_batched_prefill():
    """The TensorRT-LLM 0.9 table's first-token column (the decode fit source's own rows): every measured row priced
    as one static batch, role check (from the data file), never in the held-out figure, never read by the fit."""
    from tiersim.simulator import decode_fidelity as df
    from tiersim.simulator import engines, prefill

    doc = df.load()
    measured = [p for p in doc["points"] if p["source"] == pf.DLI_SOURCE and "first_token_ms" in p]
    dli = [r for r in ROWS if r.source == pf.DLI_TTFT]
    assert doc["sources"][pf.DLI_SOURCE]["ttft_role"] == "check" and len(dli) == len(measured) == 268
    assert {r.role for r in dli} == {"check"} and {r.gpu for r in dli} == {"a100", "h100"}
    assert max(r.sequences for r in dli) == 896 and {r.tokens for r in dli} == {128, 2048}
    held = [r for r in ROWS if r.role == "held_out"]
    assert SUMMARY["held_out"]["points"] == len(held) and not any(r.source == pf.DLI_TTFT for r in held)
    p, r = measured[0], dli[0]
    model = df.model_for(doc, p["model"])
    gpu = engines.apply(get_gpu(pf.PRESET[pf.DLI_GPUS[p["gpu"]]]), "trtllm", model.num_layers)
    assert r.simulated_ms == float(prefill.prefill_s(model, gpu, p["input"], sequences=p["batch"])) * 1e3
    # what docs/simulator.md says of it: the H100's GPT-J is the worst miss, on the fast side
    gptj = [x.error_pct for x in dli if x.gpu == "h100" and x.model == "gpt-j-6b"]
    assert statistics.median(gptj) < -25.0 and SUMMARY[pf.DLI_TTFT]["worst_pct"] == -min(x.error_pct for x in dli)



def test_a_line_that_changes_nothing_reprices_nothing(monkeypatch):
    """``line_rows`` re-prices a row as :func:`rows` prices it but for the line: with the shipped GEMM efficiency and
    no cost per layer every row is unchanged, the DLI rows' engine preset included (found in review: those rows
    were re-priced without it; today's trtllm preset changes no prefill term, so the preset here gains a host cost)."""
    from tiersim.simulator import engines

    real = engines.apply
    monkeypatch.setattr(engines, "apply", lambda gpu, name, layers: replace(real(gpu, name, layers),
                                                                             step_overhead=1e-3))
    gpus = pf._gpus(None)
    null = {k: (gpus[k].prefill_gemm_efficiency, 0.0) for k in ("a100", "h100")}
    before = {(r.source, r.gpu, r.model, r.tp, r.tokens, r.sequences): r.simulated_ms for r in pf.rows(gpus)}
    after = pf.line_rows(null, gpus)
    assert any(r.source == pf.DLI_TTFT for r in after)
    for r in after:
        assert r.simulated_ms == pytest.approx(before[(r.source, r.gpu, r.model, r.tp, r.tokens, r.sequences)],
                                               rel=1e-12), r


def test_a_trtllm_prefill_line_fitted_on_the_dli_check_is_not_what_the_held_out_sources_say():
    """The exploratory line (GEMM efficiency + a cost per layer per forward, fitted on the DLI first-token rows only)
    fits its own rows but not the held-out TensorRT-LLM TTFTs: the H100 rows flip from too fast to too slow and
    TensorRT-LLM v0.5 gets worse, which is why no preset carries it (docs/simulator.md, "Prefill")."""
    line = pf.fit_dli_line()
    assert set(line) == {"a100", "h100"}
    assert all(pf.LINE_GRID[0] < e < pf.LINE_GRID[-1] and f > 0 for e, f in line.values())
    # the fit reads the DLI rows only: a GPU table whose held-out-only preset (gh200) is doctored gives the same line
    doctored = {**pf._gpus(None), "gh200": get_gpu("h100-pcie")}
    assert pf.fit_dli_line(doctored) == line
    fitted = pf.summary(pf.line_rows(line))
    assert fitted[pf.DLI_TTFT]["median_pct"] < 0.5 * SUMMARY[pf.DLI_TTFT]["median_pct"]
    # worse on both TensorRT-LLM releases' own published page, 0.9 (the DLI table's own release) included
    for source in ("trtllm-v0.5-a100", "trtllm-v0.9-a100"):
        assert fitted[source]["median_pct"] > SUMMARY[source]["median_pct"], source
    h100 = {r.model: r.error_pct for r in ROWS if r.source == "argonne-trtllm" and r.gpu == "h100"}
    h100_line = {r.model: r.error_pct for r in pf.line_rows(line) if r.source == "argonne-trtllm" and r.gpu == "h100"}
    assert all(h100[m] < -5.0 and h100_line[m] > 5.0 for m in h100)
    # GPUs the line was not fitted on (nor read from) are priced as shipped
    shipped = {(r.model, r.tokens): r.simulated_ms for r in ROWS if r.source == "argonne-trtllm" and r.gpu == "gh200"}
    assert {(r.model, r.tokens): r.simulated_ms for r in pf.line_rows(line)
            if r.source == "argonne-trtllm" and r.gpu == "gh200"} == shipped


@pytest.mark.parametrize("trace", sorted(pf.ENGINE_LINES))
def test_the_served_traces_keep_requests_that_ran_alone_and_check_the_engine_line(trace):
    """DistServe's served traces (the engines its two profile lines measure): the data file holds only prompts that ran
    alone in several runs (their median); the simulator misses them on the fast side as it does the profiles, and the
    engine line fitted on the profile alone (never on the trace) brings each closer: the rows `<trace>+line`."""
    profile = pf.ENGINE_LINES[trace]
    case = next(c for c in REF["ttft_cases"] if c["source"] == trace)
    assert (case["gpu"], case["model"], case["sequences"]) == ("a100", "opt-13b", 1)
    assert all(p["runs"] >= 3 and p["range_ms"][0] <= p["ttft_ms"] <= p["range_ms"][1] for p in case["points"])
    assert SUMMARY[trace]["median_signed_pct"] < -10.0
    line = pf.fit_engine_line(ROWS, profile)
    # fitted on the profile only: tripling the trace's measurements leaves the line as it is
    doctored = [r if r.source != trace else r.__class__(**{**r.__dict__, "reference_ms": 3 * r.reference_ms})
                for r in ROWS if "+" not in r.source]
    assert pf.fit_engine_line(doctored, profile) == line
    checked = pf.summary(pf.engine_line_rows(line, ROWS, trace))[f"{trace}+line"]
    assert checked == SUMMARY[f"{trace}+line"] and checked["role"] == "check"
    assert checked["median_pct"] < 0.5 * SUMMARY[trace]["median_pct"]
    with pytest.raises(ValueError):
        pf.fit_engine_line(ROWS, source="no-such-source")


def test_the_docs_state_the_vllm_engine_line():
    m = re.search(r"([\d.]+) × the simulated time \+ ([\d.]+) ms,\s+least squares on distserve-vllm only", PREFILL_DOC)
    line = pf.fit_engine_line(ROWS)
    assert m and line == (pytest.approx(float(m[1]), abs=0.0005), pytest.approx(float(m[2]), abs=0.005))


#: The forward-length bins (reference ms) of docs/simulator.md's "Sustained clocks" paragraph.
LENGTH_BINS = [(0.0, 30.0), (30.0, 100.0), (100.0, 300.0), (300.0, 1000.0), (1000.0, float("inf"))]


def _signed_by_length(source: str, gpu: str) -> list[float | None]:
    out = []
    for lo, hi in LENGTH_BINS:
        e = [r.error_pct for r in ROWS if r.source == source and r.gpu == gpu and lo <= r.reference_ms < hi]
        out.append(statistics.median(e) if e else None)
    return out


def test_the_h100_ttft_misses_do_not_grow_with_the_forward_length():
    """Why no sustained-clock factor by forward length is modelled (docs/simulator.md, "Sustained clocks"): within one
    engine and GPU, the DLI check's H100 forwards of 30 ms and of over 1 s miss alike while the same table's A100 rows
    rise with length; Splitwise's TP 2 H100 rows drift by about what a slower attention kernel adds at 8K tokens. The
    stated figures are recomputed here, so a physics change that moves them (or makes the DLI H100 misses follow the
    length) fails until the docs say so."""
    text = re.sub(r"\s+", " ", PREFILL_DOC)
    m = re.search(r"DLI check's H100 rows are ([^%]+)% \(median signed\) at 30-100 ms / 0.1-0.3 s / 0.3-1 s / over 1 s "
                  r"\(([^%]+)% under 30 ms.*?its A100 rows go from ([^%]+)% to ([^%]+)%; Splitwise's H100 rows "
                  r"([^%]+)% over the same bins", text)
    assert m, "docs/simulator.md no longer states the H100 misses by forward length"
    dli_h100, dli_a100 = _signed_by_length(pf.DLI_TTFT, "h100"), _signed_by_length(pf.DLI_TTFT, "a100")
    split_h100 = _signed_by_length("splitwise", "h100")
    assert [_pct(c) for c in m[1].split("/")] == pytest.approx(dli_h100[1:], abs=0.05 + 1e-9)
    assert _pct(m[2]) == pytest.approx(dli_h100[0], abs=0.05 + 1e-9)
    assert (_pct(m[3]), _pct(m[4])) == pytest.approx((dli_a100[1], dli_a100[-1]), abs=0.05 + 1e-9)
    assert split_h100[0] is None
    assert [_pct(c) for c in m[5].split("/")] == pytest.approx(split_h100[1:], abs=0.5 + 1e-9)
    assert max(dli_h100[1:]) - min(dli_h100[1:]) < 2.0  # flat from 30 ms to seconds
    assert dli_a100[-1] - dli_a100[1] > 10.0  # the A100's rise, the other way
    # Splitwise at TP 2 (no large-step all-reduce): the drift with length, and what attention at half its fitted rate
    # would add at 8K tokens (the attention term's time once more, less its fixed cost).
    tp2 = {(r.gpu, r.tokens): r for r in ROWS if r.source == "splitwise" and r.tp == 2}
    d = re.search(r"at TP 2 they drift from ([^%]+)% at 512 tokens to ([^%]+)% at 8K .*?half FlashAttention-3's rate "
                  r"would add \(([\d.]+)% of the simulated 8K forward.*?its A100 TP 2 rows go ([^%]+)% → ([^%]+)%\.",
                  text)
    assert d, "docs/simulator.md no longer states Splitwise's TP 2 drift"
    assert (_pct(d[1]), _pct(d[2])) == pytest.approx((tp2["h100", 512].error_pct, tp2["h100", 8192].error_pct),
                                                    abs=0.05 + 1e-9)
    assert (_pct(d[4]), _pct(d[5])) == pytest.approx((tp2["a100", 512].error_pct, tp2["a100", 8192].error_pct),
                                                    abs=0.05 + 1e-9)
    gpus = {k: get_gpu(v) for k, v in pf.TTFT_PRESET.items()}
    no_attn = {k: replace(g, prefill_attn_efficiency=g.prefill_attn_efficiency / 2) for k, g in gpus.items()}
    slow = {(r.gpu, r.tokens): r for r in pf.rows(no_attn) if r.source == "splitwise" and r.tp == 2}
    share = (slow["h100", 8192].simulated_ms / tp2["h100", 8192].simulated_ms - 1) * 100
    assert share == pytest.approx(float(d[3]), abs=0.05 + 1e-9)

"""Real engines' whole decode runs from sources no constant was fitted on (tiersim/data/public-decode-steps.json),
priced by ``decode_fidelity``: the file's citations and roles, the run classification, and held-out bounds that a
physics regression would cross (derived from the same runs, not copied results)."""

import copy
import re
import statistics
from dataclasses import replace
from pathlib import Path

import pytest

from tiersim.simulator import decode_fidelity as df
from tiersim.simulator import engines, physics, presets
from tiersim.simulator.presets import GB, get_gpu

DECODE = ("decode small batch", "decode large batch")


def bandwidth_only(gpu):
    """The naive predictor: weights and KV at the datasheet bandwidth, nothing else (no kernel, small-op or
    attention-floor cost, no batch slowdown)."""
    return replace(gpu, weight_efficiency=1.0, attn_efficiency=1.0, gemm_kernel_s=0.0, attn_kernel_s=0.0,
                   gemm_batch_slowdown=0.0, layer_overhead=0.0, layer_overhead_per_width=0.0)


@pytest.fixture(scope="module")
def shipped():
    return df.summary(df.points())


def test_every_source_is_cited_with_a_role_and_priced_with_a_named_engine_preset():
    doc = df.load()
    for name, src in doc["sources"].items():
        assert src["role"] in ("fit", "held_out", "check"), name
        assert "@ " in src["where"] and src["engine_overhead"] in engines.names(), name
    # every engine preset fitted on a source here is checked on another source it was not fitted on
    fitted = {s["engine_overhead"] for s in doc["sources"].values() if s["role"] == "fit"}
    held = {s["engine_overhead"] for s in doc["sources"].values() if s["role"] == "held_out"}
    assert fitted and fitted <= held
    for key, spec in doc["gpus"].items():
        assert spec["source"] and df.gpu_for(doc, key).hbm_bw > 0
    for key, spec in doc["models"].items():
        assert spec["config"].startswith("huggingface.co/") and df.model_for(doc, key).num_layers == spec["num_layers"]
    assert {p["source"] for p in doc["points"]} == set(doc["sources"])
    assert all(p["gpu"] in doc["gpus"] and p["model"] in doc["models"] for p in doc["points"])
    # the A100 runs are read as the 40 GB A100 preset: its capacity and datasheet bandwidth, the A100 fit's constants
    # (its HBM shares through the measured stream ratio, never a figure fitted on these held-out runs)
    a100 = df.gpu_for(doc, "a100-40gb")
    assert a100 == get_gpu("a100-40g") and a100.hbm_bytes == 40e9 and a100.hbm_bw < get_gpu("a100-80g").hbm_bw
    assert a100.weight_efficiency == get_gpu("a100-80g").weight_efficiency * presets.stream_share_ratio(
        "a100-40g", a100.hbm_bw, get_gpu("a100-80g").hbm_bw)
    assert a100.gemm_kernel_s == get_gpu("a100-80g").gemm_kernel_s


def test_regime_names_what_a_point_measures():
    doc = df.load()
    model, gpu = df.model_for(doc, "llama-2-7b"), df.gpu_for(doc, "h100")
    fits = 0.9 * gpu.hbm_bytes - model.weight_bytes - 1 * GB  # bytes of KV an engine keeps beside the weights
    tokens = int(fits / model.kv_bytes_per_token)
    ok = 1.0  # a plausible time (s) per output token for any point below: not the failed-run case
    assert df.regime(model, gpu, 1, 256, ok, 0.01) == "decode small batch"
    assert df.regime(model, gpu, 16, 256, ok, 0.01) == "decode large batch"
    assert df.regime(model, gpu, 16, 256, ok, 0.2).startswith("decode run, prefill")
    assert df.regime(model, gpu, 2, tokens // 2 - 8, ok, 0.01) == "decode small batch"
    assert df.regime(model, gpu, 2, tokens // 2 + 8, ok, 0.01).startswith("preempted")
    # faster than one read of the weights per output token at the datasheet bandwidth: a failed measurement
    weights_s = model.weight_bytes / gpu.hbm_bw
    assert df.regime(model, gpu, 1, 256, 0.9 * weights_s, 0.01).startswith("failed")
    assert df.regime(model, gpu, 1, 256, 1.1 * weights_s, 0.01) == "decode small batch"
    # the source table's own failed rows are the ones classified so (TensorRT-LLM Qwen2-7B at L = 2048)
    failed = {(p.source, p.model, p.length) for p in df.points() if p.regime.startswith("failed")}
    assert failed == {("argonne-trtllm", "qwen2-7b", 2048)}


def test_points_are_priced_as_the_source_measured_them():
    doc = df.load()
    model, gpu = df.model_for(doc, "llama-3-8b"), df.gpu_for(doc, "h100")
    steps = df.decode_steps_s(model, gpu, 4, 256, 255)
    assert len(steps) == 255 and all(steps[1:] >= steps[:-1])  # one step per context, growing with it
    pts = {(p.source, p.gpu, p.model, p.batch, p.length): p for p in df.points()}
    # a whole run (its engine preset applied): batched prefill + the L - 1 further steps, over L tokens
    gpu = engines.apply(gpu, "trtllm", model.num_layers)
    p = pts[("argonne-trtllm", "h100", "llama-3-8b", 1, 256)]
    run = df.prefill_batch_s(model, gpu, 1, 256) + df.decode_steps_s(model, gpu, 1, 256, 255).sum()
    assert p.simulated_ms == pytest.approx(1e3 * run / 256) and p.prefill_share > 0
    # a token-to-token latency: the mean of the O - 1 steps after the first token, no prefill
    gj = df.model_for(doc, "gpt-j-6b")
    a100 = engines.apply(df.gpu_for(doc, "a100-80gb"), "trtllm", gj.num_layers)
    row, q = next((r, q) for r, q in zip(doc["points"], df.points()) if r["source"] == "nvidia-dli-trtllm"
                  and r["model"] == "gpt-j-6b" and r["gpu"] == "a100-80gb" and r["batch"] == 8 and r["input"] == 2048)
    mean = df.decode_steps_s(gj, a100, 8, 2048, row["output"] - 1).mean()
    assert q.simulated_ms == pytest.approx(1e3 * mean) and q.prefill_share == 0 and q.reference_ms == row["t2t_ms"]
    assert gj.mlp_matrices == 2  # GPT-J's MLP is a plain up + GELU + down, as its config says


def test_held_out_decode_error_stays_far_below_the_bandwidth_only_predictor(shipped):
    """Per source and decode regime, the shipped physics' held-out median |error| is under a third of what the
    bandwidth-only predictor misses the same runs by: dropping a term (kernel costs, attention floor, small ops,
    the engine line) or breaking one moves it toward that predictor."""
    naive = df.summary(df.points(engine_overrides={s: "none" for s in df.load()["sources"]},
                                 gpu_transform=bandwidth_only))
    checked = 0
    for key, v in shipped.items():
        if key[1] in DECODE:
            assert v["median_pct"] < naive[key]["median_pct"] / 3, key
            assert len(v["gpus"]) == 2 and len(v["models"]) >= 3, key
            checked += 1
    assert {key[0] for key, _ in shipped.items() if key[1] in DECODE} == set(df.load()["sources"]) and checked >= 6


def test_unsplit_attention_blocks_slow_batch_one_only():
    """The trtllm preset's per-block rate: batch 1 x 16 KV heads (GPT-J) reads far below the HBM share, a batch
    whose blocks exceed the saturation point is priced exactly as without the limit."""
    doc = df.load()
    gj, h100 = df.model_for(doc, "gpt-j-6b"), get_gpu("h100-sxm")
    trt = engines.apply(h100, "trtllm", gj.num_layers)
    assert trt.attn_block_bw > 0 and engines.apply(h100, "none", gj.num_layers).attn_block_bw == 0
    kv = 3072 * gj.kv_bytes_per_token_layer
    slow, fast = float(physics.attention_s(trt, kv, blocks=16)), float(physics.attention_s(h100, kv, blocks=16))
    assert slow > 2 * fast  # 16 blocks x 38.5 GB/s is a fifth of the H100's share
    saturated = 64 * gj.num_kv_heads
    assert float(physics.attention_s(trt, 64 * kv, blocks=saturated)) == float(physics.attention_s(h100, 64 * kv))
    assert float(physics.layer_s(gj, trt, 64, 64 * kv)) == float(physics.layer_s(gj, h100, 64, 64 * kv))
    assert float(physics.layer_s(gj, trt, 1, kv)) > float(physics.layer_s(gj, h100, 1, kv))


def _held_out_tripled(doc: dict) -> dict:
    """A copy of the data file with every held-out and check source's measurement tripled: a fit that reads only
    its fit sources (by role) returns the same constants on it."""
    doctored = copy.deepcopy(doc)
    for p in doctored["points"]:
        if doctored["sources"][p["source"]]["role"] != "fit":
            for key in ("latency_s", "t2t_ms"):
                if key in p:
                    p[key] *= 3
    return doctored


def test_trtllm_block_rate_is_fitted_on_its_fit_source_only_and_holds_on_the_held_out_one(shipped):
    doc = df.load()
    fitted = df.fit_attention_block_bw("trtllm")
    shipped_rates = dict(engines.get("trtllm").attn_block_bw)
    assert set(fitted) == set(shipped_rates)
    for gpu, rate in fitted.items():
        assert shipped_rates[gpu] == pytest.approx(rate, rel=5e-4), gpu  # the preset carries the fit
    # the fit reads fit sources only: tripling every held-out and check figure leaves it unchanged
    assert df.fit_attention_block_bw("trtllm", _held_out_tripled(doc)) == fitted
    # held out (another TensorRT-LLM, other machines): the small-batch targets, and better than no limit
    small = shipped[("argonne-trtllm", "decode small batch")]
    assert small["median_pct"] <= 3.0 and small["worst_pct"] <= 10.0
    assert len(small["gpus"]) == 2 and len(small["models"]) >= 3
    unlimited = df.summary(df.points(engine_overrides={"argonne-trtllm": "none"}))
    assert small["median_pct"] < unlimited[("argonne-trtllm", "decode small batch")]["median_pct"]


def test_vllm_sync_line_explains_vllm_0_5_and_meets_the_small_batch_worst_target(shipped):
    """vLLM 0.5 is a synchronous engine: its runs priced with vllm-sync (vidur's CPU line, fitted elsewhere) are
    closer than with no engine cost or with the v0.11 vllm preset, and within the issue's 10% small-batch worst."""
    for other in ("none", "vllm"):
        alt = df.summary(df.points(engine_overrides={"argonne-vllm": other}))
        for reg in DECODE:
            assert shipped[("argonne-vllm", reg)]["median_pct"] < alt[("argonne-vllm", reg)]["median_pct"], (other, reg)
    assert shipped[("argonne-vllm", "decode small batch")]["worst_pct"] <= 10.0


def test_sliding_window_runs_under_vllm_0_5_are_apart_by_the_config_not_by_their_error():
    """vLLM 0.5 runs a sliding-window config on its XFormers backend (vLLM's PagedAttention decode kernel), which
    vllm-sync does not price: every such run is reported apart, whatever it measured, on every GPU and batch; the
    same model under TensorRT-LLM (no such fallback) and vLLM's full-attention models stay priced. The rule only
    labels: the simulated times are those of the same runs without it."""
    doc = df.load()
    rule = doc["sources"]["argonne-vllm"]["sliding_window_kernel"]
    assert "selector.py" in rule and "@ " in rule and "pull/3648" in rule  # the engine's code, cited
    measured = {(p["source"], p["model"]) for p in doc["points"]}
    apart = {(s, m) for s, m in measured if df.other_kernel(doc, s, m)}
    assert apart == {("argonne-vllm", "mistral-7b-v0.1")}
    assert doc["models"]["mistral-7b-v0.1"]["sliding_window"] == 4096 and "sliding_window" not in doc["models"]["qwen2-7b"]
    pts = df.points()
    for p in pts:
        assert (p.regime == df.OTHER_KERNEL) == ((p.source, p.model) in apart), (p.source, p.model, p.batch, p.length)
    assert {(p.gpu, p.batch) for p in pts if p.regime == df.OTHER_KERNEL} >= {(g, b) for g in ("a100-40gb", "h100")
                                                                                 for b in (1, 16, 32, 64)}
    # TensorRT-LLM's Mistral-7B on the same H100 is priced, and within what that source's large batches miss elsewhere
    trt = [p for p in pts if p.source == "argonne-trtllm" and p.model == "mistral-7b-v0.1" and p.gpu == "h100"
           and p.regime in DECODE]
    assert len(trt) >= 15 and max(abs(p.error_pct) for p in trt) <= 15.0
    # whatever the runs measured (here: exactly what the simulator says), they stay apart
    doctored = copy.deepcopy(doc)
    for row, p in zip(doctored["points"], pts):
        if (p.source, p.model) in apart:
            row["latency_s"] = p.simulated_ms * 1e-3 * row["length"]
    assert all(q.regime == df.OTHER_KERNEL for q in df.points(doctored) if (q.source, q.model) in apart)
    # without the model's window the same runs are priced identically and fall into the ordinary regimes
    windowless = copy.deepcopy(doc)
    del windowless["models"]["mistral-7b-v0.1"]["sliding_window"]
    back = df.points(windowless)
    assert [p.simulated_ms for p in back] == [p.simulated_ms for p in pts]
    assert not any(p.regime == df.OTHER_KERNEL for p in back)
    # first among the rules: a point apart for its kernel is not also counted as preempted or failed
    model, gpu = df.model_for(doc, "mistral-7b-v0.1"), df.gpu_for(doc, "a100-40gb")
    assert df.regime(model, gpu, 64, 4096, 1.0, 0.0).startswith("preempted")
    assert df.regime(model, gpu, 64, 4096, 1.0, 0.0, kernel_apart=True) == df.OTHER_KERNEL
    assert df.regime(model, gpu, 1, 256, 1e-9, 0.0, kernel_apart=True) == df.OTHER_KERNEL


def _no_rereads(gpu):
    return replace(gpu, attn_kv_reread_share=0.0)


def test_gqa_rereads_cost_nothing_under_l2_or_for_mha_and_their_share_of_the_rest_beyond():
    """``physics.reread_bytes``: (group - 1) x KV x share x the share of the layer's KV outside L2; none while it
    fits in L2 or for a group of 1, and the engine preset sets the share on the GPUs it was fitted on only."""
    doc = df.load()
    mistral = df.model_for(doc, "mistral-7b-v0.1")
    group = physics.gqa_group(mistral)
    assert group == 4 and physics.gqa_group(df.model_for(doc, "llama-2-7b")) == 1
    for preset in ("h100-sxm", "a100-80g", "a100-40g"):
        trt = engines.apply(get_gpu(preset), "trtllm", mistral.num_layers)
        share = trt.attn_kv_reread_share
        assert 0 < share < 1 and share == engines.get("trtllm").reread_share(get_gpu(preset))
        small, big = 0.5 * trt.l2_bytes, 8 * trt.l2_bytes
        assert float(physics.reread_bytes(trt, small, group)) == 0.0
        assert float(physics.reread_bytes(trt, big, 1)) == 0.0
        assert float(physics.reread_bytes(trt, big, group)) == pytest.approx((group - 1) * big * share * (1 - 1 / 8))
        assert float(physics.attention_s(trt, small, group=group)) == float(physics.attention_s(trt, small))
    # a GPU the share was not fitted on (nor reads the constants of) gets none; no other preset carries one
    assert engines.apply(get_gpu("h200"), "trtllm", 32).attn_kv_reread_share == 0.0
    assert all(not e.kv_reread_share for n, e in engines.presets().items() if n != "trtllm")


def test_a_mixed_step_charges_the_same_gqa_rereads_as_a_decode_step():
    """A prefill chunk beside the decode rows leaves their attention's re-reads as they are (``prefill.mixed_layer_s``
    passes the model's group as ``physics.layer_s`` does): the serving simulator prices both alike."""
    from tiersim.simulator import prefill

    doc = df.load()
    mistral = df.model_for(doc, "mistral-7b-v0.1")
    trt = engines.apply(get_gpu("h100-sxm"), "trtllm", mistral.num_layers)
    kv = 64 * 2048 * mistral.kv_bytes_per_token_layer
    decode = [float(prefill.mixed_layer_s(mistral, g, 64, kv, 0)) for g in (trt, _no_rereads(trt))]
    mixed = [float(prefill.mixed_layer_s(mistral, g, 64, kv, 256, 512)) for g in (trt, _no_rereads(trt))]
    assert decode[0] > decode[1]
    assert mixed[0] - mixed[1] == pytest.approx(decode[0] - decode[1])


def test_trtllm_reread_share_is_fitted_on_its_fit_source_only_and_the_preset_carries_it():
    """``fit_kv_reread_share`` reproduces the preset's shares from the data (a change to the fit source's points
    that moves the fit fails here) and never reads a held-out or check source. The block-rate fit, which prices with
    these shares, returns the shipped rates (test_trtllm_block_rate_is_fitted_...), so the two fits are a fixed
    point of each other."""
    doc = df.load()
    fitted = df.fit_kv_reread_share("trtllm")
    assert fitted == dict(engines.get("trtllm").kv_reread_share)
    assert set(fitted) == {"a100-80g", "h100-sxm"} and all(0 < v < 1 for v in fitted.values())
    # held-out and check figures tripled: the same fit
    assert df.fit_kv_reread_share("trtllm", _held_out_tripled(doc)) == fitted
    # the fit source's GQA large batches 15% slower on the H100: more of the re-reads reach HBM there, the A100 as it was
    slower = copy.deepcopy(doc)
    for p in slower["points"]:
        if (p["source"] == "nvidia-dli-trtllm" and p["model"] == "mistral-7b-v0.1" and p["batch"] > df.SMALL_BATCH
                and slower["gpus"][p["gpu"]]["preset"] == "h100-sxm"):
            p["t2t_ms"] *= 1.15
    moved = df.fit_kv_reread_share("trtllm", slower)
    assert moved["h100-sxm"] > fitted["h100-sxm"] and moved["a100-80g"] == fitted["a100-80g"]


def test_trtllm_rereads_improve_held_out_large_batches_and_leave_batch_one_and_mha_unchanged(shipped):
    """Held out (Argonne's TensorRT-LLM runs, nothing fitted on them): the shipped share against the same preset
    without it. Batch 16-64's median |error| falls on each GPU; every batch-1 point and every multi-head model's
    point is priced exactly as without the term (a batch-1 layer's KV fits in L2; MHA has no group); other engines'
    points do not move."""
    doc = df.load()
    off = {(p.source, p.gpu, p.model, p.batch, p.length): p for p in df.points(gpu_transform=_no_rereads)}
    on = {(p.source, p.gpu, p.model, p.batch, p.length): p for p in df.points()}
    groups = {k: physics.gqa_group(df.model_for(doc, k)) for k in doc["models"]}
    moved = 0
    for key, p in on.items():
        q = off[key]
        if p.batch == 1 or groups[p.model] == 1 or p.engine != "trtllm":
            assert p.simulated_ms == q.simulated_ms, key
        else:
            assert p.simulated_ms >= q.simulated_ms, key
            moved += p.simulated_ms > q.simulated_ms
    assert moved >= 50
    large = [k for k, p in on.items() if k[0] == "argonne-trtllm" and p.regime == "decode large batch"]
    for gpu in ("all", *sorted({k[1] for k in large})):
        pick = [k for k in large if gpu in ("all", k[1])]
        after = statistics.median(abs(on[k].error_pct) for k in pick)
        before = statistics.median(abs(off[k].error_pct) for k in pick)
        assert after < 0.9 * before, gpu
    assert shipped[("argonne-trtllm", "decode large batch")]["median_pct"] == pytest.approx(
        statistics.median(abs(on[k].error_pct) for k in large))


DOC = (Path(__file__).resolve().parent.parent / "docs" / "simulator.md").read_text()
DECODE_DOC = DOC[DOC.index("## Fidelity against sources nobody fitted on"):DOC.index("## Calibration")]
GQA_DOC = DECODE_DOC[DECODE_DOC.index("**The trtllm preset's GQA KV re-reads**"):DECODE_DOC.index("Held out, batch 16-64 goes")]
GPU_WORD = {"A100": ("a100-40g", "a100-80g"), "H100": ("h100-sxm",), "H200": ("h200",)}


def _pct(cell: str) -> float:
    return float(cell.strip().strip("*").replace("\u2212", "-").rstrip("%"))


def _by(pts, source, regime, preset=None):
    doc = df.load()
    return [p for p in pts if p.source == source and p.regime == regime
            and (preset is None or doc["gpus"][p.gpu]["preset"] == preset)]


def test_the_docs_trtllm_decode_rows_are_what_the_code_gives():
    """docs/simulator.md's decode table, the rows of the sources priced with trtllm: points, median and worst |error|
    and each GPU's median signed error, as the code computes them (a change to the preset or the data fails here
    until the docs say so)."""
    pts = df.points()
    doc = df.load()
    rows = 0
    for line in DECODE_DOC.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 7 or ", trtllm)" not in cells[0]:
            continue
        source, regime = cells[0].split()[0], cells[1].split(" (")[0]
        sel = _by(pts, source, regime)
        assert len(sel) == int(cells[2]), (source, regime)
        assert statistics.median(abs(p.error_pct) for p in sel) == pytest.approx(_pct(cells[4]), abs=0.005 + 1e-9)
        assert max(abs(p.error_pct) for p in sel) == pytest.approx(_pct(cells[5]), abs=0.05 + 1e-9)
        for word, value in re.findall(r"(A100|H100|H200) ([+\u2212-][\d.]+)%", cells[6]):
            signed = [p.error_pct for p in sel if doc["gpus"][p.gpu]["preset"] in GPU_WORD[word]]
            assert statistics.median(signed) == pytest.approx(_pct(value), abs=0.05 + 1e-9), (source, regime, word)
        rows += 1
    assert rows == 5


def test_the_docs_gqa_reread_table_is_what_the_code_gives():
    """The GQA paragraph's table: the same runs with the share off and as shipped, per source, shipped regime and GPU
    preset (runs, then median / worst / median signed for each)."""
    on = df.points()
    off = df.points(gpu_transform=_no_rereads)
    doc = df.load()
    rows = 0
    for line in GQA_DOC.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not cells[3].isdigit():
            continue
        source, regime, preset = cells[:3]
        pick = [i for i, p in enumerate(on) if p.source == source and p.regime == regime
                and doc["gpus"][p.gpu]["preset"] == preset]
        assert len(pick) == int(cells[3]), cells[:3]
        for pts, cell in ((off, cells[4]), (on, cells[5])):
            median, worst, signed = (_pct(x) for x in cell.split(" / "))
            errors = [pts[i].error_pct for i in pick]
            assert statistics.median(map(abs, errors)) == pytest.approx(median, abs=0.005 + 1e-9), cells[:3]
            assert max(map(abs, errors)) == pytest.approx(worst, abs=0.05 + 1e-9), cells[:3]
            assert statistics.median(errors) == pytest.approx(signed, abs=0.05 + 1e-9), cells[:3]
        rows += 1
    assert rows == 12

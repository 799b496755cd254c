"""The graph executor (tiersim.validator.graph*): bit-identical to TieredCache on CPU, refusals, the grid's file.

The CUDA graph itself needs a GPU (the tests marked ``cuda`` are skipped without one); on CPU the same
step runs eagerly, and its exact shape is held bit for bit to ``TieredCache`` for every split.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from graph_exact import assert_exact_step_follows_the_cache
from tiersim.errors import TiersimError

CUDA = torch.cuda.is_available()
B_CONTEXT = 120


@pytest.fixture(scope="module")
def model():
    from tiersim.validator.shapes import build_model, get_shape

    torch.manual_seed(0)
    return build_model(get_shape("tiny"), "cpu", dtype=torch.float32)


def _pair(model, hbm: float, batch: int, steps: int, device="cpu", split=None, **policy):
    """A TieredCache and TierBuffers filled with the same synthetic prefill (same seed, same draws); ``split``
    (ddr, compressed, evict) beside ``hbm``, by default all of the rest in DDR."""
    from tiersim.hierarchy.cache import TieredCache
    from tiersim.hierarchy.config import TierConfig
    from tiersim.validator.decode import synthetic_prefill, tier_config
    from tiersim.validator.graph_run import load_synthetic
    from tiersim.validator.graph_tiers import TierBuffers

    if split is None:
        config = tier_config(hbm, **policy)
    else:
        ddr, comp, evict = split
        config = TierConfig(hbm=hbm, ddr=ddr, compressed=comp, evict=evict, quant_group=16, **policy)
    cache = TieredCache(config)
    with torch.inference_mode():
        synthetic_prefill(model, cache, batch, B_CONTEXT, torch.Generator(device=device).manual_seed(0))
    cfg = model.config
    buffers = TierBuffers(config, cfg.num_hidden_layers, batch, cfg.num_key_value_heads, cfg.head_dim, B_CONTEXT,
                          steps, device, model.dtype)
    with torch.inference_mode():
        load_synthetic(buffers, model, torch.Generator(device=device).manual_seed(0))
    return cache, buffers


def _attention_outputs(model, sink: list):
    """Hooks that append every layer's attention output (before o_proj's residual) to ``sink``."""
    return [layer.self_attn.register_forward_hook(lambda _m, _a, out: sink.append(out[0].clone()))
            for layer in model.model.layers]


def _assert_same_step(model, cache_arg, step, ids, i: int) -> None:
    """One decode step of ``ids`` through the model over the TieredCache (``cache_arg``) and through ``step``: the
    logits and every layer's attention output are equal bit for bit."""
    ref_attn, out_attn = [], []
    hooks = _attention_outputs(model, ref_attn)
    ref = model(input_ids=ids, **cache_arg, use_cache=True, logits_to_keep=1).logits
    for h in hooks:
        h.remove()
    hooks = _attention_outputs(model, out_attn)
    step.ids.copy_(ids)
    out = step.run()
    for h in hooks:
        h.remove()
    assert torch.equal(ref, out), f"step {i}: logits differ by {(ref - out).abs().max():.3g}"
    assert len(ref_attn) == len(out_attn) == model.config.num_hidden_layers
    assert all(torch.equal(a, b) for a, b in zip(ref_attn, out_attn)), f"step {i}: attention differs"


def _retier_and_compare(model, buffers, cache, i: int) -> dict:
    """Re-tier after decode step ``i + 1`` when due (the cache did inside that step); then every layer's retained
    tokens have the cache's tier codes and the counts are the cache's. Returns the tokens moved ({} if not due)."""
    from tiersim.hierarchy.policy import EVICTED

    moved = buffers.retier(i + 1) if buffers.due(i + 1) else {}
    n = buffers.n_seen
    for layer in range(model.config.num_hidden_layers):
        mine = buffers.layers[layer].tiers[:, :n]
        assert torch.equal(mine[mine != EVICTED].view(buffers.batch, -1), cache.layers[layer].tiers), (i, layer)
    assert buffers.counts(0) == cache.tier_counts(0)
    return moved


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("hbm", [1.0, 0.5, 0.25])
def test_exact_step_is_bit_identical_to_the_tiered_cache(model, hbm, batch):
    """Same inputs: every step's attention output and logits are equal bit for bit to TieredCache's, and the
    tiers are the cache's after the prefill and after every re-tiering (here every 4 steps)."""
    from tiersim.compat import cache_kwargs
    from tiersim.hierarchy import scoring
    from tiersim.validator.graph import GraphStep

    steps = 13
    cache, buffers = _pair(model, hbm, batch, steps, retier_every=4, recent_window=16)
    step = GraphStep(model, buffers, exact=True)
    ids = torch.randint(model.config.vocab_size, (steps, batch, 1), generator=torch.Generator().manual_seed(1))
    arg = cache_kwargs(model, cache)
    moved = 0
    try:
        with torch.inference_mode():
            for i in range(steps):
                _assert_same_step(model, arg, step, ids[i], i)
                m = _retier_and_compare(model, buffers, cache, i)
                moved += m.get("demoted", 0) + m.get("promoted", 0)
    finally:
        scoring.clear_listener()
    if hbm < 1.0:
        # the cache counts a re-tiering per layer that moved, its prefill placement included
        assert moved > 0 and buffers.retiers == 3 and cache.retiers == model.config.num_hidden_layers * 4
        assert buffers.counts(0)["ddr"] > 0


@pytest.mark.parametrize("hbm, split", [(1.0, None), (0.5, None), (0.5, (0.2, 0.2, 0.1)), (0.25, (0.35, 0.3, 0.1))])
def test_static_step_equals_the_exact_step_up_to_rounding(model, hbm, split):
    """The graph's shape (whole buffers under a mask; the compressed buffer dequantized whole, evicted slots
    masked) gives the exact step's logits within float rounding and the same tiers: the padding changes only
    the softmax's summation order."""
    from tiersim.validator.graph import GraphStep

    steps, batch = 9, 2
    _, exact_buf = _pair(model, hbm, batch, steps, split=split, retier_every=4, recent_window=16)
    _, static_buf = _pair(model, hbm, batch, steps, split=split, retier_every=4, recent_window=16)
    exact, static = GraphStep(model, exact_buf, exact=True), GraphStep(model, static_buf)
    _assert_static_follows_exact(model, exact, static, steps, 1e-5)


def _assert_static_follows_exact(model, exact, static, steps: int, bound: float) -> None:
    """``steps`` decode steps of the exact and the static step on the same random tokens, each re-tiering when
    due: logits within ``bound`` with the same greedy token, and every layer's tier codes equal throughout."""
    batch = exact.buffers.batch
    ids = torch.randint(model.config.vocab_size, (steps, batch, 1), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        for i in range(steps):
            exact.ids.copy_(ids[i])
            static.ids.copy_(ids[i])
            a, b = exact.run(), static.run()
            torch.testing.assert_close(b, a, rtol=bound, atol=bound)
            assert torch.equal(a.argmax(-1), b.argmax(-1))
            for buf in (exact.buffers, static.buffers):
                if buf.due(i + 1):
                    buf.retier(i + 1)
            n = exact.buffers.n_seen
            for la, lb in zip(exact.buffers.layers, static.buffers.layers):
                assert torch.equal(la.tiers[:, :n], lb.tiers[:, :n])


def _check_slots(buffers) -> None:
    """Every token is held exactly once, by HBM or DDR, and the tier codes say which."""
    from tiersim.hierarchy.policy import DDR, HBM

    for lt in buffers.layers:
        for row in range(buffers.batch):
            slots = torch.cat((lt.hbm_slots[row, : lt.n_hbm], lt.ddr_slots[row, : lt.n_ddr]))
            assert sorted(slots.tolist()) == list(range(buffers.n_seen))
            assert bool((lt.tiers[row, lt.ddr_slots[row, : lt.n_ddr]] == DDR).all())
            assert bool((lt.tiers[row, lt.hbm_slots[row, : lt.n_hbm]] == HBM).all())
            assert bool((lt.hbm_slots[row, lt.n_hbm :] == buffers.trash).all())


def test_retiering_moves_only_the_tokens_whose_tier_changed(model):
    """D2H bytes = the demotions (tokens that went HBM -> DDR), not the whole DDR tier; over several
    re-tierings of a batch whose rows swap different tokens, every token stays held exactly once, with
    the K/V it arrived with."""
    from tiersim.hierarchy.policy import DDR, HBM
    from tiersim.validator.graph import GraphStep

    _, buffers = _pair(model, 0.5, 4, 12, retier_every=3, recent_window=16)
    first = buffers.layers[0]  # layer 0's prefill tokens in HBM, by (row, slot)
    held = {(row, int(s)): first.hbm_k[row, :, i].clone() for row in range(buffers.batch)
            for i, s in enumerate(first.hbm_slots[row, : first.n_hbm])}
    step = GraphStep(model, buffers)
    d2h = 0
    for k in range(1, 10):
        with torch.inference_mode():
            step.run()
        if not buffers.due(k):
            continue
        before = [lt.tiers[:, : buffers.n_seen].clone() for lt in buffers.layers]
        moved = buffers.retier(k)
        after = [lt.tiers[:, : buffers.n_seen] for lt in buffers.layers]
        demoted = sum(int(((b == HBM) & (a == DDR)).sum()) for b, a in zip(before, after))
        promoted = sum(int(((b == DDR) & (a == HBM)).sum()) for b, a in zip(before, after))
        assert moved == {"demoted": demoted, "promoted": promoted, "compressed": 0, "evicted": 0}
        d2h += demoted
        assert demoted < sum(lt.n_ddr for lt in buffers.layers) * buffers.batch
        _check_slots(buffers)
    assert d2h > 0 and buffers.bytes_d2h == d2h * buffers.token_bytes // buffers.batch
    lt = buffers.layers[0]  # a prefill token keeps its K wherever it went
    for row in range(buffers.batch):
        where = {int(s): ("hbm", i) for i, s in enumerate(lt.hbm_slots[row, : lt.n_hbm])}
        where.update({int(s): ("ddr", i) for i, s in enumerate(lt.ddr_slots[row, : lt.n_ddr])})
        for (r, slot), k0 in held.items():
            if r == row:
                tier, i = where[slot]
                got = lt.hbm_k[row, :, i] if tier == "hbm" else lt.ddr_k[row, :, i]
                assert torch.equal(got, k0)


@pytest.mark.parametrize("strategy", ["host-attention", "hybrid", "selective"])
def test_other_strategies_are_refused_in_one_line(model, strategy):
    """The prefetch step runs prefetch only (host-attention and hybrid: tests/test_graph_host.py)."""
    from tiersim.hierarchy.config import TierConfig
    from tiersim.validator.graph import GraphStep
    from tiersim.validator.graph_tiers import TierBuffers

    share = {"fetch_share": 0.5} if strategy in ("hybrid", "selective") else {}
    config = TierConfig(hbm=0.5, ddr=0.5, strategy=strategy, **share)
    buffers = TierBuffers(config, 2, 1, 2, 16, 64, 4, "cpu", torch.float32)
    with pytest.raises(TiersimError, match=f"--strategy {strategy}: prefetch only in this step") as err:
        GraphStep(model, buffers)
    assert "\n" not in str(err.value)


def test_cpu_grid_writes_a_graph_eager_calibration(tmp_path):
    from tiersim.simulator.against import load_measurements
    from tiersim.validator.graph_run import run_graph

    out = tmp_path / "graph.json"
    doc = run_graph("tiny", [1, 2], [96], [1.0, 0.5], device="cpu", steps=3, warmup=1, out=out,
                    sweep_sizes=[4096, 65536])
    assert doc["executor"] == "graph-eager" and doc["kind"] == "calibration"
    points = {(p["batch"], p["hbm"]): p for p in doc["points"]}
    assert set(points) == {(1, 1.0), (1, 0.5), (2, 1.0), (2, 0.5)}
    for (batch, hbm), p in points.items():
        assert p["measured_step_ms"] > 0 and p["gpu_busy_ms"] > 0 and p["stall_ms"] >= 0
        assert p["step_ms_p10"] <= p["measured_step_ms"] <= p["measured_step_ms_p90"]
        assert p["baseline_step_ms"] == points[(batch, 1.0)]["measured_step_ms"]
        assert (p["h2d_bytes"] > 0) == (hbm < 1.0) and (p["prefetch_gbps"] is not None) == (hbm < 1.0)
        assert p["simulated_step_ms"] > 0
    assert points[(1, 1.0)]["overhead_pct"] == 0.0
    # the staged bytes are every layer's DDR buffer, K and V
    p = points[(2, 0.5)]
    assert p["h2d_bytes"] % (2 * 2 * 2 * 16 * 2) == 0  # K+V x batch x KV heads x head dim x bf16
    written = json.loads(out.read_text())
    assert written["executor"] == "graph-eager"
    loaded, measured = load_measurements(out)
    assert loaded["executor"] == "graph-eager" and len(measured) == 4


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("split", [None, (0.2, 0.2, 0.1)])
def test_cuda_graph_replay_equals_the_eager_static_step(split):
    """The captured graph runs the static step's kernels (with a compressed and an evicted share: the dequantization
    inside the graph, the per-row masks): its logits equal the eager static step's (within bf16 rounding: cuBLAS may
    pick another algorithm for the capture stream's workspace) and pick the same token."""
    from tiersim.validator.graph import CapturedStep, GraphStep
    from tiersim.validator.shapes import build_model, get_shape

    dev = torch.device("cuda")
    model = build_model(get_shape("tiny"), dev)
    _, eager_buf = _pair(model, 0.5, 2, 16, device=dev, split=split, retier_every=4, recent_window=16)
    _, graph_buf = _pair(model, 0.5, 2, 16, device=dev, split=split, retier_every=4, recent_window=16)
    eager, graphed = GraphStep(model, eager_buf), GraphStep(model, graph_buf)
    with torch.inference_mode():
        for _ in range(2):
            eager.run()
        captured = CapturedStep(graphed, warmup=2)
        for i in range(6):
            a, b = eager.run(), captured.replay().clone()
            torch.testing.assert_close(b, a, msg=lambda m, i=i: f"replay {i}: {m}")
            assert torch.equal(a.argmax(-1), b.argmax(-1)), f"replay {i} picks another token"
            for buf in (eager_buf, graph_buf):
                if buf.due(buf.n_seen - B_CONTEXT):
                    buf.retier(buf.n_seen - B_CONTEXT)
    assert graph_buf.layers[0].ddr_k.is_pinned()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_exact_step_matches_the_tiered_cache():
    from tiersim.validator.graph import GraphStep
    from tiersim.validator.shapes import build_model, get_shape

    model = build_model(get_shape("tiny"), torch.device("cuda"))
    cache, buffers = _pair(model, 0.5, 2, 6, device=torch.device("cuda"), retier_every=4, recent_window=16)

    def same(out, ref, i):  # bf16 on the GPU: the same kernels on differently strided K/V, within rounding
        torch.testing.assert_close(out, ref, msg=lambda m: f"step {i}: {m}")
        assert torch.equal(out.argmax(-1), ref.argmax(-1)), f"step {i} picks another token"

    assert_exact_step_follows_the_cache(model, cache, buffers, GraphStep(model, buffers, exact=True), same)


def _with_executor(tmp_path, executor: str | None):
    doc = json.loads((Path(__file__).resolve().parent.parent / "docs/validation/h100-80gb-hbm3.json").read_text())
    doc.pop("executor", None)
    if executor is not None:
        doc["executor"] = executor
    path = tmp_path / f"cal-{executor}.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("executor, host_bound", [(None, True), ("hf-eager", True), ("graph-eager", True),
                                                  ("cuda-graph", False)])
def test_against_says_when_the_measurement_predicts_a_host_bound_engine(tmp_path, executor, host_bound):
    from tiersim.simulator.against import compare, load_measurements
    from tiersim.simulator.scenario import assemble

    path = _with_executor(tmp_path, executor)
    doc, points = load_measurements(path)
    result = compare(assemble(1, model="r1-distill-qwen-7b", gpu="h100-sxm", engine="fast"), points, doc)
    assert result["host_bound"] is host_bound and result["executor"] == (executor or "hf-eager")
    assert (result["note"] is not None) == host_bound
    if host_bound:
        assert "predicts a host-bound engine" in result["note"] and "\n" not in result["note"]


def test_simulate_against_a_host_bound_file_warns_and_still_compares(tmp_path):
    """A warning on stderr (both for --calibration and --against), not a refusal: exit 0 and the table."""
    import subprocess
    import sys

    path = _with_executor(tmp_path, "hf-eager")
    proc = subprocess.run([sys.executable, "-m", "tiersim", "simulate", "--model", "r1-distill-qwen-7b", "--gpu",
                           "h100-sxm", "--calibration", str(path), "--against", str(path), "--format", "json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("host-bound") == 2
    result = json.loads(proc.stdout)
    assert result["host_bound"] is True and result["median_abs_error_pct"] > 0
    graph = _with_executor(tmp_path, "cuda-graph")
    proc = subprocess.run([sys.executable, "-m", "tiersim", "simulate", "--model", "r1-distill-qwen-7b", "--gpu",
                           "h100-sxm", "--calibration", str(graph), "--against", str(graph), "--format", "json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "host-bound" not in proc.stderr


@pytest.mark.parametrize("front", [["-m", "tiersim", "validate"], ["-m", "tiersim.validator"]])
def test_both_front_ends_run_the_graph_executor_and_refuse_what_it_cannot_do(tmp_path, front):
    import subprocess
    import sys

    out = tmp_path / "g.json"
    base = [sys.executable, *front, "--executor", "graph", "--device", "cpu"]
    proc = subprocess.run([*base, "--batch", "1", "--context", "72", "--hbm", "1.0,0.5", "--steps", "1",
                           "--warmup", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "executor graph-eager" in " ".join(proc.stdout.split()) and json.loads(out.read_text())["executor"] == "graph-eager"
    bad = subprocess.run([*base, "--prefill", "model"], capture_output=True, text=True, timeout=300)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "--prefill model: the graph executor" in lines[0]

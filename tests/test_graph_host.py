"""Host attention and hybrid in the graph executor (tiersim.validator.graph_host), held to TieredCache on CPU.

The exact step hands each layer to the cache's own ``HostAttention`` / ``Hybrid`` ``attend``; only the order of
tokens inside each part can differ from the cache's (its DDR tier is one chunk per demotion batch, with holes;
the buffers keep one, holes refilled). So: bit-identical while no re-tiering has moved a token (the layouts
coincide), and after that within float32 summation order. The bound: the cache's own host-attention claim in
float32 is identical tokens and logits within 1e-4 (docs/quality.md); over the exact test's cases the largest
|logit difference| is 1.9e-7 with logits up to 0.59 (``pytest -s -k exact_host`` prints it per case), so the
tests hold it to 1e-5 and identical tokens.
The CUDA paths (segmented capture, eager with events) are skipped without a GPU.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

from graph_exact import assert_exact_step_follows_the_cache
from test_graph_executor import _assert_static_follows_exact, _retier_and_compare
from tiersim.errors import TiersimError

CUDA = torch.cuda.is_available()
CONTEXT = 120
BOUND = 1e-5  # float32, after the layouts diverge (measured: <= 1.9e-7)
STRATEGIES = [("host-attention", {}), ("hybrid", {"fetch_share": 0.5})]


@pytest.fixture(scope="module")
def model():
    from tiersim.validator.shapes import build_model, get_shape

    torch.manual_seed(0)
    return build_model(get_shape("tiny"), "cpu", dtype=torch.float32)


def _buffers(model, hbm: float, batch: int, steps: int, strategy: str, device="cpu", **policy):
    from tiersim.validator.decode import tier_config
    from tiersim.validator.graph_run import load_synthetic
    from tiersim.validator.graph_tiers import TierBuffers

    cfg = model.config
    buffers = TierBuffers(tier_config(hbm, strategy=strategy, **policy), cfg.num_hidden_layers, batch,
                          cfg.num_key_value_heads, cfg.head_dim, CONTEXT, steps, device, model.dtype)
    with torch.inference_mode():
        load_synthetic(buffers, model, torch.Generator(device=device).manual_seed(0))
    return buffers


def _cache(model, hbm: float, batch: int, strategy: str, device="cpu", **policy):
    """A TieredCache filled by the synthetic prefill the buffers get (same seed, same draws)."""
    from tiersim.hierarchy.cache import TieredCache
    from tiersim.validator.decode import synthetic_prefill, tier_config

    cache = TieredCache(tier_config(hbm, strategy=strategy, **policy))
    with torch.inference_mode():
        synthetic_prefill(model, cache, batch, CONTEXT, torch.Generator(device=device).manual_seed(0))
    return cache


def _attention_outputs(model, sink: list):
    return [layer.self_attn.register_forward_hook(lambda _m, _a, out: sink.append(out[0].clone()))
            for layer in model.model.layers]


def _run_hooked(model, sink, fn):
    hooks = _attention_outputs(model, sink)
    try:
        return fn()
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("hbm", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("strategy, share", STRATEGIES)
def test_exact_host_step_matches_the_tiered_cache(model, strategy, share, hbm, batch):
    """Every step: logits and every layer's attention output equal TieredCache's with the same strategy, bit for
    bit until a re-tiering moves a token, within BOUND (same greedy token) after; tier codes always equal."""
    from tiersim.compat import cache_kwargs
    from tiersim.hierarchy import scoring
    from tiersim.validator.graph_host import HostStep, make_step

    steps, policy = 9, {"retier_every": 4, "recent_window": 16, **share}
    cache = _cache(model, hbm, batch, strategy, **policy)
    buffers = _buffers(model, hbm, batch, steps, strategy, **policy)
    step = make_step(model, buffers, exact=True)
    assert isinstance(step, HostStep)
    ids = torch.randint(model.config.vocab_size, (steps, batch, 1), generator=torch.Generator().manual_seed(1))
    arg = cache_kwargs(model, cache)
    moved, diverged = 0, []
    try:
        with torch.inference_mode():
            for i in range(steps):
                ref_attn, out_attn = [], []
                ref = _run_hooked(model, ref_attn,
                                  lambda: model(input_ids=ids[i], **arg, use_cache=True, logits_to_keep=1).logits)
                step.ids.copy_(ids[i])
                out = _run_hooked(model, out_attn, step.run)
                assert len(ref_attn) == len(out_attn) == model.config.num_hidden_layers
                if moved == 0:
                    assert torch.equal(ref, out), f"step {i}: logits differ by {(ref - out).abs().max():.3g}"
                    assert all(torch.equal(a, b) for a, b in zip(ref_attn, out_attn)), f"step {i}: attention differs"
                else:
                    diverged.append(float((ref - out).abs().max()))
                    torch.testing.assert_close(out, ref, rtol=BOUND, atol=BOUND)
                    assert torch.equal(out.argmax(-1), ref.argmax(-1)), f"step {i}: another greedy token"
                    for a, b in zip(ref_attn, out_attn):
                        torch.testing.assert_close(b, a, rtol=BOUND, atol=BOUND)
                m = _retier_and_compare(model, buffers, cache, i)
                moved += m.get("demoted", 0) + m.get("promoted", 0)
    finally:
        scoring.clear_listener()
    verdict = f"largest |logit difference| after the layouts diverged {max(diverged):.3g}" if diverged else \
        "bit-identical throughout"
    print(f"{strategy} hbm {hbm} batch {batch}: {verdict}")
    if hbm < 1.0:  # the DDR tier was attended on the host, and the bound branch ran after a re-tiering
        assert buffers.counts(0)["ddr"] > 0 and moved > 0 and diverged
        assert step.access.ddr_tokens > 0
        if strategy == "hybrid":
            assert 0 < step.access.fetched_tokens < step.access.ddr_tokens
        else:
            assert step.access.fetched_tokens == 0


@pytest.mark.parametrize("strategy, share", STRATEGIES)
def test_exact_host_step_in_bfloat16_within_the_cache_s_bound(strategy, share):
    """bf16: both runs compute the parts in float32 and round once to bf16, so the float32 order differences
    mostly vanish (measured: bit-identical on every step here); held to the cache's own bf16 bound for host
    attention, logits within 3.5% of their scale (docs/quality.md), and the same tier codes."""
    from tiersim.compat import cache_kwargs
    from tiersim.hierarchy import scoring
    from tiersim.validator.graph_host import make_step
    from tiersim.validator.shapes import build_model, get_shape

    torch.manual_seed(0)
    model = build_model(get_shape("tiny"), "cpu", dtype=torch.bfloat16)
    steps, batch, policy = 9, 3, {"retier_every": 4, "recent_window": 16, **share}
    cache = _cache(model, 0.25, batch, strategy, **policy)
    buffers = _buffers(model, 0.25, batch, steps, strategy, **policy)
    step = make_step(model, buffers, exact=True)
    ids = torch.randint(model.config.vocab_size, (steps, batch, 1), generator=torch.Generator().manual_seed(1))
    arg, worst = cache_kwargs(model, cache), 0.0
    try:
        with torch.inference_mode():
            for i in range(steps):
                ref = model(input_ids=ids[i], **arg, use_cache=True, logits_to_keep=1).logits.float()
                step.ids.copy_(ids[i])
                out = step.run().float()
                worst = max(worst, float((out - ref).abs().max()))
                assert worst <= 0.035 * float(ref.abs().max()), f"step {i}"
                if buffers.due(i + 1):
                    buffers.retier(i + 1)
                n = buffers.n_seen
                for layer in range(model.config.num_hidden_layers):
                    assert torch.equal(buffers.layers[layer].tiers[:, :n], cache.layers[layer].tiers), (i, layer)
    finally:
        scoring.clear_listener()
    print(f"bf16 {strategy}: largest |logit difference| {worst:.3g}")
    assert buffers.retiers >= 2 and buffers.counts(0)["ddr"] > 0


@pytest.mark.parametrize("strategy, share", [*STRATEGIES, ("hybrid", {"fetch_share": 0.0}),
                                             ("hybrid", {"fetch_share": 1.0})])
def test_static_step_equals_the_exact_step_up_to_rounding(model, strategy, share):
    """The graph's shape (whole buffers under the length mask, the host part on a thread, hybrid's share packed
    after each re-tiering by the step itself) gives the exact step's logits within BOUND and the same tiers."""
    from tiersim.validator.graph_host import make_step

    steps, batch, policy = 10, 2, {"retier_every": 3, "recent_window": 16, **share}
    exact_buf = _buffers(model, 0.5, batch, steps, strategy, **policy)
    static_buf = _buffers(model, 0.5, batch, steps, strategy, **policy)
    exact, static = make_step(model, exact_buf, exact=True), make_step(model, static_buf)
    _assert_static_follows_exact(model, exact, static, steps, BOUND)
    assert static_buf.retiers >= 2 and len(static.host_times) == steps and min(static.host_times) > 0


def test_host_part_runs_once_per_layer_and_the_copy_free_step_skips_it(model, monkeypatch):
    """One host part per layer per step, in layer order (inline on a CPU device: a worker thread would only
    contend for the GIL); the copy-free step (GPU-busy time) runs none and attends the device part alone (so
    its logits differ from the full step's)."""
    from tiersim.validator.graph_host import HostStep, make_step

    calls = []
    original = HostStep.host_part

    def recording(self, layer_idx):
        calls.append((threading.current_thread() is threading.main_thread(), layer_idx))
        return original(self, layer_idx)

    monkeypatch.setattr(HostStep, "host_part", recording)
    full_buf = _buffers(model, 0.25, 2, 4, "host-attention")
    busy_buf = _buffers(model, 0.25, 2, 4, "host-attention")
    full, busy = make_step(model, full_buf), make_step(model, busy_buf, copies=False)
    ids = torch.randint(model.config.vocab_size, (2, 1), generator=torch.Generator().manual_seed(3))
    full.ids.copy_(ids)
    busy.ids.copy_(ids)
    with torch.inference_mode():
        a = full.run()
        layers = model.config.num_hidden_layers
        assert calls == [(True, layer) for layer in range(layers)]
        b = busy.run()
    assert len(calls) == layers  # none from the copy-free step
    assert not torch.allclose(a, b, atol=1e-3)  # without the DDR tier's attention the output changes
    assert busy.host_times == [0.0] and full.host_times[0] > 0


def test_hybrid_moves_its_share_and_host_attention_only_results(model):
    """Per step: host attention moves no K/V up (only output, lse and scores, each smaller than the DDR tier), hybrid
    moves its share's K/V (fetch_share of the DDR buffer) on top; prefetch would move the whole DDR buffer."""
    from tiersim.validator.graph_host import make_step

    prefetch = _buffers(model, 0.25, 2, 4, "prefetch")
    host = make_step(model, _buffers(model, 0.25, 2, 4, "host-attention")).traffic()
    hybrid = make_step(model, _buffers(model, 0.25, 2, 4, "hybrid", fetch_share=0.5)).traffic()
    whole = prefetch.staged_bytes()
    assert host["fetched"] == 0 and 0 < host["h2d"] < whole and host["staging"] == 0
    assert hybrid["fetched"] == round(0.5 * prefetch.cap_ddr) * prefetch.token_bytes * len(prefetch.layers)
    assert hybrid["h2d"] > hybrid["fetched"] and hybrid["staging"] == 2 * hybrid["fetched"] // len(prefetch.layers)
    assert host["d2h"] > hybrid["d2h"] > 0  # the query both ways; the mask columns of the host part's tokens


def _against_rows(path, capsys) -> list[tuple[str, float]]:
    """``python -m tiersim.simulator.against PATH``'s rows: (the hbm column's words, the simulated ms)."""
    from tiersim.simulator.against import main

    capsys.readouterr()
    assert main([str(path)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("tiered")]
    return [(" ".join(r[3:-3]), float(r[-2])) for r in rows]  # run, batch, context | hbm ... | measured, sim, error


def _against(path, capsys) -> dict:
    """``python -m tiersim.simulator.against PATH``'s simulated ms per hbm."""
    return {float(split.split()[0]): ms for split, ms in _against_rows(path, capsys)}


@pytest.mark.parametrize("strategy, share", [("host-attention", None), ("hybrid", 0.5)])
def test_cpu_grid_records_the_strategy_its_host_time_and_prices_it(tmp_path, strategy, share, capsys):
    """The file names the strategy, each offloaded point its host time and traffic, and both the file's own
    prediction and ``--against`` price the strategy measured, not prefetch."""
    from tiersim.validator.graph_run import run_graph

    kwargs = {"device": "cpu", "steps": 2, "warmup": 1, "sweep_sizes": [4096, 65536]}
    out, ref_out = tmp_path / "g.json", tmp_path / "p.json"
    doc = run_graph("tiny", [1], [96], [1.0, 0.5], out=out, strategy=strategy, fetch_share=share, **kwargs)
    ref = run_graph("tiny", [1], [96], [0.5], out=ref_out, **kwargs)
    simulated, simulated_prefetch = _against(out, capsys), _against(ref_out, capsys)
    assert simulated[0.5] != simulated_prefetch[0.5] and simulated[1.0] > 0
    assert doc["executor"] == "graph-eager" and doc["settings"]["strategy"] == strategy
    points = {p["hbm"]: p for p in doc["points"]}
    off, prefetch = points[0.5], ref["points"][0]
    assert off["strategy"] == strategy and off["host_ms"] > 0 and off["stall_ms"] >= 0
    assert (off["prefetch_gbps"] is not None) == (strategy == "hybrid")
    assert 0 < off["h2d_bytes"] < prefetch["h2d_bytes"]
    assert off["simulated_step_ms"] > 0 and off["simulated_step_ms"] != prefetch["simulated_step_ms"]
    assert points[1.0]["host_ms"] is None and points[1.0]["h2d_bytes"] == 0
    assert json.loads(out.read_text())["settings"]["strategy"] == strategy
    from tiersim.validator.compare import format_text

    line = next(x for x in format_text(doc).splitlines() if x.startswith(f"strategy {strategy}"))
    assert f"host {off['host_ms']:.3f} ms at batch 1, context 96, hbm 0.5" in line and "hbm 1:" not in line
    assert not any(x.startswith("strategy") for x in format_text(ref).splitlines())


def test_refusals_are_one_line():
    from tiersim.validator.graph_host import strategy_options

    for args, words in (((("selective",)), "--strategy selective: the graph executor runs prefetch, host-attention"),
                        (("host-attention", 0.3), "--fetch-share 0.3: only hybrid takes a fetched share"),
                        (("hybrid", 1.5), "--fetch-share 1.5: hybrid's fetched share must be in [0, 1]")):
        with pytest.raises(TiersimError, match=words.replace("[", r"\[").replace("]", r"\]")) as err:
            strategy_options(*args)
        assert "\n" not in str(err.value)
    assert strategy_options("prefetch") is None and strategy_options("hybrid") == {"strategy": "hybrid",
                                                                                   "fetch_share": 0.5}
    # a share that says what the strategy fetches anyway passes; the other end is refused (host attention
    # fetches none: --fetch-share 1 with it used to be dropped silently, and 0 refused)
    assert strategy_options("prefetch", 1.0) is None and strategy_options("host-attention", 0.0) == {
        "strategy": "host-attention"}
    for strategy, share in (("host-attention", 1.0), ("prefetch", 0.0)):
        with pytest.raises(TiersimError, match=f"--fetch-share {share:g}: only hybrid takes a fetched share"):
            strategy_options(strategy, share)


@pytest.mark.parametrize("args, words", [
    (["--strategy", "host-attention"], "--strategy host-attention: the hf executor times prefetch only"),
    (["--fetch-share", "0.5"], "--fetch-share 0.5: the hf executor times prefetch only"),
    (["--executor", "graph", "--strategy", "selective"], "--strategy selective: the graph executor runs"),
    (["--executor", "graph", "--strategy", "prefetch", "--fetch-share", "0.5"], "only hybrid takes"),
    (["--executor", "graph", "--strategy", "hybrid", "--compare", "docs/validation/h100-80gb-hbm3.json"],
     "--executor graph and --strategy hybrid are for a new run; --compare only prints"),
    (["--strategy-check", "hybrid"], "--strategy-check hybrid: the hf executor times prefetch only"),
    (["--executor", "graph", "--strategy-check", "host-attention,selective"],
     "--strategy-check selective: one of host-attention, hybrid"),
    (["--executor", "graph", "--strategy-check", "hybrid,,host-attention"],
     "--strategy-check: expected comma-separated str values, got 'hybrid,,host-attention' (an empty item)"),
    (["--executor", "graph", "--strategy", "hybrid", "--strategy-check", "host-attention"],
     "--strategy-check host-attention: beside --strategy prefetch only"),
    (["--executor", "graph", "--strategy-check", "hybrid", "--compare", "docs/validation/h100-80gb-hbm3.json"],
     "--executor graph and --strategy-check hybrid are for a new run; --compare only prints"),
])
def test_validate_refuses_what_is_not_built_in_one_line(args, words):
    from cli_run import assert_refused

    _, err = assert_refused(["validate", "--device", "cpu", "--batch", "1", "--context", "72", "--hbm", "0.5", *args])
    assert words in err


def test_host_strategies_allocate_no_device_buffer_their_step_does_not_read(model):
    """At batch 64 x 8K the token-ordered buffer and each staging buffer are ~1 GB each on the device: prefetch's
    step reads them, host attention reads neither (it attends the tiers in place; re-tiering assembles a layer
    in a transient buffer), hybrid stages its share only. The steps still re-tier and follow the exact step."""
    from tiersim.validator.graph_host import make_step

    sizes = {}
    for strategy, share in [("prefetch", {}), *STRATEGIES]:
        buffers = _buffers(model, 0.5, 2, 8, strategy, retier_every=4, recent_window=16, **share)
        stage = [tuple(t.shape) for pair in buffers.staging for t in pair]
        sizes[strategy] = (buffers.assembled is not None, stage, buffers.cap_ddr)
        if strategy != "prefetch":
            step = make_step(model, buffers)
            with torch.inference_mode():
                for i in range(8):  # two re-tierings that move DDR tokens, through the transient buffer
                    assert torch.isfinite(step.run()).all()
                    if buffers.due(i + 1):
                        assert sum(buffers.retier(i + 1).values()) > 0 or i < 3
            assert buffers.assembled is None and buffers.retiers >= 1
    cap = sizes["prefetch"][2]
    b, h, d = 2, model.config.num_key_value_heads, model.config.head_dim
    assert sizes["prefetch"] == (True, [(b, h, cap, d)] * 4, cap)
    assert sizes["host-attention"] == (False, [], cap)
    assert sizes["hybrid"] == (False, [(b, h, round(0.5 * cap), d)] * 4, cap)


def test_a_host_strategy_s_re_tiering_zeroes_one_transient_buffer_not_one_per_layer(model, monkeypatch):
    """The transient token-ordered buffer (~2 GB at batch 64 x 8K, zeroed) is made once per re-tiering and shared
    by its layers, as prefetch shares its own, not once per layer."""
    from tiersim.validator import graph_tiers
    from tiersim.validator.graph_host import make_step

    made = []
    real = graph_tiers.TierBuffers._token_ordered
    monkeypatch.setattr(graph_tiers.TierBuffers, "_token_ordered", lambda self: made.append(1) or real(self))
    buffers = _buffers(model, 0.5, 2, 8, "host-attention", retier_every=4, recent_window=16)
    assert len(buffers.layers) > 1  # a buffer per layer would show
    step = make_step(model, buffers)
    retiers = 0
    with torch.inference_mode():
        for i in range(8):
            step.run()
            if buffers.due(i + 1):
                before = len(made)
                if sum(buffers.retier(i + 1).values()):
                    retiers += 1
                assert len(made) - before <= 1
    assert retiers >= 1 and len(made) == retiers


def test_a_strategy_check_point_whose_capture_failed_does_not_relabel_the_prefetch_grid(monkeypatch):
    """The file's executor comes from the run's own strategy's points: a host-strategy check point that ran
    eagerly says so itself (its executor), and the prefetch grid stays what it was (here: graph-eager); a prefetch
    point that ran eagerly does relabel the file. Its prediction is the check's strategy's, not prefetch's."""
    from tiersim.validator import graph_run

    real = graph_run.measure_point

    def relabel(model, batch, context, hbm, *args, strategy=None, **kwargs):
        m = real(model, batch, context, hbm, *args, strategy=strategy, **kwargs)
        return {**m, "executor": "cuda-eager"} if (strategy is not None) == eager_host else m

    for eager_host, expected in ((True, "graph-eager"), (False, "cuda-eager")):
        monkeypatch.setattr(graph_run, "measure_point", relabel)
        doc = graph_run.run_graph("tiny", [1], [72], [1.0, 0.5], device="cpu", steps=1, warmup=1,
                                  strategy_check="host-attention,hybrid")
        assert doc["executor"] == expected
        by = {p["strategy"]: p for p in doc["points"] if p["hbm"] == 0.5}
        assert set(by) == {"prefetch", "host-attention", "hybrid"}
        assert by["host-attention"]["executor"] == ("cuda-eager" if eager_host else "graph-eager")
        assert doc["summary"]["max_overhead_pct"] == pytest.approx(by["prefetch"]["overhead_pct"])
        from tiersim.validator.compare import summary_lines

        check = next(x for x in summary_lines(doc) if x.startswith("strategy check: "))
        assert check.count("executor cuda-eager") == (2 if eager_host else 0)
    # each host point is predicted with its own strategy's costs: not the prefetch point's prediction
    assert len({round(p["simulated_step_ms"], 9) for p in by.values()}) == 3


def test_every_table_names_a_strategy_check_point_s_strategy_and_hybrid_s_fetched_share(tmp_path, capsys):
    """A prefetch grid with the strategy check holds three points at HBM 0.5: none of the tables may print two of
    them alike (the split alone is the prefetch point's words). ``python -m tiersim.simulator.against`` (the GPU
    script's step 4), ``tiersim simulate --against`` (rich) and the validator's own table name the strategy, and
    hybrid's fetched share, read from the file the real writer wrote; each point records the share it fetched."""
    import sys

    from tiersim.validator.compare import COLUMNS, format_text
    from tiersim.validator.graph_run import run_graph

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from cli_run import invoke

    out = tmp_path / "g.json"
    run_graph("tiny", [1], [72], [1.0, 0.5], device="cpu", steps=1, warmup=1, out=out, sweep_sizes=[4096, 65536],
              strategy_check="host-attention,hybrid")
    doc = json.loads(out.read_text())
    assert [(p["hbm"], p["strategy"], p["fetch_share"]) for p in doc["points"]] == [
        (1.0, "prefetch", 1.0), (0.5, "prefetch", 1.0), (0.5, "host-attention", 0.0), (0.5, "hybrid", 0.5)]
    words = ["1.00", "0.50", "0.50 host-attention", "0.50 hybrid fetch 0.5"]
    assert [split for split, _ in _against_rows(out, capsys)] == words
    after = len(COLUMNS) - COLUMNS.index("hbm") - 1  # the validator's table: the cells right of hbm
    table = [line.split() for line in format_text(doc).splitlines()[2:6]]
    assert [" ".join(r[3:-after]) for r in table] == ["1", "0.5", "0.5 host-attention", "0.5 hybrid fetch 0.5"]
    # tiersim simulate --against prices a preset's model: the same file, its shape renamed to one
    doc["model_shape"]["name"] = "r1-distill-qwen-7b"
    for p in doc["points"]:
        p["model_shape"] = "r1-distill-qwen-7b"
    renamed = tmp_path / "g7.json"
    renamed.write_text(json.dumps(doc))
    code, text, err = invoke(["simulate", "--model", "r1-distill-qwen-7b", "--gpu", "h100-sxm", "--against",
                              str(renamed)])
    assert code == 0, err
    cells = [" ".join(line.split()[3:-3]) for line in text.splitlines() if line.strip().startswith("tiered")]
    assert cells == words
    code, text, err = invoke(["simulate", "--model", "r1-distill-qwen-7b", "--gpu", "h100-sxm", "--against",
                              str(renamed), "--format", "json"])
    rows = json.loads(text)["rows"]
    assert [(r.get("strategy"), r.get("fetch_share"), r.get("share")) for r in rows] == [
        (None, None, None), (None, None, None), ("host-attention", None, None), ("hybrid", 0.5, 0.5)]


def test_a_point_s_fetched_share_flows_into_its_prediction_for_every_strategy():
    """add_predictions takes each point's ``strategy`` / ``fetch_share`` as the file records them (prefetch 1.0,
    host attention 0.0: TierConfig refuses a share below 1 from either), and hybrid's share moves its prediction:
    at 0 it is host attention's, at 1 prefetch's (the simulator's hybrid spans the two)."""
    from types import SimpleNamespace

    from tiersim.simulator.presets import MODELS
    from tiersim.validator.predict import add_predictions, tier_options

    assert tier_options({"strategy": "prefetch", "fetch_share": 1.0}) == {"strategy": "prefetch"}
    assert tier_options({"strategy": "host-attention", "fetch_share": 0.0}) == {"strategy": "host-attention"}
    assert tier_options({"strategy": "hybrid", "fetch_share": 0.25}) == {"strategy": "hybrid", "fetch_share": 0.25}
    shares = [("prefetch", 1.0), ("host-attention", 0.0), ("hybrid", 0.0), ("hybrid", 0.5), ("hybrid", 1.0)]
    got = []
    points = [SimpleNamespace(measured_step_ms=1.0, batch=64, context=2048, hbm=0.5, compressed=0.0,
                              predicted=lambda step, stall: got.append(round(step, 9))) for _ in shares]
    doc = {"gpu_preset": "h100-sxm"}
    add_predictions(doc, points, MODELS["r1-distill-qwen-7b"], {"sink_tokens": 4, "recent_window": 64},
                    {"warmup": 2, "steps": 16}, per_point=[{"strategy": s, "fetch_share": f} for s, f in shares])
    prefetch, host, hybrid0, hybrid, hybrid1 = got
    assert hybrid0 == host and hybrid1 == prefetch and len({prefetch, host, hybrid}) == 3


def test_a_failing_strategy_check_point_is_that_point_s_error_and_the_grid_goes_on(monkeypatch, tmp_path):
    """The check runs early in the GPU script's grid, on the least-run code: an error there must not lose the grid's
    file. The point says why in one line; the next check and the rest of the grid are measured. A grid point's own
    error still ends the run (only the check is guarded)."""
    from tiersim.validator import graph_run

    real = graph_run.measure_point

    def failing(model, batch, context, hbm, *args, strategy=None, **kwargs):
        if strategy is not None and strategy["strategy"] == "host-attention":
            raise ValueError("shapes do not match\nsecond line")
        return real(model, batch, context, hbm, *args, strategy=strategy, **kwargs)

    monkeypatch.setattr(graph_run, "measure_point", failing)
    out = tmp_path / "g.json"
    doc = graph_run.run_graph("tiny", [1, 2], [72], [1.0, 0.5], device="cpu", steps=1, warmup=1, out=out,
                              strategy_check="host-attention,hybrid")
    failed = [p for p in doc["points"] if p["error"]]
    assert [p["error"] for p in failed] == ["failed: ValueError: shapes do not match"]
    assert [(p["strategy"], p["fetch_share"]) for p in failed] == [("host-attention", 0.0)]  # which one failed
    assert sum(p["measured_step_ms"] is not None for p in doc["points"]) == 5 and out.exists()
    # the validator's text (the GPU script's <gpu>-graph.txt) says how each check point ran, or why it did not
    from tiersim.validator.compare import format_text

    line = next(x for x in format_text(doc).splitlines() if x.startswith("strategy check: "))
    host, hybrid = line.removeprefix("strategy check: ").split("; ")
    assert host == "host-attention at batch 1, context 72, hbm 0.5: failed: ValueError: shapes do not match"
    ran = next(p for p in doc["points"] if p["strategy"] == "hybrid")
    assert hybrid == (f"hybrid fetch 0.5 at batch 1, context 72, hbm 0.5: host {ran['host_ms']:.3f} ms, "
                      f"stall {ran['stall_ms']:.3f} ms, executor graph-eager")

    def grid_fails(model, batch, context, hbm, *args, strategy=None, **kwargs):
        raise ValueError("a grid point")

    monkeypatch.setattr(graph_run, "measure_point", grid_fails)
    with pytest.raises(ValueError, match="a grid point"):
        graph_run.run_graph("tiny", [1], [72], [1.0, 0.5], device="cpu", steps=1, warmup=1)


def test_a_grid_point_s_error_ends_the_run_with_the_points_before_it_written(monkeypatch, tmp_path):
    """A grid point's own error still ends the run (loudly: it is raised), but after the file is written with the
    points measured before it and ``error`` saying why it stopped: on a scarce GPU an error at batch 64 must not
    cost the batch 1-32 points. ``simulate --against`` reads that file."""
    from tiersim.simulator.against import load_measurements
    from tiersim.validator import graph_run

    real = graph_run.measure_point

    def fails_at_batch_2(model, batch, context, hbm, *args, **kwargs):
        if batch == 2 and hbm < 1.0:
            raise ValueError("a grid point\nsecond line")
        return real(model, batch, context, hbm, *args, **kwargs)

    monkeypatch.setattr(graph_run, "measure_point", fails_at_batch_2)
    out = tmp_path / "g.json"
    with pytest.raises(ValueError, match="a grid point"):
        graph_run.run_graph("tiny", [1, 2, 3], [72], [1.0, 0.5], device="cpu", steps=1, warmup=1, out=out,
                            sweep_sizes=[4096, 65536])
    doc = json.loads(out.read_text())
    assert [(p["batch"], p["hbm"]) for p in doc["points"]] == [(1, 1.0), (1, 0.5), (2, 1.0)]
    assert doc["error"] == "stopped after 3 points: ValueError: a grid point"
    from tiersim.validator.compare import format_text

    assert f"stopped: {doc['error']}" in format_text(doc).splitlines()  # --compare says the file is partial
    assert all(p["simulated_step_ms"] > 0 for p in doc["points"]) and doc["summary"]["median_abs_sim_error_pct"]
    assert len(load_measurements(out)[1]) == 3


def test_a_sigterm_during_a_strategy_check_stops_the_run_and_keeps_its_file(monkeypatch, tmp_path):
    """The GPU script kills a step that overruns with SIGTERM (``timeout``): the validator's command line turns it
    into ``Terminated``, which the strategy check's guard (one bad point passes) must not swallow, so the run stops
    at once, and with its file. Sent for real, to this process, from inside the first check point."""
    import os
    import signal

    from tiersim.validator import calibrate, graph_run

    real = graph_run.measure_point

    def killed(model, batch, context, hbm, *args, strategy=None, **kwargs):
        if strategy is not None:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, batch, context, hbm, *args, strategy=strategy, **kwargs)

    monkeypatch.setattr(graph_run, "measure_point", killed)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "g.json"
    try:
        calibrate.raise_on_sigterm()
        with pytest.raises(calibrate.Terminated):
            graph_run.run_graph("tiny", [1, 2], [72], [1.0, 0.5], device="cpu", steps=1, warmup=1, out=out,
                                sweep_sizes=[4096, 65536], strategy_check="host-attention,hybrid")
    finally:
        signal.signal(signal.SIGTERM, before)
    doc = json.loads(out.read_text())
    assert [(p["hbm"], p["strategy"]) for p in doc["points"]] == [(1.0, "prefetch"), (0.5, "prefetch")]
    assert doc["error"].startswith("stopped after 2 points: Terminated: terminated by signal")


def test_the_validator_s_command_line_ends_a_sigterm_in_one_line_with_its_file(monkeypatch, tmp_path, capsys):
    """``python -m tiersim.validator`` under the GPU script's ``timeout``: the SIGTERM ends the run with the file
    written and one ``error:`` line (no traceback in the step's log), exit 128 + SIGTERM as a killed process."""
    import os
    import signal

    from tiersim.validator import graph_run
    from tiersim.validator.__main__ import main

    real = graph_run.measure_point

    def killed(model, batch, context, hbm, *args, **kwargs):
        if hbm < 1.0:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, batch, context, hbm, *args, **kwargs)

    monkeypatch.setattr(graph_run, "measure_point", killed)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "g.json"
    try:
        code = main(["--executor", "graph", "--device", "cpu", "--batch", "1", "--context", "72", "--hbm", "1.0,0.5",
                     "--steps", "1", "--warmup", "1", "--out", str(out)])
    finally:
        signal.signal(signal.SIGTERM, before)
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1].startswith("error: terminated by signal") and "Traceback" not in err
    assert json.loads(out.read_text())["error"].startswith("stopped after 1 points: Terminated")


@pytest.mark.parametrize("front", [["-m", "tiersim", "validate"], ["-m", "tiersim.validator"]])
def test_both_front_ends_run_hybrid_in_the_graph_executor(tmp_path, front):
    import subprocess
    import sys

    out = tmp_path / "h.json"
    proc = subprocess.run([sys.executable, *front, "--executor", "graph", "--device", "cpu", "--batch", "1",
                           "--context", "72", "--hbm", "1.0,0.5", "--steps", "1", "--warmup", "1", "--strategy",
                           "hybrid", "--fetch-share", "0.25", "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["settings"]["strategy"] == "hybrid" and doc["settings"]["fetch_share"] == 0.25
    assert "host" in proc.stderr  # the per-point log line names the host time


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("strategy, share", STRATEGIES)
def test_cuda_segmented_capture_replays_the_eager_static_step(strategy, share):
    """2L + 1 graphs with the host part between them give the eager static step's logits (within bf16
    rounding) and the same greedy token, across re-tierings; the copy-free capture runs no host part."""
    from tiersim.validator.graph_host import make_step
    from tiersim.validator.graph_segments import SegmentedCapture
    from tiersim.validator.shapes import build_model, get_shape

    dev = torch.device("cuda")
    model = build_model(get_shape("tiny"), dev)
    policy = {"retier_every": 4, "recent_window": 16, **share}
    eager_buf = _buffers(model, 0.5, 2, 16, strategy, device=dev, **policy)
    graph_buf = _buffers(model, 0.5, 2, 16, strategy, device=dev, **policy)
    eager, graphed = make_step(model, eager_buf), make_step(model, graph_buf)
    with torch.inference_mode():
        for _ in range(2):
            eager.run()
        captured = SegmentedCapture(graphed, warmup=2)
        assert len(captured.graphs) == 2 * model.config.num_hidden_layers + 1
        for i in range(6):
            a, b = eager.run(), captured.replay().clone()
            torch.testing.assert_close(b, a, msg=lambda m, i=i: f"replay {i}: {m}")
            assert torch.equal(a.argmax(-1), b.argmax(-1)), f"replay {i} picks another token"
            for buf, step in ((eager_buf, eager), (graph_buf, graphed)):
                if buf.due(buf.n_seen - CONTEXT):
                    buf.retier(buf.n_seen - CONTEXT)
                    step.refresh()
    assert graph_buf.layers[0].ddr_k.is_pinned() and min(graphed.host_times[-6:]) > 0


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("strategy, share", STRATEGIES)
def test_cuda_exact_host_step_matches_the_tiered_cache(strategy, share):
    from tiersim.validator.graph_host import make_step
    from tiersim.validator.shapes import build_model, get_shape

    dev = torch.device("cuda")
    model = build_model(get_shape("tiny"), dev)
    policy = {"retier_every": 4, "recent_window": 16, **share}
    cache = _cache(model, 0.5, 2, strategy, device=dev, **policy)
    buffers = _buffers(model, 0.5, 2, 6, strategy, device=dev, **policy)

    def near(out, ref, i):
        # bf16: the cache's own host-attention claim against the full cache is logits within ~3.5% of their
        # scale (docs/quality.md); two host-attention runs whose parts differ in token order, the same or less
        scale = float(ref.float().abs().max())
        assert float((out.float() - ref.float()).abs().max()) <= 0.035 * scale, f"step {i}"

    assert_exact_step_follows_the_cache(model, cache, buffers, make_step(model, buffers, exact=True), near)


@pytest.mark.parametrize("settings, words", [({"strategy": "bogus"}, "point 1's strategy 'bogus' is not one of"),
                                             ({"strategy": "hybrid", "fetch_share": 2}, "point 1's fetch_share")])
def test_against_refuses_a_strategy_it_cannot_price_in_one_line(tmp_path, settings, words):
    from pathlib import Path

    from tiersim.simulator.against import load_measurements

    doc = json.loads((Path(__file__).resolve().parent.parent / "docs/validation/h100-80gb-hbm3.json").read_text())
    doc["settings"].update(settings)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(TiersimError, match=words) as err:
        load_measurements(path)
    assert "\n" not in str(err.value)


class _FakeCuda:
    """Just enough of torch.cuda for SegmentedCapture's bookkeeping on a CPU: graphs that log their replays."""

    def __init__(self, log: list) -> None:
        self.log = log
        fake = self

        class Graph:
            made = 0

            def __init__(self):
                self.index = Graph.made
                Graph.made += 1

            def capture_begin(self, pool=None):
                fake.log.append(f"begin {self.index}")

            def capture_end(self):
                fake.log.append(f"end {self.index}")

            def replay(self):
                fake.log.append(f"g{self.index}")

        class Event:
            def record(self, stream=None):
                pass

            def synchronize(self):
                pass

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                pass

            def wait_event(self, event):
                fake.log.append("wait")

        self.CUDAGraph, self.Event, self.Stream = Graph, Event, Stream

    def install(self, monkeypatch) -> None:
        import contextlib

        for name, value in {"CUDAGraph": self.CUDAGraph, "Event": self.Event, "Stream": self.Stream,
                            "stream": lambda s=None: contextlib.nullcontext(),
                            "current_stream": lambda device=None: self.Stream(),
                            "synchronize": lambda device=None: None, "graph_pool_handle": lambda: None,
                            "is_current_stream_capturing": lambda: False}.items():
            monkeypatch.setattr(torch.cuda, name, value)


@pytest.mark.parametrize("copies", [True, False])
def test_segmented_replay_runs_the_host_part_between_the_right_graphs(model, monkeypatch, copies):
    """2L + 1 segments, cut after each layer's query goes down and after its device part; a replay runs layer l's
    host part after D_l is launched and before A_{l+1}, with hybrid's next share started one layer ahead and
    waited for before D_l (logged by a stand-in for torch.cuda: the graphs themselves need a GPU)."""
    from tiersim.validator.graph_host import HostStep, make_step
    from tiersim.validator.graph_segments import SegmentedCapture

    log: list = []
    fake = _FakeCuda(log)
    step = make_step(model, _buffers(model, 0.5, 1, 8, "hybrid", fetch_share=0.5), copies=copies)
    fake.install(monkeypatch)
    layers = model.config.num_hidden_layers
    step.cuda, step.side, step.events, step._ready = True, fake.Stream(), [fake.Event() for _ in range(layers)], \
        fake.Event()
    monkeypatch.setattr(HostStep, "host_part", lambda self, i: log.append(f"host {i}"))
    monkeypatch.setattr(HostStep, "fetch_share", lambda self, i: log.append(f"fetch {i}"))
    with torch.inference_mode():
        captured = SegmentedCapture(step, warmup=1)
    recorded = [e for e in log if e.startswith(("begin", "end"))]
    assert len(captured.graphs) == 2 * layers + 1 and captured.points == [p for i in range(layers) for p in (i, None)]
    assert recorded == [f"{w} {i}" for i in range(2 * layers + 1) for w in ("begin", "end")]
    log.clear()
    captured.replay()
    if copies:
        assert layers == 2  # the tiny shape: the order written out
        assert log == ["fetch 0", "g0", "fetch 1", "wait", "g1", "host 0", "g2", "wait", "g3", "host 1", "g4"]
    else:  # the copy-free twin: the segments back to back, nothing between them
        assert log == [f"g{i}" for i in range(2 * layers + 1)]
    assert step.buffers.n_seen == CONTEXT + 2  # the warm-up step and the replay


def test_host_strategies_run_and_are_priced_with_torch_and_numpy_only(tmp_path):
    """The GPU machine has no simpy, plotly, pandas, typer or rich: the hybrid grid and ``--against`` on its
    file run with those imports blocked (the simulator's step costs are numpy only)."""
    from test_validator_torch_only import _run

    out = tmp_path / "h.json"
    proc = _run(f"""
import sys
from tiersim.validator.graph_run import run_graph
from tiersim.simulator.against import main
doc = run_graph('tiny', [1], [80], [1.0, 0.5], device='cpu', steps=1, warmup=1, out={str(out)!r},
                sweep_sizes=[4096, 65536], strategy='hybrid', fetch_share=0.5)
print('HOST', doc['points'][1]['host_ms'] > 0)
sys.exit(main([{str(out)!r}]))
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HOST True" in proc.stdout and proc.stdout.strip().splitlines()[-1].startswith("median |error| ")


@pytest.mark.parametrize("split", [{"compressed": 0.2}, {"evict": 0.1}])
def test_a_lossy_split_is_refused_by_the_host_step_in_one_line(model, split):
    """Its device part attends the HBM tier only: buffers holding a compressed tier or evicting would lose those
    tokens' part of attention silently, so the host strategies refuse them themselves."""
    from tiersim.hierarchy.config import TierConfig
    from tiersim.validator.graph_host import make_step
    from tiersim.validator.graph_tiers import TierBuffers

    cfg = model.config
    config = TierConfig(hbm=0.5, ddr=0.5 - sum(split.values()), strategy="host-attention", quant_group=8, **split)
    buffers = TierBuffers(config, cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, 64, 4, "cpu",
                          torch.float32)
    with pytest.raises(TiersimError, match="host strategies run lossless splits only") as err:
        make_step(model, buffers)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("strategy", [None, {"strategy": "host-attention"}, {"strategy": "hybrid", "fetch_share": 0.5}])
def test_a_point_s_buffers_are_released_when_it_frees_them(monkeypatch, strategy):
    """At batch 64 x 8K a point's HBM tier is ~30 GB: it must be gone when measure_point frees memory, before the
    next point allocates, not whenever the garbage collector next runs (a step refers to itself, so only a
    collection frees it, and only once the timing loop's replay no longer refers to it: it did, and on an 80 GB
    GPU the next point would have run out of memory and been skipped)."""
    import weakref

    from tiersim.validator import graph_run, graph_tiers
    from tiersim.validator.shapes import build_model, get_shape

    made, alive = [], []
    real_init, real_free = graph_tiers.TierBuffers.__init__, graph_run.free

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    def free(dev):
        real_free(dev)
        alive.append([r() is not None for r in made])

    monkeypatch.setattr(graph_tiers.TierBuffers, "__init__", init)
    monkeypatch.setattr(graph_run, "free", free)
    graph_run.measure_point(build_model(get_shape("tiny"), "cpu"), 1, 72, 0.5, 2, 1, retier_every=2,
                            strategy=strategy)
    assert alive == [[False]]


def test_a_failed_segment_s_capture_is_ended_and_its_pool_recovered(model, monkeypatch):
    """A segment that fails mid-capture: the stream is left capturing nothing, the shared pool's allocation the
    failed segment left underway is ended (operators_timing.recover_failed_capture: else the next empty_cache fails an
    internal assert and the grid ends), the step is no longer recording, and the error is raised (the point is then
    timed eagerly)."""
    from tiersim.validator import graph_segments
    from tiersim.validator.graph_host import HostStep, make_step

    log: list = []
    fake = _FakeCuda(log)
    step = make_step(model, _buffers(model, 0.5, 1, 8, "hybrid", fetch_share=0.5))
    fake.install(monkeypatch)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (5, 2))
    layers = model.config.num_hidden_layers
    step.cuda, step.side, step.events, step._ready = True, fake.Stream(), [fake.Event() for _ in range(layers)], \
        fake.Event()
    calls = []
    monkeypatch.setattr(graph_segments, "recover_failed_capture", lambda dev, pool, stream=None: calls.append(pool))
    real = HostStep._attend_static

    def fails_in_layer_1(self, layer_idx, *args):
        if self.capture is not None and layer_idx == 1:
            raise RuntimeError("capture failed in layer 1")
        return real(self, layer_idx, *args)

    monkeypatch.setattr(HostStep, "_attend_static", fails_in_layer_1)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="layer 1"):
        graph_segments.SegmentedCapture(step, warmup=1)
    assert calls == [(5, 2)] and step.capture is None

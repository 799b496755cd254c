"""The graph executor's compressed tier and evicted shares (tiersim.validator.graph_compressed, graph_tiers): bit-identical
to TieredCache on CPU, the compressed check in the grid and the file, and what is refused. The CUDA replay of a
compressed + evicted split is in test_graph_executor.py (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from test_graph_executor import _assert_same_step, _pair, _retier_and_compare, model  # noqa: F401  (model: the fixture)
from tiersim.errors import TiersimError


LOSSY = [  # (hbm, (ddr, compressed, evict), policy): HBM 0.5 / 0.25 with compressed and evicted shares
    (0.5, (0.2, 0.2, 0.1), {}),
    (0.25, (0.35, 0.3, 0.1), {}),
    (0.5, (0.0, 0.5, 0.0), {}),  # no DDR tier at all
    (0.5, (0.0, 0.3, 0.2), {}),
    # the sinks and window squeeze DDR, which then shrinks at some re-tierings (entries move into holes)
    (0.3, (0.3, 0.2, 0.2), {"retier_every": 1, "recent_window": 64}),
]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("hbm, split, policy", LOSSY)
def test_compressed_and_evicted_shares_are_bit_identical_to_the_tiered_cache(model, hbm, split, policy, batch):
    """With a compressed tier (the cache's quantizer, its residual) and evictions: every step's attention output
    and logits equal TieredCache's bit for bit, the retained tokens' tier codes and the counts are the cache's
    after every re-tiering; tokens really are quantized and evicted along the way."""
    from tiersim.compat import cache_kwargs
    from tiersim.hierarchy import scoring
    from tiersim.validator.graph import GraphStep

    steps = 13
    policy = {"retier_every": 4, "recent_window": 16, **policy}
    cache, buffers = _pair(model, hbm, batch, steps, split=split, **policy)
    step = GraphStep(model, buffers, exact=True)
    ids = torch.randint(model.config.vocab_size, (steps, batch, 1), generator=torch.Generator().manual_seed(1))
    arg = cache_kwargs(model, cache)
    moved = {"demoted": 0, "compressed": 0, "evicted": 0}
    ddr_sizes = [buffers.layers[0].n_ddr]
    try:
        with torch.inference_mode():
            for i in range(steps):
                _assert_same_step(model, arg, step, ids[i], i)
                retiered = _retier_and_compare(model, buffers, cache, i)
                for key, value in retiered.items():
                    moved[key] = moved.get(key, 0) + value
                if retiered:
                    ddr_sizes.append(buffers.layers[0].n_ddr)
    finally:
        scoring.clear_listener()
    counts = buffers.counts(0)
    assert counts["compressed"] > 0 and moved["compressed"] > 0
    assert (counts["evicted"] > 0) == (split[2] > 0) and (moved["demoted"] > 0) == (split[0] > 0)
    if policy["retier_every"] == 1:  # the case is there for it: the DDR tier shrank at some re-tiering
        assert any(b < a for a, b in zip(ddr_sizes, ddr_sizes[1:])), ddr_sizes


def test_the_estimated_group_capacity_holds_a_churning_run_and_an_overflow_is_one_line(model, monkeypatch):
    """Buffers too large for one group per token hold group_capacity's estimate: enough for a churning split
    (re-tiering every other step) with identical results; a state with more groups is refused."""
    from tiersim.compat import cache_kwargs
    from tiersim.hierarchy import compressed, scoring
    from tiersim.hierarchy.quant import quantize_kv
    from tiersim.validator import graph_compressed
    from tiersim.validator.graph import GraphStep

    monkeypatch.setattr(graph_compressed, "FULL_BOUND_BYTES", 0)
    steps = 13
    cache, buffers = _pair(model, 0.25, 3, steps, split=(0.35, 0.3, 0.1), retier_every=2, recent_window=16)
    comp = buffers.layers[0].comp
    assert comp.static.key_scale.shape[2] < buffers.cap_comp  # the estimate, not the full bound
    step = GraphStep(model, buffers, exact=True)
    ids = torch.randint(model.config.vocab_size, (steps, 3, 1), generator=torch.Generator().manual_seed(1))
    arg = cache_kwargs(model, cache)
    try:
        with torch.inference_mode():
            for i in range(steps):
                _assert_same_step(model, arg, step, ids[i], i)
                _retier_and_compare(model, buffers, cache, i)
    finally:
        scoring.clear_listener()
    cap = comp.static.key_scale.shape[2]
    keys = torch.randn((3, 2, 16 * (cap + 1), 16))  # one more full group than the buffer holds
    many = compressed.CompressedTier(quantize_kv(keys, keys, group=16))
    with pytest.raises(TiersimError, match=f"holds {cap + 1} key scale groups, its static buffer {cap}") as err:
        comp.store(many)
    assert "\n" not in str(err.value)


def test_a_quant_group_that_does_not_tile_the_head_is_refused_in_one_line():
    from tiersim.hierarchy.config import TierConfig
    from tiersim.validator.graph_tiers import TierBuffers

    config = TierConfig(hbm=0.5, ddr=0.3, compressed=0.2, quant_group=12)
    with pytest.raises(TiersimError, match="quant_group=12 does not divide head_dim 16") as err:
        TierBuffers(config, 2, 1, 2, 16, 64, 4, "cpu", torch.float32)
    assert "\n" not in str(err.value)


def test_cpu_grid_with_the_compressed_check(tmp_path):
    """--compressed: after the lossless grid, its first batch and context again with that share of the context
    quantized (the rest in DDR, so fewer bytes cross the link), against its own HBM 1.0; the file says so per point,
    and --against prices each point with its split."""
    from tiersim.simulator.against import compare, load_measurements
    from tiersim.simulator.scenario import assemble
    from tiersim.validator.graph_run import run_graph

    out = tmp_path / "comp.json"
    doc = run_graph("tiny", [2, 1], [256], [1.0, 0.5], out=out, compressed=0.25, device="cpu", steps=2, warmup=1,
                    sweep_sizes=[4096, 65536])
    keys = [(p["batch"], p["hbm"], p["compressed"]) for p in doc["points"]]
    assert keys == [(2, 1.0, 0.0), (2, 0.5, 0.0), (1, 1.0, 0.0), (1, 0.5, 0.0), (2, 0.5, 0.25)]
    plain, comp = doc["points"][1], doc["points"][4]
    assert doc["settings"]["compressed"] == 0.25 and doc["settings"]["quant_group"] == 16  # the tiny head
    # the same tokens leave HBM; a quarter of the context is quantized, the rest of them is in DDR
    assert comp["tiers"]["hbm"] == plain["tiers"]["hbm"]
    assert comp["tiers"]["compressed"] + comp["tiers"]["ddr"] == plain["tiers"]["ddr"]
    assert comp["tiers"]["compressed"] == 64 and comp["tiers"]["ddr"] > 0  # floor(0.25 * 256), the prefill's
    assert comp["tier_bytes"]["compressed"] > 0 and plain["tier_bytes"]["compressed"] == 0
    assert 0 < comp["h2d_bytes"] < plain["h2d_bytes"]
    assert comp["simulated_step_ms"] > 0 and comp["overhead_pct"] is not None and comp["baseline_step_ms"] > 0
    # the summary's "max transfer overhead" is the lossless points' (the check's adds dequantization); its error
    # is in the median
    lossless = [p["overhead_pct"] for p in doc["points"] if p["hbm"] < 1 and not p["compressed"]]
    assert doc["summary"]["max_overhead_pct"] == max(lossless)
    assert comp["sim_error_pct"] in doc["sim_error_pct"]
    loaded, measured = load_measurements(out)
    assert [m["compressed"] for m in measured] == [0.0, 0.0, 0.0, 0.0, 0.25]
    result = compare(assemble(1, model="r1-distill-qwen-7b", gpu="h100-sxm", engine="fast"),
                     [{**m, "model": "r1-distill-qwen-7b"} for m in measured], loaded)
    rows = result["rows"]
    assert len(rows) == 5 and rows[4]["simulated_ms"] != rows[1]["simulated_ms"]
    from tiersim.validator import compare as table

    assert [r[3] for r in table.rows(doc)] == ["1", "0.5", "1", "0.5", "0.5 +c0.25"]  # validate --compare's table
    # the GPU script's last step (python -m tiersim.simulator.against) and simulate --against label it the same way
    import contextlib
    import io

    from tiersim.simulator import against

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert against.main([str(out)]) == 0
    labels = [line.split()[3:5] for line in printed.getvalue().splitlines() if line.strip().startswith("tiered")]
    assert [" ".join(x) if x[1].startswith("+c") else x[0] for x in labels] == [
        "1.00", "0.50", "1.00", "0.50", "0.50 +c0.25"]


def test_the_host_strategies_refuse_a_compressed_or_evicted_share_in_one_line(model):
    """Their step attends to HBM and DDR only: a compressed check with one is refused before anything runs, and
    buffers that hold a compressed or evicted share are refused by the step itself."""
    from tiersim.hierarchy.config import TierConfig
    from tiersim.validator import graph_host
    from tiersim.validator.graph_run import run_graph
    from tiersim.validator.graph_tiers import TierBuffers

    with pytest.raises(TiersimError, match="--compressed 0.25: the graph executor's hybrid step holds lossless") as err:
        run_graph("tiny", [1], [96], [1.0, 0.5], device="cpu", strategy="hybrid", compressed=0.25)
    assert "\n" not in str(err.value)
    for split in ({"compressed": 0.2}, {"evict": 0.2}):
        config = TierConfig(hbm=0.5, ddr=0.3, strategy="host-attention", quant_group=16, **split)
        buffers = TierBuffers(config, 2, 1, 2, 16, 96, 4, "cpu", torch.float32)
        with pytest.raises(TiersimError, match="host strategies run lossless splits only"):
            graph_host.make_step(model, buffers)


def test_the_hf_executor_refuses_a_compressed_share_in_one_line():
    import contextlib
    import io

    from tiersim.validator.__main__ import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--device", "cpu", "--compressed", "0.2", "--batch", "1", "--context", "8", "--hbm", "1"])
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and lines == ["error: --compressed 0.2: the hf executor times lossless splits only; "
                                   "use --executor graph"]


def test_a_compressed_share_above_what_leaves_hbm_is_capped_in_the_file_and_the_prediction():
    """--compressed 0.5 at HBM 0.75: the point runs with a quarter of the context compressed (all that leaves HBM);
    the file records that share and the simulator prices that split (it used to price hbm 0.75 + compressed 0.5,
    an invalid TierConfig, and fail after the whole grid had been measured)."""
    from tiersim.validator.graph_run import run_graph

    doc = run_graph("tiny", [1], [128], [1.0, 0.75], compressed=0.5, device="cpu", steps=1, warmup=1,
                    sweep_sizes=[4096, 65536])
    comp = [p for p in doc["points"] if p["compressed"]]
    assert len(comp) == 1 and comp[0]["hbm"] == 0.75 and comp[0]["compressed"] == 0.25
    assert comp[0]["tiers"]["ddr"] == 0 and comp[0]["tiers"]["compressed"] > 0
    assert comp[0]["simulated_step_ms"] > 0


def test_a_compressed_check_with_no_offloaded_ratio_says_it_runs_no_check():
    """--compressed with --hbm 1.0 only: the grid runs, and the log says the check it asked for did not."""
    from tiersim.validator.graph_run import run_graph

    said = []
    doc = run_graph("tiny", [1], [64], [1.0], device="cpu", compressed=0.25, steps=1, warmup=1,
                    sweep_sizes=[4096, 65536], log=said.append)
    assert [p["compressed"] for p in doc["points"]] == [0.0]
    assert "--compressed 0.25: no compressed check, --hbm lists no ratio below 1" in said

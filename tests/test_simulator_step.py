"""Issue 24: one model of a decode step. Every strategy's StepCosts on every solver (SimPy the reference),
one strategy registry read by the cache, the simulator, the CLI and the report, and the bytes the simulator
charges equal to the bytes the cache moves."""

import dataclasses
from dataclasses import replace

import numpy as np
import pytest

from tiersim.hierarchy import strategies as registry
from tiersim.hierarchy.config import TierConfig
from tiersim.simulator import analytic, fastpath, step, strategies
from tiersim.simulator.presets import Model, get_gpu, get_model

GQA = get_model("r1-distill-qwen-7b")
MHA = Model("mha-7b", 32, 32, 128, 4096, 32, 6.74e9)


def _work(policy, batch, length=3000.0, steps=48, churn=(0.01, 0.0)):
    rng = np.random.default_rng(1)
    return analytic.build_workload(policy, batch, analytic.sample_lengths(batch, length, 0.35, rng), 128, steps,
                                   churn=churn)


def rel(a, b):
    return abs(a / b - 1.0)


# -- every strategy on every solver ----------------------------------------------------------------------
#: (model, gpu, split, batch): on the H100 every split (DDR a quarter to three quarters, one with compressed and
#: evicted tokens beside it) at batch 1, 8 and 64 (compute-bound to link-bound); an MHA model on the A100's
#: Gen4 link; GH200's C2C link.
SPLITS = [(0.75, 0.25, 0.0, 0.0), (0.5, 0.5, 0.0, 0.0), (0.25, 0.75, 0.0, 0.0), (0.4, 0.4, 0.1, 0.1)]
CASES = [(GQA, "h100-sxm", split, batch) for split in SPLITS for batch in (1, 8, 64)] + [
    (MHA, "a100-80g", (0.5, 0.5, 0.0, 0.0), 16),
    (GQA, "gh200", (0.25, 0.75, 0.0, 0.0), 32),
]


@pytest.mark.parametrize("name", registry.NAMES)
@pytest.mark.parametrize("model,gpu,split,batch", CASES)
def test_every_strategy_runs_on_every_solver_and_the_fast_ones_agree_with_simpy(name, model, gpu, split, batch):
    hw = get_gpu(gpu)
    policy = analytic.Offload(TierConfig(*split))
    work = _work(policy, batch, steps=40)
    costs = strategies.step_costs(name, model, hw, policy, work, cover=0.8)
    assert costs.strategy == name and costs.exact == registry.get(name).exact
    ref = step.solve(costs, model.num_layers, hw, "simpy")
    assert ref.engine == "simpy" and ref.events > 0
    fast = step.solve(costs, model.num_layers, hw, "fast")
    closed = step.solve(costs, model.num_layers, hw, "closed form")
    assert (fast.engine, closed.engine) == ("fast", "closed form")
    # The existing tolerances (tests/test_simulator_fastpath.py): the recurrence within 0.5% of SimPy on the
    # mean, p50 and p99 step and the run's length, its stall within 0.5% of a step, and SimPy's extra time no
    # more than the link sharing the recurrence leaves out can cost; the closed form within 1% on the mean.
    assert rel(fast.step_time.mean(), ref.step_time.mean()) <= 0.005
    for q in (50, 99):
        assert rel(np.percentile(fast.step_time, q), np.percentile(ref.step_time, q)) <= 0.005
    assert abs(fast.stall.mean() - ref.stall.mean()) <= 0.005 * ref.step_time.mean()
    assert rel(fast.wall_time, ref.wall_time) <= 0.005
    gap = ref.wall_time - fast.wall_time
    assert -1e-9 * ref.wall_time <= gap <= fastpath.contention_bound(costs, model.num_layers, hw) + 1e-9 * ref.wall_time
    assert rel(closed.step_time.mean(), ref.step_time.mean()) <= 0.01
    np.testing.assert_allclose(fast.compute, ref.compute)  # the same busy time, whichever solver


def test_simpy_waits_for_the_host_work_it_runs_beside_the_layer():
    hw = get_gpu("h100-sxm")
    policy = analytic.Offload(TierConfig(0.25, 0.75, 0.0, 0.0))
    work = _work(policy, 64, steps=16)
    costs = strategies.step_costs("host-attention", GQA, hw, policy, work)
    assert np.all(costs.host > costs.host_window)  # the host part outlasts the HBM-tier attention here
    ref = step.solve(costs, GQA.num_layers, hw, "simpy")
    # Every layer waits for its host part: a step is never shorter than L host parts plus the GPU work after them.
    floor = GQA.num_layers * (costs.host + costs.compute - costs.host_window)
    assert np.all(ref.step_time >= floor * (1 - 1e-9))
    # Without the host work the same GPU work is quicker by exactly the host's excess on every layer.
    bare = step.solve(replace(costs, host=0.0), GQA.num_layers, hw, "simpy")
    excess = GQA.num_layers * np.maximum(costs.host - costs.host_window, 0.0)
    np.testing.assert_allclose(ref.step_time - bare.step_time, excess, rtol=1e-9, atol=1e-12)


def test_the_grid_runs_any_strategy_through_simpy_and_names_it(trace):
    """A row's strategy is the costs' own (no longer guessed back from the prefetch share)."""
    from tiersim.simulator.capacity import run, scenario_from_trace

    sc = scenario_from_trace(trace, GQA, get_gpu("h100-sxm"), 16, 2000.0, steps=24)
    sc = replace(sc, engine="simpy")
    policy = sc.policy(0.5, 0.5, 0.0, 0.0)
    for name in registry.NAMES:
        row, _ = run(sc, policy, largest=False, strategy=name)
        assert row["strategy"] == name and row["method"] == "SimPy"
    assert run(replace(sc, prefetch="cover99"), replace(sc, prefetch="cover99").policy(0.5, 0.5, 0.0, 0.0),
               largest=False)[0]["strategy"] == "selective"


# -- the public constructor -------------------------------------------------------------------------------
def test_price_from_aggregate_counts_is_the_workload_s_costs():
    hw = get_gpu("h100-sxm")
    tiers = TierConfig(0.5, 0.5, 0.0, 0.0)
    policy = analytic.Offload(tiers)
    work = _work(policy, 32, steps=12)
    for name in registry.NAMES:
        whole = strategies.step_costs(name, GQA, hw, policy, work, cover=0.8)
        priced = step.price(GQA, hw, tiers, 32, work.hbm, work.ddr, work.compressed, work.demoted, work.context,
                            strategy=name, cover=0.8)
        np.testing.assert_allclose(step.closed_form(priced, GQA.num_layers)[0],
                                   step.closed_form(whole, GQA.num_layers)[0], rtol=1e-12)
        one = step.price(GQA, hw, tiers, 32, float(work.hbm[3]), float(work.ddr[3]), context=float(work.context[3]),
                         demoted=float(work.demoted[3]), strategy=name, cover=0.8, share=whole.share)
        assert one.compute.shape == (1,)
        assert step.closed_form(one, GQA.num_layers)[0][0] == pytest.approx(
            step.closed_form(whole, GQA.num_layers)[0][3], rel=1e-9)


# -- one vocabulary -------------------------------------------------------------------------------------
def test_the_simulator_prices_every_registered_strategy_and_the_cache_runs_its_own():
    from tiersim.hierarchy import access

    assert tuple(strategies.COSTS) == registry.NAMES == strategies.STRATEGIES
    assert strategies.APPROXIMATE == {n for n in registry.NAMES if not registry.get(n).exact}
    for name in registry.CACHE_STRATEGIES:
        made = access.make_access(name, 0.5)
        assert made.name == name and type(made).__name__ == registry.get(name).access
    assert registry.CACHE_STRATEGIES == ("prefetch", "host-attention", "hybrid", "selective")
    from tiersim.errors import ConfigError

    with pytest.raises(ConfigError, match="the cache runs strategies prefetch, host-attention, hybrid, selective"):
        access.make_access("recompute")


def test_tierconfig_reads_the_policy_names_from_the_registry_without_torch():
    """config.POLICIES is the registry's names (no mirror); each entry's class carries its own name, and the
    eviction baselines are exactly the entries other than the hierarchy."""
    import subprocess
    import sys

    from tiersim.hierarchy import config, registry as policies
    from tiersim.hierarchy.baselines import BASELINES

    assert config.POLICIES is policies.NAMES
    for name in policies.NAMES:
        assert policies.policy_class(name).name == name
    assert set(BASELINES) == set(policies.NAMES) - {"hierarchy"} == set(policies.BASELINE_NAMES)
    assert {n: c for n, c in policies.POLICY_CLASSES.items() if n != "hierarchy"} == BASELINES
    code = ("import sys; sys.modules['torch'] = None; from tiersim.hierarchy.config import TierConfig; "
            "TierConfig(0.5, 0.0, 0.0, 0.5, policy='h2o'); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "ok"


def test_the_cli_and_the_report_read_the_registry():
    from tiersim.cli import groups
    from tiersim.report import figures

    from tiersim.hierarchy import registry as policies
    from tiersim.report import style

    for name in registry.NAMES:
        assert figures.STRATEGY_SYMBOLS[name] == registry.get(name).symbol
        assert style.strategy_name(name).startswith(registry.get(name).label)
    assert style.strategy_name("compressed-transfer", True) == "int8 transfer * (approximate)"
    assert style.BASELINE_NAMES == {n: policies.REGISTRY[n].label for n in policies.NAMES if n != "hierarchy"}
    for name in registry.CACHE_STRATEGIES:
        assert name in groups.STRATEGY_HELP
    assert "recompute" not in groups.STRATEGY_HELP  # the cache's option lists what the cache runs


def test_the_approximate_note_and_the_share_option_read_the_registry():
    """capacity's footnote names only the approximate strategies compared, each with its registry caveat; the
    cache's --fetch-share help names the strategies that take a share."""
    from tiersim.cli import groups

    approximate = [n for n in registry.NAMES if not registry.get(n).exact]
    assert approximate and all(registry.get(n).caveat for n in approximate)
    note = registry.caveats(registry.NAMES)
    for name in registry.NAMES:
        spec = registry.get(name)
        assert (f"{spec.label} {spec.caveat}" in note) == (name in approximate)
    assert registry.caveats([n for n in registry.NAMES if registry.get(n).exact]) == ""
    takers = [n for n in registry.NAMES if registry.get(n).takes_share]
    assert registry.SHARE_TAKERS == tuple(takers)
    share_help = next(f for f in dataclasses.fields(groups.CacheShape) if f.name == "fetch_share").metadata["help"]
    assert share_help.startswith(" / ".join(takers) + ":")


def test_the_docs_list_the_registry_s_strategies_with_its_exactness():
    """The docs cannot import the registry, so this holds their lists to it: simulator.md's strategy bullets (in
    order, each called exact or approximate as the registry says), file-formats.md's list of a point's
    ``strategy`` values, and the README's list of what the cache runs."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bullets = re.findall(r"^\* \*\*`([a-z-]+)`\*\* \(([^)]*)\)", (root / "docs/simulator.md").read_text(), re.M)
    assert [name for name, _ in bullets] == list(registry.NAMES)
    for name, words in bullets:
        said = "approximate" if "approximate" in words else "exact" if "exact" in words else None
        assert said == ("exact" if registry.get(name).exact else "approximate"), (name, words)
    formats = " ".join((root / "docs/file-formats.md").read_text().split())
    assert ", ".join(registry.NAMES) in formats
    readme = (root / "README.md").read_text()
    paragraph = readme[readme.index("How the DDR tier reaches attention"):]
    paragraph = paragraph[: paragraph.index("\n\n")]
    named = [n for n in re.findall(r"`([a-z-]+)` \(", paragraph) if n in registry.REGISTRY]
    assert named == list(registry.CACHE_STRATEGIES)


def test_capacity_help_lists_every_strategy():
    from cli_run import invoke

    code, out, _ = invoke(["capacity", "--help"])
    assert code == 0
    flat = "".join(ch for ch in out if ch.isalnum() or ch in "-")  # rich wraps and boxes the help
    for name in registry.NAMES:
        assert name in flat, name


def test_the_compressed_tier_is_priced_as_the_cache_stores_it():
    """Codes plus float32 scale and minimum per group of ``quant_group`` and one int64 key-group index per
    token, as QuantizedKV holds them (quant.py), not fp16 per 32."""
    torch = pytest.importorskip("torch")
    from tiersim.hierarchy.quant import quantize_kv

    from tiersim.hierarchy import quant_layout

    shape = Model("toy", 1, 2, 64, 256, 4, 1e6)
    # A group wider than the head (128, 256 > 64): values are grouped by the whole head, keys by the group.
    for bits, group in ((4, 32), (8, 32), (4, 16), (4, 64), (4, 128), (8, 256)):
        n = 512  # a whole number of key groups
        k = torch.randn(1, shape.num_kv_heads, n, shape.head_dim)
        q = quantize_kv(k, torch.randn_like(k), bits=bits, group=group)
        assert q.key_scale.element_size() == q.value_min.element_size() == quant_layout.SCALE_BYTES
        assert q.key_group.element_size() == quant_layout.KEY_GROUP_INDEX_BYTES
        per_token = analytic.compressed_bytes_per_token_layer(shape, bits, group)
        assert per_token * n == q.nbytes(), (bits, group)
        tiers = TierConfig(0.5, 0.0, 0.5, 0.0, compressed_bits=bits, quant_group=group)
        assert analytic.compressed_ratio(shape, tiers) == per_token / shape.kv_bytes_per_token_layer


# -- the bytes the simulator charges are the bytes the cache moves ------------------------------------------
#: The tiny model's shape as the simulator sees it (float32 KV: 4 bytes per element).
TINY = Model("tiny-llama", 3, 2, 16, 64, 4, 1e5, kv_dtype_bytes=4)


def _cache_run(tiny_llama, strategy: str, share: float, retier_every: int):
    import torch

    from tiersim.compat import cache_kwargs
    from tiersim.hierarchy.cache import TieredCache

    records = []
    config = TierConfig(hbm=0.3, ddr=0.7, strategy=strategy, fetch_share=share, sink_tokens=2, recent_window=4,
                        retier_every=retier_every)
    cache = TieredCache(config, recorder=records.append)
    ids = torch.randint(1, 256, (1, 48), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(tiny_llama, cache),
                            max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    return cache, config, records


@pytest.mark.parametrize("strategy,share", [("prefetch", 1.0), ("host-attention", 1.0), ("hybrid", 0.5),
                                            ("selective", 0.5)])
def test_the_bytes_the_simulator_charges_are_the_bytes_the_cache_moves(tiny_llama, strategy, share):
    """Each executable strategy through TieredCache: its stats' bytes by direction equal the StepCosts priced
    from the same per-(step, layer) tier counts (what the step's attention saw: the previous step's DDR tier).
    One re-tiering (at prefill) keeps the DDR chunks free of promotion holes, which the cache's copies carry
    and the simulator does not model (see the next test)."""
    cache, tiers, records = _cache_run(tiny_llama, strategy, share, retier_every=10_000)
    hw = get_gpu("h100-sxm")
    kv = TINY.kv_bytes_per_token_layer
    seen = {}
    h2d = d2h = 0.0
    for r in records:
        ddr = seen.get(r.layer, 0) if r.step > 0 else 0
        seen[r.layer] = r.n_ddr
        if strategy == "selective":
            fixed = (r.ddr_fetched or 0) / ddr if ddr else 1.0
        elif strategy == "hybrid":  # the cache fetches the newest round(share * m) of each chunk
            fixed = 1.0 - round(share * ddr) / ddr if ddr else 0.0
        else:
            fixed = None
        costs = step.price(TINY, hw, tiers, 1, r.n_hbm, ddr, demoted=r.hbm_to_ddr, strategy=strategy, share=fixed)
        moved = costs.link_bytes()
        h2d += float(moved["h2d"][0])
        d2h += float(moved["d2h"][0])
    stats = cache.stats()
    assert stats["bytes_d2h"] > 0 and stats["bytes_h2d"] > 0
    assert (h2d, d2h) == (stats["bytes_h2d"], stats["bytes_d2h"])
    assert sum(r.hbm_to_ddr for r in records) * kv <= d2h  # demotions are in it


def test_promotion_holes_are_what_the_cache_copies_beyond_the_simulator(tiny_llama):
    """With re-tiering every 3 steps the cache promotes DDR tokens back and leaves holes in its chunks until it
    compacts them; its prefetch copies those too. The simulator charges the live tokens: the demotions still
    agree exactly, the prefetch is short by the holes only (a few % here)."""
    cache, tiers, records = _cache_run(tiny_llama, "prefetch", 1.0, retier_every=3)
    hw = get_gpu("h100-sxm")
    seen, h2d, d2h = {}, 0.0, 0.0
    for r in records:
        ddr = seen.get(r.layer, 0) if r.step > 0 else 0
        seen[r.layer] = r.n_ddr
        moved = step.price(TINY, hw, tiers, 1, r.n_hbm, ddr, demoted=r.hbm_to_ddr).link_bytes()
        h2d += float(moved["h2d"][0])
        d2h += float(moved["d2h"][0])
    stats = cache.stats()
    assert sum(r.ddr_to_hbm for r in records) > 0  # promotions happened
    assert d2h == stats["bytes_d2h"]
    assert h2d < stats["bytes_h2d"] <= 1.1 * h2d


def test_host_attentions_window_is_the_hbm_tier_attention_the_roofline_charges_an_unsplit_kernel_too():
    """host-attention overlaps its host part with the GPU's attention over the HBM tier: under an engine whose decode
    kernel does not split the KV (--engine-overhead trtllm, GPU.attn_block_bw) that attention is slower at batch 1,
    and the window is that slower attention (it used to be priced without the per-block limit)."""
    from tiersim.simulator import engines, physics

    hw = get_gpu("h100-sxm")
    trt = engines.apply(hw, "trtllm", GQA.num_layers)
    policy = analytic.Offload(TierConfig(0.25, 0.75, 0.0, 0.0))
    work = _work(policy, 1, steps=8)
    kv = work.hbm * GQA.kv_bytes_per_token_layer
    window = strategies.step_costs("host-attention", GQA, trt, policy, work).host_window
    attn = physics.attention_s(trt, kv, blocks=GQA.num_kv_heads)
    assert np.all(attn > physics.attention_s(hw, kv))
    np.testing.assert_allclose(window, np.minimum(attn, strategies.step_costs("host-attention", GQA, trt, policy,
                                                                               work).compute))

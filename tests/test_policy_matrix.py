"""One matrix over every policy (tests/default_policies.py): it runs inside `generate` on tiny models,
holds its budget at every step of every layer, and is bit-identical to DynamicCache when nothing is lost.
Rule-specific behaviour (which tokens a baseline keeps) is tested in test_baselines.py."""

import math

import pytest
from transformers import DynamicCache

from default_policies import DEFAULT_POLICIES
from generation import assert_identical, generate, random_prompt

from tiersim.hierarchy.cache import TieredCache
from tiersim.hierarchy.config import POLICIES, TierConfig
from tiersim.hierarchy.registry import POLICY_CLASSES, make_policy

ARCHS = ["tiny_llama", "tiny_qwen2"]
LOSSY = [pytest.param(p["lossy"], id=p["name"]) for p in DEFAULT_POLICIES]
LOSSLESS = [pytest.param(c, id=f"{p['name']}-hbm{c.hbm:g}") for p in DEFAULT_POLICIES for c in p["lossless"]]
PROMPT, NEW = 48, 32


def test_the_table_holds_every_registered_policy():
    names = [p["name"] for p in DEFAULT_POLICIES]
    assert sorted(names) == sorted(POLICY_CLASSES) == sorted(POLICIES)
    for p in DEFAULT_POLICIES:
        assert all(c.policy == p["name"] for c in [p["lossy"], *p["lossless"]])


def after_retier(config: TierConfig, context_len: int) -> dict[str, int]:
    """Tokens per tier right after a re-tiering point at ``context_len`` tokens, each rule written out:
    the hierarchy puts floor(ratio * T) in each lower tier and the rest in HBM (the matrix's settings
    never let the pinned sinks + recent window squeeze them; test_hierarchy_config covers that); a
    baseline keeps ceil(hbm * T)."""
    if config.policy == "hierarchy":
        lower = {t: int(r * context_len + 1e-9) for t, r in
                 (("ddr", config.ddr), ("compressed", config.compressed), ("evicted", config.evict))}
        assert sum(lower.values()) <= context_len - config.sink_tokens - config.recent_window
        return {"hbm": context_len - sum(lower.values()), **lower}
    keep = min(context_len, max(1, math.ceil(config.hbm * context_len - 1e-9)))
    return {"hbm": keep, "ddr": 0, "compressed": 0, "evicted": context_len - keep}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config", LOSSY)
def test_runs_inside_generate_and_keeps_its_budget(request, arch, config):
    model = request.getfixturevalue(arch)
    rows = []
    cache = TieredCache(config, recorder=rows.append)
    out = generate(model, random_prompt(model, PROMPT, seed=1), cache, NEW)
    assert out.sequences.shape[1] == PROMPT + NEW
    policy = make_policy(config)
    layers = model.config.num_hidden_layers
    assert len(rows) == NEW * layers  # one row per layer per forward (the last token is never fed back)
    for row in rows:
        # New tokens join HBM between re-tiering points: the last one set the counts.
        grown = row.step - max(s for s in range(row.step + 1) if policy.due(s))
        expected = after_retier(config, row.context_len - grown)
        expected["hbm"] += grown
        got = {t: getattr(row, f"n_{t}") for t in ("hbm", "ddr", "compressed", "evicted")}
        assert got == expected, (row.step, row.layer)
    final = [cache.tier_counts(i) for i in range(layers)]
    assert final[0]["evicted"] > 0, "test settings must really evict"
    if policy.tiered:
        assert final[0]["ddr"] > 0 and final[0]["compressed"] > 0, "test settings must really use every tier"
    for idx, layer in enumerate(cache.layers):
        counts = final[idx]
        assert layer.num_retained == counts["hbm"] + counts["ddr"] + counts["compressed"]
        assert counts["hbm"] + counts["ddr"] + counts["compressed"] + counts["evicted"] == layer.context_len
    assert cache.get_seq_length(0) == PROMPT + NEW - 1  # tokens seen, evicted ones included
    if config.policy == "streamingllm":  # sinks + the newest, re-tiered every step
        newest = cache.layers[0].context_len
        budget = math.ceil(config.hbm * newest - 1e-9)
        assert cache.layers[0].positions[0].tolist() == [0, 1, 2, 3] + list(range(newest - budget + 4, newest))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config", LOSSLESS)
def test_bit_identical_to_dynamic_cache_when_nothing_is_lost(request, arch, config):
    model = request.getfixturevalue(arch)
    ids = random_prompt(model, 40)
    ref = generate(model, ids, DynamicCache(), 48)
    cache = TieredCache(config)
    out = generate(model, ids, cache, 48)
    assert_identical(out, ref)
    counts = cache.tier_counts(0)
    assert counts["compressed"] == counts["evicted"] == 0
    if config.offloads:
        assert counts["ddr"] > 0, "test settings must really move tokens to DDR"
        assert cache.stats()["bytes_h2d"] > 0 and cache.stats()["bytes_d2h"] > 0

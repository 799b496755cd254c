"""Eviction baselines: exact budgets and the tokens each rule keeps, on hand-made LayerViews.

Inside `generate` every baseline runs in the policy matrix (test_policy_matrix.py)."""

import math

import pytest
import torch

from tiersim.errors import ConfigError
from tiersim.hierarchy.baselines import BASELINES, H2O, RKV, SnapKV, StreamingLLM, rkv_importance, rkv_redundancy
from tiersim.hierarchy.config import TierConfig
from tiersim.hierarchy.policy import EVICTED, HBM, LayerView, assign_tiers
from tiersim.hierarchy.registry import make_policy


def config(policy: str, hbm: float, **kwargs) -> TierConfig:
    return TierConfig(hbm=hbm, evict=1.0 - hbm, policy=policy, **kwargs)


def view(positions, context_len, cumulative=None, recent=None, keys=None, kv_heads=1, step=16) -> LayerView:
    positions = torch.as_tensor(positions, dtype=torch.long).reshape(1, -1)
    n = positions.shape[1]
    if cumulative is None:
        cumulative = torch.zeros(1, n)
    return LayerView(
        positions=positions,
        cumulative=torch.as_tensor(cumulative, dtype=torch.float32).reshape(1, n),
        recent_probs=recent,
        keys=keys,
        context_len=context_len,
        prompt_len=min(context_len, 10),
        step=step,
        num_kv_heads=kv_heads,
    )


def kept(policy, layer_view, already_evicted=0) -> list[int]:
    tiers = assign_tiers(policy, layer_view, already_evicted)
    assert set(tiers.unique().tolist()) <= {HBM, EVICTED}, "baselines only keep in HBM or evict"
    return layer_view.positions[tiers == HBM].tolist()


def random_view(n: int, context_len: int, seed: int, kv_heads: int = 2, q_heads: int = 4, r: int = 32) -> LayerView:
    gen = torch.Generator().manual_seed(seed)
    evicted = context_len - n
    # Retained positions: a random subset of the old tokens plus the newest ones, ascending.
    old = torch.randperm(context_len - 8, generator=gen)[: n - 8].sort().values
    positions = torch.cat((old, torch.arange(context_len - 8, context_len)))
    assert positions.numel() == n and evicted >= 0
    recent = torch.softmax(torch.randn(1, q_heads, r, n, generator=gen), dim=-1)
    keys = torch.randn(1, kv_heads, n, 16, generator=gen)
    return view(positions, context_len, torch.rand(n, generator=gen), recent, keys, kv_heads)


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize("hbm", [0.1, 0.25, 0.5, 0.7, 0.9])
def test_each_baseline_keeps_exactly_its_budget(name, hbm):
    policy = BASELINES[name](config(name, hbm))
    for seed, (n, context_len) in enumerate([(60, 60), (60, 100), (45, 300), (200, 201)]):
        layer_view = random_view(n, context_len, seed)
        budget = math.ceil(hbm * context_len - 1e-9)
        if budget > n:  # already within budget: nothing more to evict, nothing comes back
            assert len(kept(policy, layer_view, context_len - n)) == n
            continue
        assert len(kept(policy, layer_view, context_len - n)) == budget


def test_budget_is_the_hbm_share_rounded_up():
    policy = H2O(config("h2o", 0.25))
    assert [policy.budget(t) for t in (1, 3, 4, 5, 100, 101)] == [1, 1, 1, 2, 25, 26]
    assert policy.targets(view(range(8), 8), 0) == {"hbm": 2, "ddr": 0, "compressed": 0, "evicted": 6}
    # 0.7 * 10 is 7.000000000000001 in floating point: still 7 tokens, not 8.
    assert H2O(config("h2o", 0.7)).budget(10) == 7


def test_streamingllm_keeps_sinks_and_most_recent():
    policy = StreamingLLM(config("streamingllm", 0.5))
    # 40 tokens seen, 10 evicted earlier (positions 4..13): 30 retained, budget 20.
    positions = list(range(4)) + list(range(14, 40))
    # Scores must not matter: give the old middle tokens the highest attention.
    cumulative = torch.linspace(1.0, 0.0, len(positions))
    assert kept(policy, view(positions, 40, cumulative), already_evicted=10) == list(range(4)) + list(range(24, 40))


def test_streamingllm_sink_count_is_an_option():
    policy = StreamingLLM(config("streamingllm", 0.5, policy_options={"sinks": 1}))
    assert kept(policy, view(range(20), 20)) == [0] + list(range(11, 20))


def test_h2o_keeps_recent_half_and_heavy_hitters():
    policy = H2O(config("h2o", 0.5))
    n = 20  # budget 10: the 5 newest + the 5 top-scored of the rest
    cumulative = torch.full((n,), 0.01)
    heavy = [2, 6, 7, 11, 13]
    cumulative[heavy] = torch.tensor([0.9, 0.5, 0.8, 0.6, 0.7])
    cumulative[1] = 0.3  # sixth best: must go
    cumulative[18] = 0.0  # newest tokens stay whatever their score
    assert kept(policy, view(range(n), n, cumulative)) == heavy + list(range(15, 20))


def snap_recent(votes: list[float], window_tokens: int, r: int = 4, heads: int = 2) -> torch.Tensor:
    """Probabilities of r observation queries whose summed, head-averaged votes are ``votes`` on the prefix."""
    n = len(votes) + window_tokens
    probs = torch.zeros(1, heads, r, n)
    probs[..., : len(votes)] = torch.tensor(votes) / r
    return probs


def test_snapkv_pools_votes_and_keeps_window():
    policy = SnapKV(config("snapkv", 0.5, policy_options={"window": 4}))
    # 24 tokens, budget 12: the 4 newest + 8 by pooled votes over the 20-token prefix.
    votes = [0.0] * 20
    votes[3] = 1.0  # an isolated spike: pooled 0.2 on positions 1..5
    votes[12], votes[13], votes[14] = 0.3, 0.5, 0.4  # pooled 0.24 on 12..14, 0.18 on 15, 0.16 on 11
    result = kept(policy, view(range(24), 24, recent=snap_recent(votes, 4)))
    assert result == [1, 2, 3, 4, 5, 12, 13, 14, 20, 21, 22, 23]


def test_snapkv_pooling_changes_the_choice():
    # 20 tokens, budget 10: the 7-token window + the top 3 of a 13-token prefix.
    votes = [0.0] * 13
    votes[2] = 1.0  # a lone spike
    votes[8], votes[9], votes[10] = 0.40, 0.41, 0.42  # a cluster
    recent = snap_recent(votes, 7)
    window = list(range(13, 20))
    # Pooled (kernel 5): the cluster's members all get 1.23 / 5 = 0.246, the spike's area only 0.2.
    pooled = SnapKV(config("snapkv", 0.5, policy_options={"window": 7, "kernel": 5}))
    assert kept(pooled, view(range(20), 20, recent=recent)) == [8, 9, 10] + window
    # Unpooled (kernel 1) the raw votes decide: the spike beats every cluster member.
    unpooled = SnapKV(config("snapkv", 0.5, policy_options={"window": 7, "kernel": 1}))
    assert kept(unpooled, view(range(20), 20, recent=recent)) == [2, 9, 10] + window


def test_snapkv_default_window_is_32():
    policy = SnapKV(config("snapkv", 0.5))
    assert policy.recent_queries == 32 and policy.options == {"window": 32, "kernel": 5}
    recent = torch.softmax(torch.randn(1, 2, 32, 100), dim=-1)
    assert kept(policy, view(range(100), 100, recent=recent))[-32:] == list(range(68, 100))


def test_rkv_importance_max_over_group_mean_over_queries_max_pooled():
    # 4 query heads, 2 KV heads (groups {0,1} and {2,3}), 2 queries, 12 tokens.
    probs = torch.zeros(1, 4, 2, 12)
    probs[0, 1, 0, 5] = 0.8  # head 1 only: max over group 0 keeps it, a mean would halve it
    probs[0, 0, 1, 5] = 0.2
    probs[0, 2, :, 9] = 0.6
    imp = rkv_importance(probs, num_kv_heads=2, kernel=7)
    assert imp.shape == (1, 2, 12)
    # group 0 at token 5: max(0.8, 0) for query 0, max(0.2, 0) for query 1 -> mean 0.5, spread over 2..8.
    assert torch.allclose(imp[0, 0], torch.tensor([0.0, 0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0, 0, 0]))
    assert torch.allclose(imp[0, 1], torch.tensor([0.0] * 6 + [0.6] * 6))


def test_rkv_redundancy_matches_the_similarity_matrix():
    keys = torch.randn(2, 3, 17, 8)
    unit = torch.nn.functional.normalize(keys, dim=-1)
    sim = unit @ unit.transpose(-1, -2)
    sim = sim - torch.diag_embed(torch.diagonal(sim, dim1=-2, dim2=-1))
    expected = torch.softmax(sim.sum(-1) / 16, dim=-1)
    assert torch.allclose(rkv_redundancy(keys), expected, atol=1e-6)


def test_rkv_evicts_redundant_keys_first():
    policy = RKV(config("rkv", 0.5))  # 20 tokens -> budget 10: the last 8 + 2 of the 12 candidates
    gen = torch.Generator().manual_seed(0)
    keys = torch.zeros(1, 1, 20, 8)
    keys[0, 0, :, 0] = 1.0  # candidates point the same way...
    keys[0, 0, :12] += 0.01 * torch.randn(12, 8, generator=gen)
    keys[0, 0, 4] = torch.tensor([0.0, 1, 0, 0, 0, 0, 0, 0])  # ...except two distinct keys
    keys[0, 0, 9] = torch.tensor([0.0, 0, 1, 0, 0, 0, 0, 0])
    keys[0, 0, 12:] = torch.randn(8, 8, generator=gen)
    recent = torch.full((1, 2, 8, 20), 1 / 20)  # uniform attention: importance cannot decide
    layer_view = view(range(20), 20, recent=recent, keys=keys, kv_heads=1, step=128)
    assert kept(policy, layer_view) == [4, 9] + list(range(12, 20))


def test_rkv_lambda_one_is_pure_importance():
    policy = RKV(config("rkv", 0.5, policy_options={"lam": 1.0, "kernel": 1}))
    recent = torch.zeros(1, 2, 8, 20)
    recent[0, 0, :, 3] = 0.5
    recent[0, 1, :, 7] = 0.4
    keys = torch.randn(1, 1, 20, 8)
    assert kept(policy, view(range(20), 20, recent=recent, keys=keys, kv_heads=1)) == [3, 7] + list(range(12, 20))


def test_schedules():
    h2o, stream = H2O(config("h2o", 0.5)), StreamingLLM(config("streamingllm", 0.5))
    snap = SnapKV(config("snapkv", 0.5, retier_every=16))
    rkv = RKV(config("rkv", 0.5))
    assert all(h2o.due(s) and stream.due(s) for s in range(40))
    assert [s for s in range(300) if snap.due(s)] == list(range(0, 300, 16))
    assert [s for s in range(300) if rkv.due(s)] == [0, 128, 256]


def test_make_policy_builds_baselines_and_bad_settings_fail():
    for name, cls in BASELINES.items():
        assert type(make_policy(config(name, 0.5))) is cls
        assert cls.tiered is False
    with pytest.raises(ConfigError, match="ddr"):
        H2O(TierConfig(hbm=0.5, ddr=0.2, evict=0.3, policy="h2o"))
    with pytest.raises(ConfigError, match="hbm"):
        H2O(TierConfig(hbm=0.0, evict=1.0, policy="h2o"))
    with pytest.raises(ConfigError, match="'windw'"):
        SnapKV(config("snapkv", 0.5, policy_options={"windw": 8}))
    with pytest.raises(ConfigError, match="kernel"):
        RKV(config("rkv", 0.5, policy_options={"kernel": 0}))
    with pytest.raises(ConfigError, match="lam"):
        RKV(config("rkv", 0.5, policy_options={"lam": 1.5}))


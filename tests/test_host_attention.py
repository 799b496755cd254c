"""host-attention: the DDR part of attention computed where the DDR tokens live, merged by log-sum-exp."""

import threading

import pytest
import torch
from transformers import DynamicCache

from tiersim.compat import cache_kwargs
from tiersim.errors import ConfigError
from tiersim.hierarchy import TierConfig, split_attention
from tiersim.hierarchy.access import HostAttention, Prefetch
from tiersim.hierarchy.cache import TieredCache
from tiersim.hierarchy.scoring import attention_probabilities

SMALL = dict(sink_tokens=2, recent_window=4, retier_every=3)


def _full_attention(query, keys, values, allowed, scaling):
    """Reference: one float64 softmax over all keys ([B, Hq, q, N] allowed), GQA by repeating heads."""
    group = query.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    logits = (query.double() @ k.transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return probs @ v, probs


@pytest.mark.parametrize("q_len", [1, 5])
def test_merge_of_parts_equals_full_softmax_attention_ragged_masked_gqa(q_len):
    gen = torch.Generator().manual_seed(3)
    batch, kv_heads, q_heads, dim, n = 2, 2, 6, 16, 40
    query = torch.randn(batch, q_heads, q_len, dim, generator=gen)
    keys = torch.randn(batch, kv_heads, n, dim, generator=gen) * 2
    values = torch.randn(batch, kv_heads, n, dim, generator=gen)
    mask = torch.rand(batch, 1, q_len, n, generator=gen) > 0.3  # a padding/causal-like mask, ragged per row
    mask[1, :, 0, :] = False  # a query that sees nothing (a left-pad query): zero output, no NaN
    # Split the slots into three parts (two device tiers, one DDR) in a scrambled order, with a
    # padded (invalid) entry in one part: the ragged-tier layout of the cache.
    perm = torch.randperm(n, generator=gen)
    pieces = [perm[:15], perm[15:22], perm[22:]]
    segments_of = []
    for i, piece in enumerate(pieces):
        slots = piece.expand(batch, -1).clone()
        valid = torch.ones_like(slots, dtype=torch.bool)
        if i == 1:  # row 1 holds one token fewer: its last entry is padding with a garbage slot
            valid[1, -1] = False
            slots[1, -1] = pieces[0][0]
            dropped = int(piece[-1])
        allowed = split_attention.allowed_columns(mask, slots, valid, q_len, n)
        k = torch.stack([keys[b][:, slots[b]] for b in range(batch)])
        v = torch.stack([values[b][:, slots[b]] for b in range(batch)])
        segments_of.append((split_attention.Segment(k, v, allowed), slots, valid))
    # part A: tiers 0 and 1 softmaxed together; part B: tier 2 alone
    part_a = split_attention.partial_attention(query, [s for s, _, _ in segments_of[:2]], 0.25, n_probs=q_len)
    part_b = split_attention.partial_attention(query, [segments_of[2][0]], 0.25, n_probs=q_len)
    out, _, weights = split_attention.merge([part_a, part_b])
    # row 1 does not hold the token its padded entry replaced: the reference hides that slot
    ref_mask = mask.expand(batch, q_heads, q_len, n).clone()
    ref_mask[1, :, :, dropped] = False
    ref_out, ref_probs = _full_attention(query, keys, values, ref_mask, 0.25)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0]))
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    # the probabilities, weighted back to the whole softmax, land on their slots
    full = torch.zeros(batch, q_heads, q_len, n + 1, dtype=torch.float64)
    for (seg, slots, valid), p, w in zip(
        segments_of, part_a.probs + part_b.probs, [weights[0], weights[0], weights[1]]
    ):
        target = torch.where(valid, slots, torch.full_like(slots, n))
        full.scatter_(-1, target[:, None, None, :].expand(batch, q_heads, q_len, -1), p.double() * w[..., None])
    torch.testing.assert_close(full[..., :n], ref_probs, rtol=0, atol=1e-6)


def test_causal_columns_without_a_mask_follow_the_slots():
    slots = torch.tensor([[0, 4, 2, 5]])
    allowed = split_attention.allowed_columns(None, slots, None, q_len=2, n_keys=6)
    # queries at slots 4 and 5
    assert allowed[0, 0].tolist() == [[True, True, True, False], [True, True, True, True]]
    assert split_attention.allowed_columns(None, slots, None, q_len=1, n_keys=6) is None


@pytest.mark.parametrize("form", ["bool", "additive", "none"])
def test_every_reader_of_the_mask_agrees(form):
    # Split attention's columns, selective's visible keys and the prefill's padding all read the mask
    # through masks.allowed_keys: a left-padded causal mask, as bool, additive (dtype min) or absent.
    from tiersim.hierarchy.masks import allowed_keys
    from tiersim.hierarchy.scoring import visible_keys

    batch, q_len, n = 2, 3, 7
    causal = torch.ones(q_len, n, dtype=torch.bool).tril(n - q_len)
    bool_mask = causal.expand(batch, 1, q_len, n).clone()
    bool_mask[1, :, :, :2] = False  # row 1: two pad tokens
    mask = {"bool": bool_mask, "none": None,
            "additive": torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min)}[form]
    want = causal.expand(batch, 1, q_len, n) if mask is None else bool_mask
    whole = allowed_keys(mask, batch, q_len, n)
    assert torch.equal(whole, want)
    slots = torch.tensor([[6, 0, 3], [1, 5, 2]])
    columns = split_attention.allowed_columns(mask, slots, None, q_len, n)
    assert torch.equal(columns, torch.stack([want[b][..., slots[b]] for b in range(batch)]))
    visible = visible_keys(mask, batch, n)
    assert visible is None if mask is None else torch.equal(visible, want[:, 0, -1, :])


def _generate(model, ids, cache, new_tokens, mask=None):
    with torch.inference_mode():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids) if mask is None else mask, **cache_kwargs(model, cache),
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, output_logits=True,
            return_dict_in_generate=True, pad_token_id=0,
        )


def _max_logit_diff(out, ref) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(out.logits, ref.logits))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_host_attention_matches_dynamic_cache_over_128_greedy_steps(arch):
    from tiersim.models import tiny_model

    overrides = {"sliding_window": None} if arch == "mistral" else {}
    model = tiny_model(arch, **overrides)[0]
    ids = torch.randint(1, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    ref = _generate(model, ids, DynamicCache(), 128)
    cache = TieredCache(TierConfig(hbm=0.3, ddr=0.7, strategy="host-attention", **SMALL))
    out = _generate(model, ids, cache, 128)
    assert cache.tier_counts(0)["ddr"] > 50, "the DDR tier must really hold tokens"
    assert torch.equal(out.sequences, ref.sequences)
    assert _max_logit_diff(out, ref) <= 1e-4
    stats = cache.stats()
    # No layer-sized buffer for attention, but a re-tier reassembles the layer (promotions): that is the peak.
    cfg = model.config
    assert stats["peak_bytes"]["layer_buffer"] >= 2 * cfg.num_key_value_heads * 40 * cfg.head_dim * 4
    assert stats["bytes_h2d"] > 0 and stats["bytes_d2h"] > 0


def test_host_attention_with_a_padded_batch_and_compressed_tokens(tiny_llama):
    """Ragged rows (left padding: the mask), a compressed tier on the device side (its own segments)."""
    ids = torch.randint(1, 256, (2, 36), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    ids[1, :6] = 0
    config = dict(hbm=0.4, ddr=0.4, compressed=0.2, compressed_bits=8, quant_group=8, **SMALL)
    ref = _generate(tiny_llama, ids, TieredCache(TierConfig(**config)), 40, mask)
    cache = TieredCache(TierConfig(**config, strategy="host-attention"))
    out = _generate(tiny_llama, ids, cache, 40, mask)
    assert cache.tier_counts(0)["ddr"] > 0 and cache.tier_counts(0)["compressed"] > 0
    assert torch.equal(out.sequences, ref.sequences)
    assert _max_logit_diff(out, ref) <= 1e-4


def test_host_and_device_parts_run_in_separate_worker_threads(tiny_llama, monkeypatch):
    seen = []
    real = split_attention.partial_attention

    def spy(query, segments, scaling, n_probs=0):
        seen.append((threading.current_thread().name, query.data_ptr(), segments[0].keys.data_ptr()))
        return real(query, segments, scaling, n_probs)

    monkeypatch.setattr("tiersim.hierarchy.access.partial_attention", spy)
    cache = TieredCache(TierConfig(hbm=0.4, ddr=0.6, strategy="host-attention", **SMALL))
    _generate(tiny_llama, torch.randint(1, 256, (1, 30)), cache, 12)
    names = {name.rsplit("_", 1)[0] for name, _, _ in seen}
    assert names == {"tiersim-host", "tiersim-device"}
    host = [s for s in seen if s[0].startswith("tiersim-host")]
    device = [s for s in seen if s[0].startswith("tiersim-device")]
    assert len(host) == len(device) > 0
    # separate tensors: the host part has its own copy of the query and reads the DDR chunks
    assert all(h[1] != d[1] and h[2] != d[2] for h, d in zip(host, device))
    ddr_ptrs = {c.keys.data_ptr() for layer in cache.layers for c in layer.ddr}
    assert any(h[2] in ddr_ptrs for h in host)


def test_the_worker_threads_end_with_their_cache(tiny_llama):
    # The strategy has no shutdown call (a cache has no end: a later generate may continue it); its
    # threads must not outlive the cache instead.
    import gc

    before = set(threading.enumerate())
    cache = TieredCache(TierConfig(hbm=0.4, ddr=0.6, strategy="host-attention", **SMALL))
    out = _generate(tiny_llama, torch.randint(1, 256, (1, 30)), cache, 6)
    workers = [t for t in set(threading.enumerate()) - before if t.name.startswith("tiersim-")]
    assert {t.name.rsplit("_", 1)[0] for t in workers} == {"tiersim-host", "tiersim-device"}
    del cache, out
    gc.collect()
    for t in workers:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in workers)


def test_host_attention_probabilities_match_the_scoring_attention(tiny_llama, monkeypatch):
    """The policy ranks by the same probabilities whichever strategy computes attention."""
    got = {}

    def capture(strategy):
        cache = TieredCache(TierConfig(hbm=0.4, ddr=0.6, strategy=strategy, **SMALL))
        rows = []
        real = cache.observe_attention

        def observe(layer_idx, probs, visible=None, scratch_bytes=0):
            if layer_idx == 1:
                rows.append(probs.clone())
            return real(layer_idx, probs, visible=visible, scratch_bytes=scratch_bytes)

        cache.observe_attention = observe
        _generate(tiny_llama, torch.randint(1, 256, (1, 30), generator=torch.Generator().manual_seed(2)), cache, 10)
        got[strategy] = (rows, cache)

    capture("prefetch")
    capture("host-attention")
    (a, ca), (b, cb) = got["prefetch"], got["host-attention"]
    assert len(a) == len(b)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)
    assert ca.tier_counts(1) == cb.tier_counts(1)


def test_strategy_is_a_validated_tier_config_field():
    assert TierConfig().strategy == "prefetch"
    assert TierConfig(strategy="host-attention").to_dict()["strategy"] == "host-attention"
    assert isinstance(TieredCache(TierConfig()).access, Prefetch)
    assert isinstance(TieredCache(TierConfig(strategy="host-attention")).access, HostAttention)
    with pytest.raises(ConfigError, match="strategy must be one of prefetch, host-attention, hybrid, selective"):
        TierConfig(strategy="recompute")


def test_scoring_probabilities_reference_is_unchanged_by_the_split():
    """attention_probabilities (the prefetch path's scorer) is the softmax of q·k·scale, GQA heads matched
    to their KV head (query heads 0-1 read KV head 0, 2-3 read KV head 1)."""
    q = torch.randn(1, 4, 1, 8)
    k = torch.randn(1, 2, 10, 8)
    p = attention_probabilities(q, k, None, 0.3)
    expected = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, dim=1)) * 0.3, dim=-1)
    torch.testing.assert_close(p, expected)


def test_host_attention_on_smollm2_matches_dynamic_cache(smollm2):
    """The real model, float32, a few bundled prompts (the full 30: benchmarks/bench_host_attention.py)."""
    from tiersim.models import format_prompt
    from tiersim.prompts import load_prompts

    model, tokenizer = smollm2
    for prompt in load_prompts(n=2):
        ids = format_prompt(tokenizer, prompt.prompt)
        ref = _generate(model, ids, DynamicCache(), 48)
        cache = TieredCache(TierConfig(hbm=0.5, ddr=0.5, sink_tokens=4, recent_window=16, retier_every=8,
                                       strategy="host-attention"))
        out = _generate(model, ids, cache, 48)
        assert cache.tier_counts(0)["ddr"] > 0
        assert torch.equal(out.sequences, ref.sequences), prompt.id
        assert _max_logit_diff(out, ref) <= 1e-4, prompt.id


def test_capture_runs_the_strategy_and_records_it(tmp_path):
    from cli_run import invoke

    from tiersim.traces import read

    out = tmp_path / "t.parquet"
    code, _, err = invoke(["capture", "--n", "1", "--max-new-tokens", "3", "--hbm", "0.5", "--ddr", "0.5",
                           "--compressed", "0", "--evict", "0", "--strategy", "host-attention", "--out", str(out)])
    assert code == 0, err
    assert read(out).meta["policy"]["strategy"] == "host-attention"
    code, _, err = invoke(["capture", "--strategy", "recompute", "--out", str(out)])
    assert code == 2 and "strategy must be one of prefetch, host-attention" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_hybrid_splits_the_ddr_tier_and_stays_exact(tiny_qwen2, share):
    """Part of each chunk joins the device part, the rest is host-attended; 0 is host-attention's split."""
    ids = torch.randint(1, 256, (2, 40), generator=torch.Generator().manual_seed(7))
    ref = _generate(tiny_qwen2, ids, DynamicCache(), 64)
    cache = TieredCache(TierConfig(hbm=0.3, ddr=0.7, strategy="hybrid", fetch_share=share, **SMALL))
    splits = []
    real = cache.access.split

    def spy(layer):
        fetched, host = real(layer)
        splits.append((sum(k.shape[2] for k, *_ in fetched), sum(k.shape[2] for k, *_ in host)))
        return fetched, host

    cache.access.split = spy
    out = _generate(tiny_qwen2, ids, cache, 64)
    assert torch.equal(out.sequences, ref.sequences)
    assert _max_logit_diff(out, ref) <= 1e-4
    on_device = sum(d for d, _ in splits) / sum(d + h for d, h in splits)
    assert abs(on_device - share) < 0.1
    assert abs(cache.stats()["ddr_fetched_share"] - share) < 0.1

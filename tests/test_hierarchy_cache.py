"""The tiered cache inside real `generate` calls: exactness, tier counts, eviction, errors."""

import pytest
import torch
from transformers import DynamicCache

from tiersim.compat import cache_kwargs
from tiersim.errors import TiersimError
from tiersim.hierarchy import TierConfig
from tiersim.hierarchy.cache import TieredCache, check_model_supported
from tiersim.hierarchy.policy import DDR, HBM

# Small settings so tokens really leave HBM within a short generation.
SMALL = dict(sink_tokens=2, recent_window=4, retier_every=3)


def _generate(model, ids, cache, new_tokens):
    with torch.inference_mode():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **cache_kwargs(model, cache),
            max_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )


def _assert_identical(out, ref):
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.logits) == len(ref.logits)
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        assert torch.equal(a, b), f"logits differ at step {step}"


def _random_prompt(model, length, seed=0, batch=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (batch, length), generator=gen)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("hbm", [1.0, 0.5, 0.1])
def test_lossless_offloading_is_bit_identical_on_tiny_models(request, arch, hbm):
    model = request.getfixturevalue(arch)
    ids = _random_prompt(model, 40)
    ref = _generate(model, ids, DynamicCache(), 48)
    cache = TieredCache(TierConfig(hbm=hbm, ddr=round(1 - hbm, 6), **SMALL))
    out = _generate(model, ids, cache, 48)
    _assert_identical(out, ref)
    counts = cache.tier_counts(0)
    if hbm < 1.0:
        assert counts["ddr"] > 0, "test settings must really move tokens to DDR"
        assert cache.stats()["bytes_h2d"] > 0 and cache.stats()["bytes_d2h"] > 0
    assert counts["compressed"] == counts["evicted"] == 0


def test_lossless_offloading_is_bit_identical_with_a_batch(tiny_llama):
    # Rows rank tokens differently, so tiers differ per row: the ragged DDR path is exercised.
    ids = _random_prompt(tiny_llama, 30, seed=3, batch=3)
    ref = _generate(tiny_llama, ids, DynamicCache(), 40)
    cache = TieredCache(TierConfig(hbm=0.3, ddr=0.7, **SMALL))
    out = _generate(tiny_llama, ids, cache, 40)
    _assert_identical(out, ref)
    tiers = cache.layers[1].tiers
    assert not torch.equal(tiers[0], tiers[1]), "rows should place different tokens in DDR"


def _left_padded(model):
    """Two prompts of 30 and 22 tokens, the shorter one left-padded, as a tokenizer would pad them."""
    ids = _random_prompt(model, 30, seed=5, batch=2)
    mask = torch.ones_like(ids)
    ids[1, :8], mask[1, :8] = 0, 0
    return ids, mask


def _generate_masked(model, ids, mask, cache, new_tokens):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), max_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)


def test_left_padded_batch_offloading_is_bit_identical(tiny_llama):
    ids, mask = _left_padded(tiny_llama)
    ref = _generate_masked(tiny_llama, ids, mask, DynamicCache(), 24)
    out = _generate_masked(tiny_llama, ids, mask, TieredCache(TierConfig(hbm=0.3, ddr=0.7, **SMALL)), 24)
    assert torch.equal(out, ref)


def test_left_padded_batch_with_eviction_is_refused(tiny_llama):
    # The padding mask is read by slot; after eviction the slots no longer match it (silent garbage).
    ids, mask = _left_padded(tiny_llama)
    cache = TieredCache(TierConfig(hbm=0.5, ddr=0.3, evict=0.2, **SMALL))
    with pytest.raises(TiersimError, match="padded batch cannot evict"):
        _generate_masked(tiny_llama, ids, mask, cache, 24)
    # An unpadded batch with the same eviction runs.
    unpadded = TieredCache(TierConfig(hbm=0.5, ddr=0.3, evict=0.2, **SMALL))
    _generate_masked(tiny_llama, ids, torch.ones_like(ids), unpadded, 24)
    assert unpadded.tier_counts(0)["evicted"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("hbm", [1.0, 0.5, 0.1])
def test_lossless_offloading_is_bit_identical_on_smollm2(smollm2, hbm):
    model, tokenizer = smollm2
    from tiersim.models import format_prompt

    ids = format_prompt(tokenizer, "A train travels 120 km in 1.5 hours. What is its average speed in km/h?")
    ref = _generate(model, ids, DynamicCache(), 40)
    cache = TieredCache(TierConfig(hbm=hbm, ddr=round(1 - hbm, 6), sink_tokens=4, recent_window=8, retier_every=4))
    out = _generate(model, ids, cache, 40)
    _assert_identical(out, ref)
    if hbm < 1.0:
        assert cache.tier_counts(29)["ddr"] > 0


def test_tier_counts_follow_ratios_on_every_layer(tiny_qwen2):
    cfg = TierConfig(hbm=0.4, ddr=0.3, compressed=0.2, evict=0.1, **SMALL)
    seen = []

    def recorder(row):
        seen.append(row)

    cache = TieredCache(cfg, recorder=recorder)
    _generate(tiny_qwen2, _random_prompt(tiny_qwen2, 50), cache, 31)
    retier_rows = [r for r in seen if r.step % cfg.retier_every == 0]
    assert retier_rows
    for row in retier_rows:
        t = row.context_len
        assert row.n_hbm + row.n_ddr + row.n_compressed + row.n_evicted == t
        assert row.n_evicted == int(cfg.evict * t + 1e-9)
        assert row.n_compressed == int(cfg.compressed * t + 1e-9)
        assert row.n_ddr == int(cfg.ddr * t + 1e-9)
    # Equal on every layer: the causal mask is shared by all layers.
    final = [cache.tier_counts(i) for i in range(tiny_qwen2.config.num_hidden_layers)]
    assert all(c == final[0] for c in final)
    assert cache.layers[0].num_retained == final[0]["hbm"] + final[0]["ddr"] + final[0]["compressed"]
    assert cache.get_seq_length(0) == 50 + 30  # tokens seen, evicted ones included


def test_sinks_and_recent_window_stay_in_hbm(tiny_llama):
    cfg = TierConfig(hbm=0.2, ddr=0.8, sink_tokens=3, recent_window=5, retier_every=1)
    cache = TieredCache(cfg)
    _generate(tiny_llama, _random_prompt(tiny_llama, 40), cache, 10)
    layer = cache.layers[0]
    pos, tiers = layer.positions[0], layer.tiers[0]
    newest = layer.context_len - 1
    pinned = (pos < 3) | (pos > newest - 5)  # re-tiered right after the newest token's attention
    assert (tiers[pinned] == HBM).all()
    assert (tiers == DDR).sum() > 0


def test_ddr_holds_the_least_attended_tokens(tiny_llama):
    cfg = TierConfig(hbm=0.5, ddr=0.5, sink_tokens=0, recent_window=0, retier_every=1)
    cache = TieredCache(cfg)
    _generate(tiny_llama, _random_prompt(tiny_llama, 30), cache, 5)
    # Re-rank with the scores the cache accumulated: every DDR token scored <= every HBM token
    # (as of the last re-tier; the newest token joined HBM after it).
    layer = cache.layers[1]
    score, tiers = layer.cumulative[0, :-1], layer.tiers[0, :-1]
    assert score[tiers == DDR].max() <= score[tiers == HBM].min() + 1e-3


def test_eviction_is_real_and_changes_output(tiny_llama):
    ids = _random_prompt(tiny_llama, 60, seed=1)
    ref = _generate(tiny_llama, ids, DynamicCache(), 30)
    cache = TieredCache(TierConfig(hbm=0.5, evict=0.5, **SMALL))
    out = _generate(tiny_llama, ids, cache, 30)
    counts = cache.tier_counts(0)
    assert counts["evicted"] >= 40
    assert cache.layers[0].num_retained == 60 + 29 - counts["evicted"]
    assert cache.get_seq_length(0) == 60 + 29
    assert not torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
def test_with_eviction_the_hbm_share_still_changes_nothing(request, arch):
    # The grid's central claim beyond evict 0: the evicted set, and so the output, does not depend on
    # how the retained tokens split between HBM and DDR.
    model = request.getfixturevalue(arch)
    ids = _random_prompt(model, 40, seed=2)
    caches = [TieredCache(TierConfig(hbm=h, ddr=round(0.8 - h, 6), evict=0.2, **SMALL)) for h in (0.8, 0.4, 0.1)]
    outs = [_generate(model, ids, cache, 40) for cache in caches]
    for out, cache in zip(outs[1:], caches[1:]):
        _assert_identical(out, outs[0])
        assert cache.tier_counts(0)["ddr"] > 0
        for layer, ref in zip(cache.layers, caches[0].layers):
            assert torch.equal(layer.positions, ref.positions)  # the same tokens retained
    assert caches[0].tier_counts(0)["evicted"] > 0


def test_eviction_is_permanent(tiny_llama):
    cache = TieredCache(TierConfig(hbm=0.7, evict=0.3, **SMALL))
    _generate(tiny_llama, _random_prompt(tiny_llama, 40), cache, 20)
    evicted = set(range(cache.layers[0].context_len)) - set(cache.layers[0].positions[0].tolist())
    assert len(evicted) == cache.tier_counts(0)["evicted"]


def test_compressed_tier_is_approximate_and_int8_beats_int4(tiny_llama):
    ids = _random_prompt(tiny_llama, 40, seed=2)
    ref = _generate(tiny_llama, ids, DynamicCache(), 12)
    diffs = {}
    for bits in (8, 4):
        cfg = TierConfig(hbm=0.5, compressed=0.5, compressed_bits=bits, quant_group=16, **SMALL)
        cache = TieredCache(cfg)
        out = _generate(tiny_llama, ids, cache, 12)
        n_comp = cache.tier_counts(0)["compressed"]
        assert n_comp > 0
        full_precision = n_comp * 2 * 2 * 16 * 4 * tiny_llama.config.num_hidden_layers  # K+V, 2 heads, fp32
        assert 0 < cache.stats()["bytes"]["compressed"] < full_precision
        diffs[bits] = max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits))
    assert 0 < diffs[8] < diffs[4]


def test_missing_scores_are_a_clear_error(tiny_llama):
    tiny_llama.set_attn_implementation("sdpa")
    try:
        with pytest.raises(TiersimError, match="attn_implementation='tiersim'"):
            _generate(tiny_llama, _random_prompt(tiny_llama, 10), TieredCache(TierConfig(hbm=0.5, ddr=0.5)), 4)
    finally:
        tiny_llama.set_attn_implementation("tiersim")


def test_beam_reordering_is_refused():
    with pytest.raises(TiersimError, match="beam"):
        TieredCache(TierConfig()).reorder_cache(torch.tensor([0]))


def test_sliding_window_models_are_refused():
    from transformers import MistralConfig, Qwen2Config

    with pytest.raises(TiersimError, match="sliding"):
        check_model_supported(MistralConfig(sliding_window=64, num_hidden_layers=2))
    check_model_supported(Qwen2Config(num_hidden_layers=2))  # window configured but not used: fine


def test_rejects_non_config():
    with pytest.raises(TiersimError, match="TierConfig"):
        TieredCache({"hbm": 0.5})


def test_a_stopped_generation_never_receives_another_forwards_scores(tiny_llama):
    # A generation that fails mid-forward leaves its cache registered as the scores' listener;
    # the next forward, with another cache, must neither report to it nor break.
    tiny_llama.set_attn_implementation("sdpa")
    stale = TieredCache(TierConfig(hbm=0.5, ddr=0.5))
    try:
        with pytest.raises(TiersimError):
            _generate(tiny_llama, _random_prompt(tiny_llama, 10), stale, 4)
    finally:
        tiny_llama.set_attn_implementation("tiersim")
    before = stale.layers[0].cumulative.clone()
    ids = _random_prompt(tiny_llama, 7, seed=5)
    ref = _generate(tiny_llama, ids, DynamicCache(), 5)
    out = _generate(tiny_llama, ids, TieredCache(TierConfig(hbm=0.5, ddr=0.5, **SMALL)), 5)
    _assert_identical(out, ref)
    assert torch.equal(stale.layers[0].cumulative, before)

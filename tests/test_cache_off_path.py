"""The tiered cache off the happy path: continuation, manual forward loops, padding, low precision.

Each test here failed before issue 12's fixes; together with tests/test_cache_memory.py they also hold
the cache to "tokens really leave HBM" and to honest byte accounting.
"""

import copy

import pytest
import torch
from transformers import DynamicCache

from tiersim.compat import cache_kwargs
from tiersim.errors import TiersimError
from tiersim.hierarchy import TierConfig
from tiersim.hierarchy.cache import TieredCache
from tiersim.hierarchy.policy import COMPRESSED, DDR, HBM

SMALL = dict(sink_tokens=2, recent_window=4, retier_every=3)


def _prompt(model, length, seed=0, batch=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (batch, length), generator=gen)


def _generate(model, ids, cache, new_tokens, mask=None, **kwargs):
    kwargs.setdefault("do_sample", False)
    with torch.inference_mode():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids) if mask is None else mask, **cache_kwargs(model, cache),
            max_new_tokens=new_tokens, output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kwargs,
        )


def _count_fed(cache):
    """Wrap ``cache.update`` to record how many tokens each forward feeds layer 0."""
    fed = []
    update = cache.update

    def counting(key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == 0:
            fed.append(key_states.shape[2])
        return update(key_states, value_states, layer_idx, *args, **kwargs)

    cache.update = counting
    return fed


# -- 1. continuation ---------------------------------------------------------------------------
def test_a_second_generate_after_eviction_feeds_only_the_new_tokens(tiny_llama):
    cache = TieredCache(TierConfig(hbm=0.5, ddr=0.2, evict=0.3, **SMALL))
    first = _generate(tiny_llama, _prompt(tiny_llama, 40), cache, 20)
    assert cache.tier_counts(0)["evicted"] > 0
    seen = cache.layers[0].context_len
    assert seen == first.sequences.shape[1] - 1  # the last sampled token was never fed
    assert cache.get_seq_length() == seen
    more = torch.cat((first.sequences, _prompt(tiny_llama, 5, seed=9)), dim=1)
    fed = _count_fed(cache)
    second = _generate(tiny_llama, more, cache, 6)
    assert fed[0] == more.shape[1] - seen == 6  # only the tokens the cache has not seen
    assert cache.layers[0].context_len == second.sequences.shape[1] - 1
    positions = cache.layers[0].positions[0]
    assert torch.equal(positions, torch.unique(positions))  # no token seen twice


@pytest.mark.parametrize("hbm", [1.0, 0.3])
def test_continuation_without_eviction_is_bit_identical(tiny_qwen2, hbm):
    ids = _prompt(tiny_qwen2, 30, seed=4)
    extra = _prompt(tiny_qwen2, 4, seed=8)
    results = []
    for cache in (DynamicCache(), TieredCache(TierConfig(hbm=hbm, ddr=round(1 - hbm, 6), **SMALL))):
        first = _generate(tiny_qwen2, ids, cache, 12)
        results.append(_generate(tiny_qwen2, torch.cat((first.sequences, extra), dim=1), cache, 10))
    assert torch.equal(results[0].sequences, results[1].sequences)
    for a, b in zip(results[0].logits, results[1].logits, strict=True):
        assert torch.equal(a, b)


def test_continuation_of_a_left_padded_batch_is_bit_identical(tiny_llama):
    ids = _prompt(tiny_llama, 30, seed=5, batch=2)
    mask = torch.ones_like(ids)
    ids[1, :8], mask[1, :8] = 0, 0
    extra = _prompt(tiny_llama, 3, seed=6, batch=2)
    results = []
    for cache in (DynamicCache(), TieredCache(TierConfig(hbm=0.3, ddr=0.7, **SMALL))):
        first = _generate(tiny_llama, ids, cache, 10, mask=mask)
        more = torch.cat((first.sequences, extra), dim=1)
        more_mask = torch.cat((mask, torch.ones(2, more.shape[1] - mask.shape[1], dtype=mask.dtype)), dim=1)
        results.append(_generate(tiny_llama, more, cache, 8, mask=more_mask))
    _assert_identical(results[1], results[0])


def test_a_multi_token_forward_after_eviction_stays_causal(tiny_llama):
    # Feeding 6 tokens at once after eviction must equal feeding them one by one (no re-tiering in
    # between): the mask puts the new queries after the retained keys, not after the tokens seen.
    cfg = TierConfig(hbm=0.5, ddr=0.2, evict=0.3, sink_tokens=2, recent_window=4, retier_every=100)
    cache = TieredCache(cfg)
    with torch.inference_mode():
        tiny_llama(input_ids=_prompt(tiny_llama, 40), **cache_kwargs(tiny_llama, cache))
    assert cache.tier_counts(0)["evicted"] == 12
    twin = copy.deepcopy(cache)
    new = _prompt(tiny_llama, 6, seed=3)
    with torch.inference_mode():
        together = tiny_llama(input_ids=new, **cache_kwargs(tiny_llama, cache)).logits
        apart = torch.cat([tiny_llama(input_ids=new[:, i : i + 1], **cache_kwargs(tiny_llama, twin)).logits
                           for i in range(6)], dim=1)
    torch.testing.assert_close(together, apart, rtol=1e-4, atol=1e-4)


# -- 2. manual forward loops -------------------------------------------------------------------
def _manual_greedy(model, ids, cache, steps, explicit_positions):
    """Prefill + greedy decode by calling the model directly, with or without ``position_ids``."""
    logits, token, seen = [], ids, 0
    with torch.inference_mode():
        for _ in range(steps):
            kwargs = {}
            if explicit_positions:
                kwargs["position_ids"] = torch.arange(seen, seen + token.shape[1])[None, :]
            out = model(input_ids=token, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1,
                        **kwargs).logits[:, -1]
            seen += token.shape[1]
            logits.append(out)
            token = out.argmax(-1, keepdim=True)
    return logits


def test_a_forward_without_position_ids_after_eviction_gets_the_right_positions(tiny_llama):
    ids = _prompt(tiny_llama, 40)
    cfg = TierConfig(hbm=0.5, ddr=0.2, evict=0.3, **SMALL)
    implicit = _manual_greedy(tiny_llama, ids, TieredCache(cfg), 12, explicit_positions=False)
    explicit = _manual_greedy(tiny_llama, ids, TieredCache(cfg), 12, explicit_positions=True)
    for step, (a, b) in enumerate(zip(implicit, explicit, strict=True)):
        assert torch.equal(a, b), f"logits differ at step {step}"


def test_a_manual_loop_matches_generate_with_eviction(tiny_qwen2):
    ids = _prompt(tiny_qwen2, 40, seed=6)
    cfg = TierConfig(hbm=0.4, ddr=0.3, evict=0.3, **SMALL)
    manual = _manual_greedy(tiny_qwen2, ids, TieredCache(cfg), 16, explicit_positions=False)
    cache = TieredCache(cfg)
    out = _generate(tiny_qwen2, ids, cache, 16)
    assert cache.tier_counts(0)["evicted"] > 0
    for step, (a, b) in enumerate(zip(manual, out.logits, strict=True)):
        assert torch.equal(a, b), f"logits differ at step {step}"


# -- chunked prefill ---------------------------------------------------------------------------
def test_chunked_prefill_records_the_whole_prompt(tiny_llama):
    ids = _prompt(tiny_llama, 40)
    ref = _generate(tiny_llama, ids, DynamicCache(), 8)
    cache = TieredCache(TierConfig(hbm=0.5, ddr=0.5, **SMALL))
    out = _generate(tiny_llama, ids, cache, 8, prefill_chunk_size=16)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(layer.prompt_len == 40 for layer in cache.layers)
    assert cache.layers[0].context_len == 40 + 7


# -- 3. left padding ---------------------------------------------------------------------------
def _left_padded(model, pads=8):
    ids = _prompt(model, 30, seed=5, batch=2)
    mask = torch.ones_like(ids)
    ids[1, :pads], mask[1, :pads] = 0, 0
    return ids, mask


@pytest.mark.parametrize("lower", ["ddr", "compressed"])
def test_left_padding_ranks_below_every_real_token(tiny_llama, lower):
    ids, mask = _left_padded(tiny_llama)
    cfg = TierConfig(hbm=0.4, **{lower: 0.6}, sink_tokens=2, recent_window=4, retier_every=2, quant_group=16)
    cache = TieredCache(cfg)
    _generate(tiny_llama, ids, cache, 9, mask=mask)
    code = DDR if lower == "ddr" else COMPRESSED
    for layer in cache.layers:
        assert torch.isfinite(layer.cumulative).all(), "a pad query's empty softmax must not poison the scores"
        assert layer.first_real.tolist() == [0, 8]
        pos, tiers = layer.positions[1], layer.tiers[1]
        assert (tiers[pos < 8] == code).all(), "pads leave HBM before any real token"
        assert (tiers[(pos >= 8) & (pos < 10)] == HBM).all(), "the row's first real tokens are its sinks"
        assert (tiers[pos > layer.context_len - 1 - 4] == HBM).all(), "the recent window stays"
        assert (layer.tiers[0][layer.positions[0] < 2] == HBM).all()  # the unpadded row keeps its own sinks


# -- 4. the compressed tier's size -------------------------------------------------------------
def _compressed_ratio(cache, model):
    """Bytes the compressed tier holds / bytes its tokens would take uncompressed (all layers)."""
    cfg = model.config
    per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize * cfg.num_hidden_layers
    return cache.stats()["bytes"]["compressed"] / (cache.tier_counts(0)["compressed"] * per_token)


def test_the_compressed_tier_stays_bounded_when_re_tiering_every_step(tiny_llama):
    cfg = TierConfig(hbm=0.5, ddr=0.2, compressed=0.3, sink_tokens=2, recent_window=4, retier_every=1,
                     compressed_bits=4, quant_group=16)
    cache = TieredCache(cfg)
    ratios = []

    def recorder(row):
        if row.layer == 2 and row.step % 50 == 49:
            ratios.append(_compressed_ratio(cache, tiny_llama))

    cache.recorder = recorder
    _generate(tiny_llama, _prompt(tiny_llama, 40), cache, 300, min_new_tokens=300)
    for layer in cache.layers:
        # Every key scale group still holds a token: the scales never outnumber the tokens.
        assert layer.comp.key_scale.shape[2] <= layer.comp.num_tokens
        # Arrivals wait at full precision only until a row has a full group.
        if layer.residual_index is not None:
            assert int(layer.residual_index.valid.sum(dim=1).max()) < cfg.quant_group
    # Quantized in full groups, the tier stays well below the uncompressed size, however long the run.
    assert len(ratios) == 6 and max(ratios) < 0.75 and ratios[-1] < 0.5
    assert ratios[-1] <= ratios[0] + 0.05
    # Re-tiering less often fills the groups: the tier is then well below the uncompressed size.
    sparse = TieredCache(TierConfig(**{**cfg.to_dict(), "retier_every": 16}))
    _generate(tiny_llama, _prompt(tiny_llama, 40), sparse, 120)
    assert _compressed_ratio(sparse, tiny_llama) < 0.5


# -- 6. refusals at the right time -------------------------------------------------------------
def test_a_quant_group_that_does_not_divide_head_dim_is_refused_up_front():
    from tiersim.models import tiny_model

    model = tiny_model("llama", head_dim=24)[0]  # 24 channels: groups of 16 do not tile them
    cfg = TierConfig(hbm=0.5, compressed=0.5, quant_group=16, **SMALL)
    with pytest.raises(TiersimError, match="quant_group=16 does not divide head_dim 24"):
        TieredCache(cfg, model=model)
    cache = TieredCache(cfg)  # without model=: at the first forward, before anything is re-tiered
    with pytest.raises(TiersimError, match="quant_group=16 does not divide head_dim 24"):
        _generate(model, _prompt(model, 10), cache, 2)
    assert not cache.layers[0].is_initialized
    TieredCache(TierConfig(hbm=0.5, compressed=0.5, quant_group=8, **SMALL), model=model)  # 8 divides 24
    TieredCache(TierConfig(hbm=0.5, ddr=0.5, quant_group=16, **SMALL), model=model)  # no compressed tier


@pytest.mark.parametrize("hbm", [1.0, 0.5])
def test_a_sliding_window_model_is_refused_without_model_argument(hbm):
    from tiersim.models import tiny_model

    mistral = tiny_model("mistral")[0]  # sliding_window=32
    cache = TieredCache(TierConfig(hbm=hbm, ddr=round(1 - hbm, 6), **SMALL))
    with pytest.raises(TiersimError, match="sliding-window"):
        _generate(mistral, _prompt(mistral, 10), cache, 2)
    no_window = tiny_model("mistral", sliding_window=None)[0]
    _generate(no_window, _prompt(no_window, 10), TieredCache(TierConfig(hbm=hbm, ddr=round(1 - hbm, 6))), 2)


# -- 7. beyond float32 greedy: low precision, sampling, long runs --------------------------------
def _tiny(dtype, arch="llama"):
    from tiersim.models import tiny_model

    return tiny_model(arch)[0].to(dtype)


def _assert_identical(out, ref):
    assert torch.equal(out.sequences, ref.sequences)
    for step, (a, b) in enumerate(zip(out.logits, ref.logits, strict=True)):
        assert torch.equal(a, b), f"logits differ at step {step}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lossless_offloading_is_bit_identical_in_low_precision(dtype):
    model = _tiny(dtype)
    ids = _prompt(model, 40, seed=1, batch=2)
    ref = _generate(model, ids, DynamicCache(), 32)
    cache = TieredCache(TierConfig(hbm=0.2, ddr=0.8, **SMALL))
    _assert_identical(_generate(model, ids, cache, 32), ref)
    assert cache.tier_counts(0)["ddr"] > 0
    assert all(chunk.keys.dtype == dtype for layer in cache.layers for chunk in layer.ddr)


def test_the_compressed_tier_in_bf16_stays_close():
    model = _tiny(torch.bfloat16)
    ids = _prompt(model, 40, seed=4)
    ref = _generate(model, ids, DynamicCache(), 2)
    cache = TieredCache(TierConfig(hbm=0.5, compressed=0.5, compressed_bits=8, quant_group=16, **SMALL))
    out = _generate(model, ids, cache, 2)
    assert cache.tier_counts(0)["compressed"] > 0
    assert cache.layers[0].comp.dequantize()[0].dtype == torch.bfloat16
    # The step after the prefill's re-tiering reads int8 codes: close, not equal.
    after = ref.logits[1].float()
    assert 0 < (out.logits[1].float() - after).abs().max() < 0.05 * after.abs().max()


def _sample(model, ids, cache, new_tokens, seed):
    torch.manual_seed(seed)
    return _generate(model, ids, cache, new_tokens, do_sample=True, temperature=0.9, top_k=50)


def test_sampling_with_offloading_draws_the_same_tokens(tiny_qwen2):
    ids = _prompt(tiny_qwen2, 30, seed=2, batch=2)
    ref = _sample(tiny_qwen2, ids, DynamicCache(), 40, seed=7)
    cache = TieredCache(TierConfig(hbm=0.3, ddr=0.7, **SMALL))
    _assert_identical(_sample(tiny_qwen2, ids, cache, 40, seed=7), ref)
    assert cache.tier_counts(0)["ddr"] > 0


def test_sampling_with_eviction_does_not_depend_on_the_hbm_share(tiny_llama):
    ids = _prompt(tiny_llama, 40, seed=3)
    outs = [_sample(tiny_llama, ids, TieredCache(TierConfig(hbm=h, ddr=round(0.8 - h, 6), evict=0.2, **SMALL)), 30,
                    seed=11) for h in (0.8, 0.2)]
    _assert_identical(outs[1], outs[0])


def test_a_300_token_run_is_bit_identical(tiny_qwen2):
    ids = _prompt(tiny_qwen2, 20, seed=5)
    ref = _generate(tiny_qwen2, ids, DynamicCache(), 300)
    cache = TieredCache(TierConfig(hbm=0.2, ddr=0.8, sink_tokens=4, recent_window=16, retier_every=8))
    _assert_identical(_generate(tiny_qwen2, ids, cache, 300), ref)
    counts = cache.tier_counts(0)
    assert counts["ddr"] >= 200 and cache.layers[0].context_len == 319
    # Chunks are compacted as promotions leave holes: the host copy stays close to the live tokens.
    held = cache.stats()["bytes"]
    assert held["ddr"] <= held["ddr_allocated"] <= 1.6 * held["ddr"]


def test_the_compressed_tier_puts_every_token_back_at_its_slot_in_a_ragged_batch(tiny_llama):
    # Layer 0's keys and values depend only on the tokens fed, so with the same tokens forced through
    # DynamicCache and TieredCache the reassembled layer must match the reference: exactly where a
    # token was never quantized (the pinned sinks and recent window), within the quantization error
    # everywhere else (a token promoted out of the tier keeps its dequantized value); a token at the
    # wrong slot would be off by far more. Rows rank differently, so they hold different numbers of
    # quantized and residual tokens (the padded paths).
    ids = _prompt(tiny_llama, 60, seed=12, batch=2)
    ref = DynamicCache()
    cache = TieredCache(TierConfig(hbm=0.4, ddr=0.2, compressed=0.4, compressed_bits=8, quant_group=8,
                                   sink_tokens=2, recent_window=4, retier_every=1))
    with torch.inference_mode():
        for c in (ref, cache):
            tiny_llama(input_ids=ids[:, :40], **cache_kwargs(tiny_llama, c))
            for i in range(40, 60):
                tiny_llama(input_ids=ids[:, i : i + 1], **cache_kwargs(tiny_llama, c))
    layer = cache.layers[0]
    keys, values = layer.assemble([(c.keys, c.values) for c in layer.ddr])
    ragged = layer.comp_index.dense_slots is None or layer.residual_index is not None
    assert ragged, "the rows should hold different quantized/residual splits"
    for row in range(2):
        pos = layer.positions[row]
        want_k, want_v = ref.layers[0].keys[row][:, pos], ref.layers[0].values[row][:, pos]
        pinned = (pos < 2) | (pos > layer.context_len - 1 - 4)
        assert torch.equal(keys[row][:, pinned], want_k[:, pinned])
        assert torch.equal(values[row][:, pinned], want_v[:, pinned])
        compressed = layer.tiers[row] == COMPRESSED
        for got, want in ((keys[row], want_k), (values[row], want_v)):
            err = (got - want).abs().amax(dim=(0, 2))  # per token
            assert err.max() < 0.02 * want.abs().max()
            assert err[compressed].max() > 0


@pytest.mark.slow
def test_smollm2_continuation_and_manual_loop_after_eviction(smollm2):
    model, tokenizer = smollm2
    from tiersim.models import format_prompt

    ids = format_prompt(tokenizer, "Name three prime numbers larger than 10.")
    cfg = TierConfig(hbm=0.5, ddr=0.3, evict=0.2, sink_tokens=4, recent_window=8, retier_every=4)
    implicit = _manual_greedy(model, ids, TieredCache(cfg), 8, explicit_positions=False)
    explicit = _manual_greedy(model, ids, TieredCache(cfg), 8, explicit_positions=True)
    for step, (a, b) in enumerate(zip(implicit, explicit, strict=True)):
        assert torch.equal(a, b), f"logits differ at step {step}"
    cache = TieredCache(cfg)
    first = _generate(model, ids, cache, 10)
    assert cache.tier_counts(29)["evicted"] > 0
    more = torch.cat((first.sequences, ids[:, -3:]), dim=1)
    fed = _count_fed(cache)
    _generate(model, more, cache, 2)
    assert fed[0] == 4  # the last generated token + the 3 appended


@pytest.mark.parametrize("batch,ragged", [(1, False), (2, False), (1, True), (2, True)])
def test_the_token_index_puts_each_valid_token_at_its_slot_and_nowhere_else(batch, ragged):
    # TokenIndex is the one scatter index of every tier (compressed, residual, DDR chunks): its dense
    # path (all entries valid) and its flat path (ragged rows) against a per-entry reference.
    from tiersim.hierarchy.cache import TokenIndex

    gen = torch.Generator().manual_seed(batch + 2 * ragged)
    heads, m, n, dim = 2, 5, 9, 3
    slot = torch.stack([torch.randperm(n, generator=gen)[:m] for _ in range(batch)])
    valid = torch.ones((batch, m), dtype=torch.bool)
    if ragged:
        valid[-1, 1] = valid[0, 3] = False
    index = TokenIndex(valid, slot)
    assert (index.dense_slots is None) == ragged
    src_k, src_v = torch.randn((batch, heads, m, dim), generator=gen), torch.randn((batch, heads, m, dim), generator=gen)
    keys, values = torch.full((batch, heads, n, dim), 7.0), torch.full((batch, heads, n, dim), 7.0)
    want_k, want_v, want_clear = keys.clone(), values.clone(), keys.clone()
    for b in range(batch):
        for j in range(m):
            if valid[b, j]:
                want_k[b, :, slot[b, j]] = src_k[b, :, j]
                want_v[b, :, slot[b, j]] = src_v[b, :, j]
                want_clear[b, :, slot[b, j]] = 0
    index.scatter(keys, values, src_k, src_v)
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)
    index.clear(keys, values)
    assert torch.equal(keys, want_clear) and torch.equal(values, want_clear)

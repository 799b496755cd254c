"""The cache's blind spots (issue 25), each held by a test that fails without its fix.

Every strategy's attention inputs include every tier; ``stats()`` counts every tensor the cache
keeps alive (found here by the garbage collector's own graph, not by the cache's list); ``reset()``
really resets; the quantizer refuses what it cannot represent and never overflows; the clear errors
a user gets (batch change, quant_group, an architecture that cannot take the scoring attention).
"""

from __future__ import annotations

import copy
import gc
import pickle
import queue
import threading
import types

import pytest
import torch
from transformers import DynamicCache

from exactness import HOST_ATTENTION_BOUND, logit_error_until_divergence
from generation import generate, random_prompt

from tiersim.compat import cache_kwargs
from tiersim.errors import TiersimError
from tiersim.hierarchy import TierConfig
from tiersim.hierarchy.cache import TieredCache
from tiersim.hierarchy.quant import error_bound, quantize_kv

SMALL = dict(sink_tokens=2, recent_window=4, retier_every=3)
STRATEGIES = [("prefetch", 1.0), ("selective", 0.5), ("host-attention", 1.0), ("hybrid", 0.5)]


def _max_diff(out, ref) -> float:
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(out.logits, ref.logits))


# -- every strategy's attention sees every tier --------------------------------------------------------------
@pytest.mark.parametrize("strategy,share", STRATEGIES[1:])  # prefetch is the reference itself
def test_an_empty_ddr_tier_beside_a_compressed_one_keeps_the_compressed_tokens(tiny_llama, strategy, share):
    """Short contexts fill the compressed tier before DDR: host-attention once attended to HBM alone."""
    config = dict(hbm=0.5, compressed=0.5, compressed_bits=8, quant_group=8, **SMALL)
    ids = random_prompt(tiny_llama, 30, seed=4)
    ref = generate(tiny_llama, ids, TieredCache(TierConfig(**config)), 12)  # prefetch: the reference path
    cache = TieredCache(TierConfig(**config, strategy=strategy, fetch_share=share))
    out = generate(tiny_llama, ids, cache, 12)
    assert cache.tier_counts(0)["compressed"] > 0 and cache.tier_counts(0)["ddr"] == 0
    assert torch.equal(out.sequences, ref.sequences)
    assert _max_diff(out, ref) <= 1e-4


def test_attention_without_scores_says_what_is_wrong(tiny_llama):
    """A model whose attention never calls the scoring attention: the error names the attention, not a tier."""
    model = copy.deepcopy(tiny_llama)
    model.set_attn_implementation("sdpa")
    cache = TieredCache(TierConfig(hbm=0.5, ddr=0.5, **SMALL))
    with pytest.raises(TiersimError, match="never called the 'tiersim' attention"):
        generate(model, random_prompt(model, 20), cache, 3)


# -- stats() counts every tensor the cache keeps alive -------------------------------------------------------
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
           threading.Thread, type(threading.Lock()), queue.SimpleQueue, types.FrameType)


def _reachable_storages(root) -> dict[int, int]:
    """{storage pointer: bytes} of every tensor the garbage collector reaches from ``root``, zero-width
    views included (a [B, 0] view keeps its whole parent buffer alive)."""
    storages, seen, stack = {}, set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _OPAQUE):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.nbytes():
                storages[storage.data_ptr()] = storage.nbytes()
            continue
        stack.extend(gc.get_referents(obj))
    return storages


@pytest.mark.parametrize("strategy,share", STRATEGIES)
@pytest.mark.parametrize("tiers", [dict(hbm=0.3, ddr=0.4, compressed=0.3), dict(hbm=0.4, ddr=0.6)])
def test_stats_count_every_storage_the_cache_keeps_alive(tiny_llama, strategy, share, tiers):
    cache = TieredCache(TierConfig(**tiers, quant_group=16, strategy=strategy, fetch_share=share, **SMALL))
    generate(tiny_llama, random_prompt(tiny_llama, 40, batch=2), cache, 20)
    held = cache.stats()["bytes"]
    reachable = _reachable_storages(cache)
    # On CPU the host and the device are one memory: every storage is either DDR or device-resident.
    assert held["device_resident"] + held["ddr_allocated"] == sum(reachable.values())
    assert held["ddr_allocated"] > 0
    if strategy == "selective":
        assert held["predictor"] > 0  # the per-page key bounds live on the device


@pytest.mark.parametrize("policy", ["streamingllm", "h2o", "snapkv", "rkv"])
def test_stats_count_every_storage_under_every_eviction_baseline(tiny_llama, policy):
    options = {"every": 16} if policy == "rkv" else {}
    cache = TieredCache(TierConfig(hbm=0.4, evict=0.6, policy=policy, retier_every=8, policy_options=options))
    generate(tiny_llama, random_prompt(tiny_llama, 40, batch=2), cache, 20)
    held = cache.stats()["bytes"]
    assert held["device_resident"] + held["ddr_allocated"] == sum(_reachable_storages(cache).values())


@pytest.mark.parametrize("strategy,share", [("host-attention", 1.0), ("hybrid", 0.5)])
def test_host_attention_reports_the_layer_it_assembles_to_re_tier(tiny_llama, strategy, share):
    cache = TieredCache(TierConfig(hbm=0.3, ddr=0.7, strategy=strategy, fetch_share=share, **SMALL))
    generate(tiny_llama, random_prompt(tiny_llama, 40), cache, 12)
    cfg = tiny_llama.config
    # A re-tier reassembles the whole layer (promotions need the DDR tokens on the device): >= the prompt's K+V.
    layer_bytes = 2 * cfg.num_key_value_heads * 40 * cfg.head_dim * 4
    peak = cache.stats()["peak_bytes"]
    assert peak["layer_buffer"] >= layer_bytes


# -- reset() -----------------------------------------------------------------------------------------------
def test_reset_gives_a_cache_as_good_as_new(tiny_llama):
    config = TierConfig(hbm=0.4, ddr=0.3, compressed=0.2, evict=0.1, quant_group=16, **SMALL)
    first, second = random_prompt(tiny_llama, 30, seed=1), random_prompt(tiny_llama, 26, seed=2)
    cache = TieredCache(config)
    generate(tiny_llama, first, cache, 10)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.stats()["bytes"]["device_resident"] == 0
    out = generate(tiny_llama, second, cache, 10)
    new = TieredCache(config)
    fresh = generate(tiny_llama, second, new, 10)
    assert torch.equal(out.sequences, fresh.sequences)
    assert cache.stats() == new.stats()  # every counter and byte as if the first prompt had never run
    with pytest.raises(TiersimError, match="reset"):
        cache.layers[0].reset()


# -- the quantizer ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_quantizer_refuses_non_finite_input(bad):
    keys = torch.randn(1, 2, 32, 16)
    values = torch.randn(1, 2, 32, 16)
    keys[0, 1, 5, 3] = bad
    with pytest.raises(TiersimError, match="non-finite"):
        quantize_kv(keys, values, bits=8, group=16)
    with pytest.raises(TiersimError, match="non-finite"):
        quantize_kv(values, keys, bits=4, group=16)


@pytest.mark.parametrize("bits", [4, 8])
def test_the_quantizer_keeps_its_bound_at_the_edge_of_float32(bits):
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 2, 32, 16, generator=gen) * 2 - 1) * 3e38
    x[0, 0, 0, :] = 3e38
    x[0, 0, 1, :] = -3e38
    q = quantize_kv(x, x.flip(2), bits=bits, group=16)
    keys, values = q.dequantize()
    assert torch.isfinite(keys).all() and torch.isfinite(values).all()
    assert ((keys - x).abs() <= error_bound(x, bits, 16, "channel") * (1 + 1e-5)).all()
    assert ((values - x.flip(2)).abs() <= error_bound(x.flip(2), bits, 16, "token") * (1 + 1e-5)).all()


def test_a_non_finite_key_inside_the_cache_is_a_clear_error(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = float("inf")
    cache = TieredCache(TierConfig(hbm=0.5, compressed=0.5, quant_group=16, **SMALL))
    with pytest.raises(TiersimError, match="non-finite"):
        generate(model, random_prompt(model, 30), cache, 4)


# -- host-attention's exactness, per dtype ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_host_attention_stays_within_its_stated_bound_per_dtype(dtype):
    from tiersim.models import tiny_model

    model = tiny_model("llama")[0].to(dtype)
    identical = 0
    for seed in range(4):
        ids = random_prompt(model, 40, seed=seed)
        ref = generate(model, ids, DynamicCache(), 24)
        out = generate(model, ids, TieredCache(TierConfig(hbm=0.3, ddr=0.7, strategy="host-attention", **SMALL)), 24)
        worst, same = logit_error_until_divergence(out, ref)
        assert worst <= HOST_ATTENTION_BOUND[dtype], (seed, worst)
        identical += same
    if dtype == torch.float32:
        assert identical == 4  # the claim in float32: the same tokens


# -- the smaller defects ------------------------------------------------------------------------------------------
def test_a_batch_size_change_between_calls_is_a_clear_error(tiny_llama):
    cache = TieredCache(TierConfig(hbm=0.5, ddr=0.5, **SMALL))
    generate(tiny_llama, random_prompt(tiny_llama, 20), cache, 3)
    more = random_prompt(tiny_llama, 1, batch=2)
    with pytest.raises(TiersimError, match="batch of 1 .* this forward has 2"):
        with torch.inference_mode():
            tiny_llama(input_ids=more, **cache_kwargs(tiny_llama, cache))


@pytest.mark.parametrize("strategy", ["host-attention", "hybrid", "prefetch"])
def test_a_cache_survives_deepcopy_and_pickle_and_goes_on_identically(tiny_llama, strategy):
    config = TierConfig(hbm=0.4, ddr=0.6, strategy=strategy, fetch_share=0.5 if strategy == "hybrid" else 1.0, **SMALL)
    cache = TieredCache(config)
    out = generate(tiny_llama, random_prompt(tiny_llama, 30), cache, 6)
    token = out.sequences[:, -1:]
    copies = [copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))]
    with torch.inference_mode():
        logits = [tiny_llama(input_ids=token, **cache_kwargs(tiny_llama, c)).logits for c in (cache, *copies)]
    for other in logits[1:]:
        assert torch.equal(logits[0], other)


def test_a_quant_group_wider_than_the_head_is_refused(tiny_llama):
    config = TierConfig(hbm=0.5, compressed=0.5, quant_group=32, **SMALL)  # head_dim 16
    with pytest.raises(TiersimError, match="quant_group=32 is wider than head_dim 16"):
        TieredCache(config, model=tiny_llama)
    with pytest.raises(TiersimError, match="quant_group=32 is wider than head_dim 16"):
        generate(tiny_llama, random_prompt(tiny_llama, 20), TieredCache(config), 2)


def test_an_architecture_that_cannot_take_the_scoring_attention_is_told_so(tmp_path, monkeypatch):
    """transformers < 5.3 picks Falcon's attention class by name: the 'tiersim' name is a KeyError there."""
    from transformers import AutoModelForCausalLM, FalconConfig

    from tiersim import models

    FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)

    def picks_by_name(*args, attn_implementation=None, **kwargs):
        raise KeyError(attn_implementation)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", picks_by_name)
    with pytest.raises(TiersimError) as caught:
        models.load_model(str(tmp_path))
    message = str(caught.value)
    assert "falcon" in message and "cannot take the 'tiersim' attention" in message
    assert "load the model with attn_implementation" not in message and "\n" not in message

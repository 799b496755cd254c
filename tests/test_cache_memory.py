"""Tokens really leave HBM, and ``stats()`` reports every byte the cache holds.

A cache that kept every token in HBM (DDR written and counted but never read) would pass an
exactness test; these tests look at the tensors themselves.
"""

import copy
import dataclasses

import pytest
import torch
from transformers import DynamicCache

from tiersim.compat import cache_kwargs
from tiersim.hierarchy import TierConfig, scoring
from tiersim.hierarchy.cache import TieredCache, TieredLayer
from tiersim.hierarchy.policy import COMPRESSED, DDR, HBM

SMALL = dict(sink_tokens=2, recent_window=4, retier_every=3)


def _prompt(model, length, seed=0, batch=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (batch, length), generator=gen)


def _generate(model, ids, cache, new_tokens, **kwargs):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache),
                              max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)


def _tiny(dtype, arch="llama"):
    from tiersim.models import tiny_model

    return tiny_model(arch)[0].to(dtype)


def _tensors(obj, path="cache", seen=None):
    """Every tensor reachable from ``obj`` through attributes, dicts, lists, tuples: [(path, tensor)]."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        return [(path, obj)]
    if id(obj) in seen or obj is None or isinstance(obj, (str, int, float, bool, torch.dtype, torch.device)):
        return []
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = [(f"{path}[{k!r}]", v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
    elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
        fields = vars(obj) if hasattr(obj, "__dict__") else {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        items = [(f"{path}.{k}", v) for k, v in fields.items() if k not in ("config", "policy", "recorder")]
    else:
        return []
    found = []
    for sub_path, value in items:
        found += _tensors(value, sub_path, seen)
    return found


def _storage_bytes(pairs):
    storages = {}
    for _, t in pairs:
        if t.numel():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stats_count_every_tensor_the_cache_holds(dtype):
    model = _tiny(dtype)
    cache = TieredCache(TierConfig(hbm=0.3, ddr=0.4, compressed=0.3, quant_group=16, **SMALL))
    _generate(model, _prompt(model, 40, batch=2), cache, 20)
    found = _tensors(cache)
    host = [(p, t) for p, t in found if ".ddr[" in p and p.endswith((".keys", ".values"))]
    device = [(p, t) for p, t in found if (p, t) not in host and not any(t is h for _, h in host)]
    held = cache.stats()["bytes"]
    assert held["ddr_allocated"] == _storage_bytes(host) > 0
    assert held["device_resident"] == _storage_bytes(device)
    assert held["hbm"] > 0 and held["compressed"] > 0 and held["bookkeeping"] > 0
    peak = cache.stats()["peak_bytes"]
    assert peak["device"] == held["device_resident"] + peak["layer_buffer"] + peak["scoring"]


def test_stats_report_the_per_step_layer_buffer_and_the_scoring_copies(monkeypatch):
    model = _tiny(torch.bfloat16)
    assembled, scored = [], []
    real_assemble = TieredLayer.assemble
    real_probs = scoring.attention_probabilities

    def assemble(self, staged):
        keys, values = real_assemble(self, staged)
        if keys is not self.hbm_k:
            assembled.append(keys.numel() * keys.element_size() + values.numel() * values.element_size())
        return keys, values

    def probabilities(query, key, mask, scaling, n_queries=None, scratch=None):
        probs = real_probs(query, key, mask, scaling, n_queries, scratch)
        # The float32 key copy and the probabilities exist at the same time, at least.
        scored.append(key.numel() * 4 + probs.numel() * probs.element_size())
        return probs

    monkeypatch.setattr(TieredLayer, "assemble", assemble)
    monkeypatch.setattr(scoring, "attention_probabilities", probabilities)
    cache = TieredCache(TierConfig(hbm=0.3, ddr=0.7, **SMALL))
    _generate(model, _prompt(model, 40), cache, 12)
    held = cache.stats()["peak_bytes"]
    assert assembled and held["layer_buffer"] == max(assembled)
    assert scored and held["scoring"] >= max(scored)
    # Float32 queries, keys, logits, probabilities at the prefill's 32 scored queries: no more than that.
    cfg = model.config
    n, q = 40, 32
    bound = 4 * (cfg.num_attention_heads * q * cfg.head_dim + cfg.num_key_value_heads * n * cfg.head_dim
                 + 2 * cfg.num_attention_heads * q * n)
    assert held["scoring"] <= bound


@pytest.mark.parametrize("hbm", [0.5, 0.2])
def test_the_hbm_tier_holds_only_its_tokens_and_ddr_holds_the_rest(tiny_qwen2, hbm):
    ids = _prompt(tiny_qwen2, 40, seed=3, batch=2)
    ref = DynamicCache()
    _generate(tiny_qwen2, ids, ref, 16)
    cache = TieredCache(TierConfig(hbm=hbm, ddr=round(1 - hbm, 6), **SMALL))
    _generate(tiny_qwen2, ids, cache, 16)
    for layer, ref_layer in zip(cache.layers, ref.layers, strict=True):
        counts = {code: int((layer.tiers[0] == code).sum()) for code in (HBM, DDR)}
        assert counts[DDR] > counts[HBM] * (0.9 if hbm == 0.5 else 2)
        assert layer.hbm_k.shape[2] == layer.hbm_v.shape[2] == counts[HBM]  # nothing else on the device
        ddr_live = 0
        for row in range(2):
            # The HBM tensor holds exactly the HBM tokens, at the slots it claims.
            slots = layer.hbm_slot[row]
            assert (layer.tiers[row, slots] == HBM).all()
            positions = layer.positions[row, slots]
            assert torch.equal(layer.hbm_k[row], ref_layer.keys[row][:, positions])
            assert torch.equal(layer.hbm_v[row], ref_layer.values[row][:, positions])
            for chunk in layer.ddr:
                valid = chunk.valid[row]
                positions = layer.positions[row, chunk.slot[row, valid]]
                assert (layer.tiers[row, chunk.slot[row, valid]] == DDR).all()
                assert torch.equal(chunk.keys[row][:, valid], ref_layer.keys[row][:, positions])
                assert torch.equal(chunk.values[row][:, valid], ref_layer.values[row][:, positions])
                ddr_live += int(valid.sum())
        assert ddr_live == 2 * counts[DDR]
        # The DDR chunks are their own buffers, not views of the HBM tensor.
        hbm_storage = {layer.hbm_k.untyped_storage().data_ptr(), layer.hbm_v.untyped_storage().data_ptr()}
        for chunk in layer.ddr:
            assert chunk.keys.untyped_storage().data_ptr() not in hbm_storage


@pytest.mark.parametrize("tier", ["ddr", "compressed"])
def test_attention_really_reads_the_lower_tiers(tiny_llama, tier):
    # Spoil what a lower tier holds: the next step's logits must change (a tier that is written and
    # counted but never read would not notice).
    cache = TieredCache(TierConfig(hbm=0.4, **{tier: 0.6}, quant_group=16, **SMALL))
    out = _generate(tiny_llama, _prompt(tiny_llama, 40, seed=2), cache, 10)
    spoiled = copy.deepcopy(cache)
    for layer in spoiled.layers:
        if tier == "ddr":
            for chunk in layer.ddr:
                chunk.keys.mul_(-3.0)
                chunk.values.mul_(-3.0)
        else:
            layer.comp.value_min.add_(5.0)
            layer.comp.key_min.add_(5.0)
        assert int((layer.tiers[0] == (DDR if tier == "ddr" else COMPRESSED)).sum()) > 0
    token = out[:, -1:]
    with torch.inference_mode():
        a = tiny_llama(input_ids=token, **cache_kwargs(tiny_llama, cache)).logits
        b = tiny_llama(input_ids=token, **cache_kwargs(tiny_llama, spoiled)).logits
    assert not torch.allclose(a, b, atol=1e-3)

"""The tiered cache's CUDA path: pinned DDR chunks, side-stream prefetch into staging, exact results.

Skipped without CUDA (CI has none); `scripts/gpu_validate.sh` runs this file on the GPU machine. The
CPU tests prove the policy and the bookkeeping; these prove that the asynchronous copies (D2H demotion
into pinned memory, H2D prefetch on a side stream, event waits) deliver the same bytes in time.
"""

import pytest
import torch
from transformers import DynamicCache

from tiersim.compat import cache_kwargs
from tiersim.hierarchy import TierConfig
from tiersim.hierarchy.cache import TieredCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SMALL = dict(sink_tokens=2, recent_window=4, retier_every=3)


def _model(arch, dtype, **overrides):
    from tiersim.models import tiny_model

    model, _ = tiny_model(arch, **overrides)
    return model.to(device="cuda", dtype=dtype)


def _generate(model, ids, cache, new_tokens):
    with torch.inference_mode():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), max_new_tokens=new_tokens,
            do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )


def _prompt(model, length, batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (batch, length), generator=gen).cuda()


def _assert_identical(out, ref):
    assert torch.equal(out.sequences, ref.sequences)
    for step, (a, b) in enumerate(zip(out.logits, ref.logits, strict=True)):
        assert torch.equal(a, b), f"logits differ at step {step}: max |diff| {(a - b).abs().max().item():.3g}"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hbm", [0.5, 0.1])
def test_cuda_lossless_offloading_is_bit_identical(arch, dtype, hbm):
    model = _model(arch, dtype)
    ids = _prompt(model, 40, batch=2)
    ref = _generate(model, ids, DynamicCache(), 48)
    cache = TieredCache(TierConfig(hbm=hbm, ddr=round(1 - hbm, 6), **SMALL))
    out = _generate(model, ids, cache, 48)
    _assert_identical(out, ref)
    stats = cache.stats()
    assert cache.tier_counts(0)["ddr"] > 0 and stats["bytes_h2d"] > 0 and stats["bytes_d2h"] > 0


def test_cuda_ddr_tier_lives_in_pinned_host_memory():
    model = _model("llama", torch.float32)
    cache = TieredCache(TierConfig(hbm=0.3, ddr=0.7, **SMALL))
    _generate(model, _prompt(model, 40), cache, 24)
    chunks = [chunk for layer in cache.layers for chunk in layer.ddr]
    assert chunks, "tokens must have reached DDR"
    for chunk in chunks:
        assert chunk.keys.device.type == "cpu" and chunk.keys.is_pinned()
        assert chunk.values.device.type == "cpu" and chunk.values.is_pinned()


def test_cuda_with_eviction_the_hbm_share_changes_nothing():
    model = _model("qwen2", torch.float32)
    ids = _prompt(model, 40, seed=2)
    outs = [_generate(model, ids, TieredCache(TierConfig(hbm=h, ddr=round(0.8 - h, 6), evict=0.2, **SMALL)), 40)
            for h in (0.8, 0.4, 0.1)]
    for other in outs[1:]:
        _assert_identical(other, outs[0])


def test_cuda_compressed_tier_runs_and_stays_close():
    model = _model("llama", torch.float32)
    ids = _prompt(model, 40, seed=4)
    ref = _generate(model, ids, DynamicCache(), 1)
    out = _generate(model, ids, TieredCache(TierConfig(hbm=0.4, ddr=0.3, compressed=0.3, compressed_bits=8,
                                                       quant_group=16, **SMALL)), 1)
    # One step after the prefill's re-tiering: int8 codes perturb the logits only slightly.
    assert (out.logits[0] - ref.logits[0]).abs().max().item() < 0.05 * ref.logits[0].abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_stats_match_the_device_memory_the_cache_frees(dtype):
    # What the cache holds on the device is what stats() says: deleting it frees that much, up to the
    # allocator's 512-byte rounding per buffer. The DDR tier is in host memory and not counted.
    import gc

    model = _model("llama", dtype, num_attention_heads=8, num_key_value_heads=8, head_dim=64)
    cache = TieredCache(TierConfig(hbm=0.3, ddr=0.4, compressed=0.3, quant_group=16, **SMALL))
    _generate(model, _prompt(model, 160, batch=2), cache, 24)
    held = cache.stats()["bytes"]
    assert held["ddr_allocated"] > 0 and held["compressed"] > 0 and held["staging"] > 0
    buffers = 60 * len(cache.layers) + 4  # at most ~60 tensors per layer, 4 staging buffers
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    del cache
    gc.collect()
    torch.cuda.synchronize()
    freed = before - torch.cuda.memory_allocated()
    assert held["device_resident"] <= freed <= held["device_resident"] + 512 * buffers
    assert 512 * buffers < 0.1 * held["device_resident"]  # the tolerance is small next to what is checked


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("strategy", ["host-attention", "hybrid"])
def test_cuda_host_attention_attends_on_the_host_and_matches_dynamic_cache(arch, strategy, monkeypatch):
    """The DDR part runs on the CPU over the pinned chunks (query down, partial up on side streams)."""
    from tiersim.hierarchy import split_attention

    devices = []
    real = split_attention.partial_attention

    def spy(query, segments, scaling, n_probs=0):
        devices.append((query.device.type, segments[0].keys.device.type))
        return real(query, segments, scaling, n_probs)

    monkeypatch.setattr("tiersim.hierarchy.access.partial_attention", spy)
    model = _model(arch, torch.float32)
    ids = _prompt(model, 40, batch=2)
    ref = _generate(model, ids, DynamicCache(), 64)
    share = 0.5 if strategy == "hybrid" else 1.0
    cache = TieredCache(TierConfig(hbm=0.3, ddr=0.7, strategy=strategy, fetch_share=share, **SMALL))
    out = _generate(model, ids, cache, 64)
    assert torch.equal(out.sequences, ref.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(out.logits, ref.logits)) <= 1e-4
    assert ("cpu", "cpu") in devices and ("cuda", "cuda") in devices
    assert cache.tier_counts(0)["ddr"] > 0 and cache.stats()["peak_bytes"]["layer_buffer"] == 0
    assert all(c.keys.is_pinned() for layer in cache.layers for c in layer.ddr)

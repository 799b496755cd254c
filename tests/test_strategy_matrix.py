"""One matrix over every strategy the cache runs (the strategy registry) x every tier mix x dtype x batch shape.

What each strategy claims (tests/exactness.py) is held against the same mix with its DDR tier folded into
HBM, run by ``prefetch``: the DDR tier is exact, so where it sits cannot change the output (eviction
invariance: with the same compressed and evicted shares, any HBM/DDR split gives the same text).
``prefetch`` and ``selective`` at fetch share 1 must match bit for bit; ``host-attention`` and ``hybrid``
within their per-dtype bound (identical tokens in float32); ``selective`` below share 1 is approximate: it
keeps the tier budget and fetches less than the whole DDR tier. Mixes include an empty DDR tier beside a
compressed one (the case host-attention once dropped). Tiny random-init models from configs, no weights.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from exactness import HOST_ATTENTION_BOUND, logit_error_until_divergence
from generation import assert_identical, generate, random_prompt

from tiersim.compat import cache_kwargs
from tiersim.hierarchy.cache import TieredCache
from tiersim.hierarchy.config import TierConfig
from tiersim.hierarchy.strategies import APPROXIMATE, CACHE_STRATEGIES, REGISTRY

SMALL = dict(sink_tokens=2, recent_window=4, retier_every=3, quant_group=8, compressed_bits=8)
PROMPT, NEW = 32, 12
#: Every strategy the cache runs, at the whole DDR tier, and at half of it where the strategy takes a share.
RUNS = [(name, share) for name in CACHE_STRATEGIES
        for share in ((1.0, 0.5) if REGISTRY[name].takes_share else (1.0,))]
MIXES = {
    "ddr": dict(hbm=0.4, ddr=0.6),
    "ddr+compressed": dict(hbm=0.4, ddr=0.3, compressed=0.3),
    "compressed, empty ddr": dict(hbm=0.5, compressed=0.5),
    "ddr+evict": dict(hbm=0.4, ddr=0.4, evict=0.2),
    "all four": dict(hbm=0.3, ddr=0.3, compressed=0.2, evict=0.2),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: A left-padded batch of two: padding cannot evict (the cache refuses), so only the mixes that keep every token.
BATCHES = {"one": (1, None), "padded": (2, 5)}


@pytest.fixture(scope="module")
def models():
    from tiersim.models import tiny_model

    base = tiny_model("llama")[0]
    return {name: tiny_model("llama")[0].to(dtype) if dtype != torch.float32 else base
            for name, dtype in DTYPES.items()}


def _inputs(model, batch: str):
    rows, pads = BATCHES[batch]
    ids = random_prompt(model, PROMPT, seed=7, batch=rows)
    mask = torch.ones_like(ids)
    if pads:
        ids[1, :pads], mask[1, :pads] = 0, 0
    return ids, mask


def _run(model, ids, mask, cache):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), max_new_tokens=NEW,
                              min_new_tokens=NEW, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)


_REFERENCES: dict = {}


def _reference(model, dtype: str, mix: str, batch: str):
    """The mix with its DDR tier folded into HBM, by prefetch: what every exact strategy must reproduce."""
    key = (dtype, mix, batch)
    if key not in _REFERENCES:
        tiers = dict(MIXES[mix])
        tiers["hbm"] = round(tiers.get("hbm", 0) + tiers.pop("ddr", 0), 6)
        ids, mask = _inputs(model, batch)
        _REFERENCES[key] = _run(model, ids, mask, TieredCache(TierConfig(**tiers, **SMALL)))
    return _REFERENCES[key]


CASES = [pytest.param(s, share, mix, dtype, batch, id=f"{s}@{share:g}-{mix}-{dtype}-{batch}")
         for s, share in RUNS for mix in MIXES for dtype in DTYPES for batch in BATCHES
         if not (batch == "padded" and ("evict" in MIXES[mix] or dtype != "float32"))]


def test_the_matrix_keeps_the_mix_that_once_lost_the_compressed_tier():
    assert any("ddr" not in MIXES[m] and "compressed" in MIXES[m] for m in MIXES)


@pytest.mark.parametrize("strategy,share,mix,dtype,batch", CASES)
def test_every_strategy_keeps_its_claim_on_every_tier_mix(models, strategy, share, mix, dtype, batch):
    model = models[dtype]
    ids, mask = _inputs(model, batch)
    config = TierConfig(**MIXES[mix], **SMALL, strategy=strategy, fetch_share=share)
    cache = TieredCache(config)
    out = _run(model, ids, mask, cache)
    ref = _reference(model, dtype, mix, batch)
    counts = cache.tier_counts(0)
    assert (counts["ddr"] > 0) == ("ddr" in MIXES[mix]), counts  # the mix really uses the tiers it names
    assert (counts["compressed"] > 0) == ("compressed" in MIXES[mix]), counts
    if strategy in APPROXIMATE and share < 1.0:
        # Approximate: the same budget per tier as the exact path, and really less than the whole DDR tier read.
        exact = TieredCache(TierConfig(**MIXES[mix], **SMALL))
        _run(model, ids, mask, exact)
        assert counts == exact.tier_counts(0)
        if counts["ddr"]:
            assert cache.stats()["ddr_fetched_share"] < 1.0
        return
    if REGISTRY[strategy].access in ("Prefetch", "Selective"):
        assert_identical(out, ref)  # bit for bit: where the exact DDR tier sits changes nothing
        return
    worst, same = logit_error_until_divergence(out, ref)
    assert worst <= HOST_ATTENTION_BOUND[DTYPES[dtype]], worst
    if dtype == "float32":
        assert same


@pytest.mark.parametrize("batch", list(BATCHES))
def test_the_lossless_reference_is_the_full_cache(models, batch):
    """The matrix's reference for a mix without compressed or evicted tokens is DynamicCache itself."""
    model = models["float32"]
    ids, mask = _inputs(model, batch)
    assert_identical(_reference(model, "float32", "ddr", batch), _run(model, ids, mask, DynamicCache()))

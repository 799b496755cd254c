"""selective: a key-bound predictor picks the DDR pages fetched for each step's attention (approximate)."""

import pytest
import torch
from transformers import DynamicCache

from tiersim.compat import cache_kwargs
from tiersim.errors import ConfigError
from tiersim.hierarchy import TierConfig
from tiersim.hierarchy import pages
from tiersim.hierarchy.access import Selective
from tiersim.hierarchy.cache import TieredCache

SMALL = dict(sink_tokens=2, recent_window=4, retier_every=3)


def _generate(model, ids, cache, new_tokens):
    with torch.inference_mode():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True,
            pad_token_id=0,
        )


def _ids(batch=1, length=48, seed=4):
    return torch.randint(1, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [1, 2])
def test_selective_with_share_one_is_prefetch_bit_for_bit(tiny_llama, batch):
    ids = _ids(batch)
    ref = _generate(tiny_llama, ids, TieredCache(TierConfig(hbm=0.3, ddr=0.7, **SMALL)), 40)
    cache = TieredCache(TierConfig(hbm=0.3, ddr=0.7, strategy="selective", fetch_share=1.0, **SMALL))
    out = _generate(tiny_llama, ids, cache, 40)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        assert torch.equal(a, b)
    assert cache.stats()["ddr_fetched_share"] == 1.0
    prefetch = TieredCache(TierConfig(hbm=0.3, ddr=0.7, **SMALL))
    _generate(tiny_llama, ids, prefetch, 40)
    assert cache.stats()["bytes_h2d"] == prefetch.stats()["bytes_h2d"]  # it moved what prefetch moves


def test_selective_fetches_the_share_it_is_given_and_stays_close(tiny_llama):
    ids = _ids()
    full = _generate(tiny_llama, ids, DynamicCache(), 40)
    cache = TieredCache(TierConfig(hbm=0.3, ddr=0.7, strategy="selective", fetch_share=0.5, **SMALL))
    out = _generate(tiny_llama, ids, cache, 40)
    share = cache.stats()["ddr_fetched_share"]
    assert 0.3 < share < 0.75, share  # half the pages; pages hold different numbers of live tokens
    assert cache.stats()["peak_bytes"]["layer_buffer"] > 0
    # approximate, yet the largest-bound pages carry most of the mass: the logits stay near the full cache's
    first = (out.logits[0] - full.logits[0]).abs().max()
    assert first < 0.5 * full.logits[0].abs().max()
    # prefetch moves the whole tier every step; selective its share of it
    pf = TieredCache(TierConfig(hbm=0.3, ddr=0.7, **SMALL))
    _generate(tiny_llama, ids, pf, 40)
    assert cache.stats()["bytes_h2d"] < 0.8 * pf.stats()["bytes_h2d"]


def test_the_page_bound_is_an_upper_bound_of_every_key_in_the_page():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 2, 40, 8, generator=gen)

    class Chunk:
        bounds = None
        ready = None

    chunk = Chunk()
    chunk.keys = keys
    lo, hi = pages.page_bounds(chunk, torch.device("cpu"), Selective.PAGE)
    assert lo.shape == (2, 2, 3, 8)  # 40 tokens = 3 pages of 16 (the last one partial)
    query = torch.randn(2, 4, 1, 8, generator=gen)
    bound = pages.upper_bound(query, lo, hi)
    group_q = query.reshape(2, 2, 2, 8)
    logits = group_q @ keys.transpose(-1, -2)  # [B, Hkv, g, 40]
    for page in range(3):
        true_max = logits[..., page * 16 : (page + 1) * 16].amax(dim=(1, 2, 3))
        assert torch.all(bound[:, page] >= true_max - 1e-5)


def test_fetch_share_is_validated():
    with pytest.raises(ConfigError, match="fetch_share must be in"):
        TierConfig(strategy="selective", fetch_share=0.0)
    with pytest.raises(ConfigError, match="applies to strategies 'hybrid' and 'selective' only"):
        TierConfig(fetch_share=0.5)


def test_capture_records_the_fetched_tokens(tmp_path):
    from cli_run import invoke

    from tiersim.traces import read

    out = tmp_path / "t.parquet"
    code, _, err = invoke(["capture", "--n", "1", "--max-new-tokens", "20", "--hbm", "0.3", "--ddr", "0.7",
                           "--compressed", "0", "--evict", "0", "--recent-window", "4", "--retier-every", "4",
                           "--strategy", "selective", "--fetch-share", "0.25", "--out", str(out)])
    assert code == 0, err
    trace = read(out)
    assert trace.meta["policy"]["strategy"] == "selective" and trace.meta["policy"]["fetch_share"] == 0.25
    steps = trace.steps
    # the DDR tier as attention saw it: the row's counts are taken after that step's re-tiering
    seen = steps["n_ddr"] - steps["hbm_to_ddr"] + steps["ddr_to_hbm"]
    with_ddr = steps[seen > 0]
    fetched, seen = with_ddr["ddr_fetched"], seen[seen > 0]
    assert len(with_ddr) and (fetched > 0).all() and (fetched < seen).all()
    assert fetched.sum() / seen.sum() < 0.5
    assert (steps[steps["step"] == 0]["ddr_fetched"] == 0).all()  # the prefill had no DDR tier yet


def test_the_grid_gains_strategy_cells_and_shows_their_fidelity(tiny_qwen2):
    from test_grid import tiny_samples

    from tiersim.quality.grid import HIERARCHY, build_cells, run_grid

    cells = build_cells([1.0, 0.25], [0], [0.0], [], strategies=["prefetch", "host-attention", "selective"],
                        fetch_share=0.25, recent_window=4, retier_every=4)
    assert [(c.method, c.hbm) for c in cells] == [
        (HIERARCHY, 1.0), (HIERARCHY, 0.25), (f"{HIERARCHY}/host-attention", 0.25), (f"{HIERARCHY}/selective", 0.25)
    ]
    assert cells[0].config.strategy == "prefetch" and cells[3].config.fetch_share == 0.25
    assert cells[2].config.fetch_share == 1.0  # the share applies to hybrid / selective only
    assert cells[3].label == "selective hbm 0.25 evict 0"
    rows, _ = run_grid(tiny_qwen2, tiny_samples(2), cells, 24, generation_kwargs={"pad_token_id": 0})
    by_method = {r["method"]: r for r in rows if r["hbm"] == 0.25}
    assert by_method[HIERARCHY]["exact_match"] == 1.0
    assert by_method[f"{HIERARCHY}/host-attention"]["exact_match"] == 1.0  # exact up to rounding
    assert by_method[f"{HIERARCHY}/selective"]["strategy"] == "selective"
    assert by_method[f"{HIERARCHY}/selective"]["fetch_share"] == 0.25
    with pytest.raises(ConfigError, match="strategy must be one of"):
        build_cells([1.0], [0], strategies=["prefetch", "recompute"])

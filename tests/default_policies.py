"""Every policy the cache runs, with the configs the policy matrix (tests/test_policy_matrix.py) drives it under.

One row per registered policy: the hierarchy and each eviction baseline. ``lossy`` moves and drops
tokens within a short generation on a tiny model; ``lossless`` are configs under which nothing is
lost (the hierarchy offloading to DDR only; a baseline whose budget is the whole context), so the
output must equal DynamicCache's bit for bit. A new policy gets a row here and the whole matrix.
"""

from tiersim.hierarchy.config import TierConfig

#: Small structural settings so tokens really leave HBM within a short generation.
SMALL = dict(sink_tokens=2, recent_window=4, retier_every=3)


def _baseline(name: str, **options) -> dict:
    return {
        "name": name,
        "lossy": TierConfig(hbm=0.4, evict=0.6, policy=name, retier_every=8, policy_options=options),
        "lossless": [TierConfig(hbm=1.0, policy=name, retier_every=8, policy_options=options)],
    }


DEFAULT_POLICIES = [
    {
        "name": "hierarchy",
        "lossy": TierConfig(hbm=0.4, ddr=0.3, compressed=0.2, evict=0.1, quant_group=16, **SMALL),  # head_dim 16
        "lossless": [TierConfig(hbm=h, ddr=round(1 - h, 6), **SMALL) for h in (1.0, 0.5, 0.1)],
    },
    _baseline("streamingllm"),
    _baseline("h2o"),
    _baseline("snapkv"),
    _baseline("rkv", every=16),  # its own schedule: the 128-step default would not re-tier in a short run
]

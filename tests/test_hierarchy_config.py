"""TierConfig validation and tier targets."""

import pytest

from tiersim.errors import ConfigError
from tiersim.hierarchy import TierConfig, tier_targets


def test_ratios_must_sum_to_one():
    with pytest.raises(ValueError, match="sum to 1"):
        TierConfig(hbm=0.5, ddr=0.4)
    TierConfig(hbm=0.5, ddr=0.5 - 5e-7, compressed=0.0, evict=0.0)  # within tolerance


@pytest.mark.parametrize(
    "field,value",
    [("hbm", -0.1), ("ddr", 1.5), ("evict", float("nan")), ("compressed", "0.2"), ("hbm", True)],
)
def test_bad_ratio_names_field_and_value(field, value):
    kwargs = {"hbm": 1.0, "ddr": 0.0, "compressed": 0.0, "evict": 0.0, field: value}
    with pytest.raises(ConfigError) as info:
        TierConfig(**kwargs)
    assert field in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"retier_every": 0}, "retier_every"),
        ({"sink_tokens": -1}, "sink_tokens"),
        ({"recent_window": 2.5}, "recent_window"),
        ({"compressed_bits": 3}, "compressed_bits"),
        ({"policy": "lru"}, "policy"),
    ],
)
def test_bad_settings_are_named(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        TierConfig(**kwargs)


def test_targets_follow_ratios_and_fill_from_the_bottom():
    cfg = TierConfig(hbm=0.4, ddr=0.3, compressed=0.2, evict=0.1)
    assert tier_targets(cfg, 100, protected=10) == {"hbm": 40, "ddr": 30, "compressed": 20, "evicted": 10}
    # Pinned tokens squeeze DDR first; eviction (the quality knob) is honoured.
    squeezed = tier_targets(cfg, 100, protected=60)
    assert squeezed == {"hbm": 60, "ddr": 10, "compressed": 20, "evicted": 10}
    assert sum(squeezed.values()) == 100


def test_round_trip_dict():
    cfg = TierConfig(hbm=0.25, ddr=0.75, retier_every=4)
    assert TierConfig.from_dict(cfg.to_dict()) == cfg


def test_vectorised_targets_equal_the_scalar_rule():
    import numpy as np

    from tiersim.hierarchy.config import tier_targets_array

    for cfg in (TierConfig(hbm=0.5, ddr=0.47, evict=0.03), TierConfig(hbm=0.2, ddr=0.3, compressed=0.4, evict=0.1),
                TierConfig(hbm=0.7, ddr=0.3, sink_tokens=0, recent_window=0)):
        lengths = np.arange(0, 400)
        vec = tier_targets_array(cfg, lengths)
        for t in lengths:
            scalar = tier_targets(cfg, int(t), min(int(t), cfg.sink_tokens + cfg.recent_window))
            assert {k: int(v[t]) for k, v in vec.items()} == scalar

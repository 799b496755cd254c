"""TierConfig: the experiment's knobs, validated once so every consumer can trust them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from tiersim.errors import ConfigError
from tiersim.hierarchy import registry, strategies
from tiersim.hierarchy.strategies import CACHE_STRATEGIES

TIERS = ("hbm", "ddr", "compressed", "evicted")
RATIO_FIELDS = ("hbm", "ddr", "compressed", "evict")
#: The ranking rules, read from the policy registry (tiersim.hierarchy.registry, standard library only).
POLICIES = registry.NAMES
#: How the DDR tier reaches attention in the real cache (tiersim.hierarchy.access), read from the strategy
#: registry. The simulator models more (tiersim.simulator.strategies); those the cache does not run are refused.
STRATEGIES = CACHE_STRATEGIES
SUM_TOLERANCE = 1e-6
#: The cache's structural settings beside the split: what the simulator takes from a trace's policy.
STRUCTURE_FIELDS = ("sink_tokens", "recent_window", "retier_every", "compressed_bits")


@dataclass(frozen=True)
class TierConfig:
    """Share of the context (all tokens seen so far) that each tier holds; the four ratios sum to 1.

    ``sink_tokens`` first tokens and the ``recent_window`` newest tokens always stay in HBM;
    tokens are re-ranked every ``retier_every`` decode steps. ``compressed_bits`` (8 or 4) and
    ``quant_group`` set the KIVI-style quantization of the compressed tier. ``policy`` picks the
    ranking rule: the hierarchy's cumulative attention score, or an eviction baseline. ``strategy``
    says how the DDR tier reaches attention (``prefetch``: copied back and reassembled, bit-exact;
    ``host-attention``: attended on the host and merged by log-sum-exp, exact up to rounding;
    ``hybrid``: ``fetch_share`` of the DDR tokens fetched, the rest attended on the host, exact up to
    rounding; ``selective``: only the ``fetch_share`` of DDR pages a key-bound predictor ranks highest,
    approximate).
    """

    hbm: float = 1.0
    ddr: float = 0.0
    compressed: float = 0.0
    evict: float = 0.0
    sink_tokens: int = 4
    recent_window: int = 64
    retier_every: int = 16
    compressed_bits: int = 4
    quant_group: int = 32
    prefill_score_window: int = 32
    policy: str = "hierarchy"
    strategy: str = "prefetch"
    fetch_share: float = 1.0
    policy_options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name in RATIO_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"TierConfig.{name} must be a number in [0, 1], got {value!r}")
            if not math.isfinite(value) or value < 0.0 or value > 1.0:
                raise ConfigError(f"TierConfig.{name} must be in [0, 1], got {value!r}")
        total = sum(getattr(self, name) for name in RATIO_FIELDS)
        if abs(total - 1.0) > SUM_TOLERANCE:
            parts = ", ".join(f"{n}={getattr(self, n)!r}" for n in RATIO_FIELDS)
            raise ConfigError(f"tier ratios must sum to 1 (got {total!r}: {parts})")
        for name in ("sink_tokens", "recent_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"TierConfig.{name} must be an integer >= 0, got {value!r}")
        for name in ("retier_every", "prefill_score_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"TierConfig.{name} must be an integer >= 1, got {value!r}")
        if self.compressed_bits not in (4, 8):
            raise ConfigError(f"TierConfig.compressed_bits must be 4 or 8, got {self.compressed_bits!r}")
        if isinstance(self.quant_group, bool) or not isinstance(self.quant_group, int) or self.quant_group < 1:
            raise ConfigError(f"TierConfig.quant_group must be an integer >= 1, got {self.quant_group!r}")
        if self.policy not in POLICIES:
            raise ConfigError(f"TierConfig.policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"TierConfig.strategy must be one of {', '.join(STRATEGIES)} (the strategies the cache runs), "
                f"got {self.strategy!r}"
            )
        share = self.fetch_share
        low = 0.0 if self.strategy == "hybrid" else 1e-300  # hybrid with 0: everything on the host
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not (low <= share <= 1.0):
            raise ConfigError(f"TierConfig.fetch_share must be in {'[0' if low == 0 else '(0'}, 1], got {share!r}")
        if share < 1.0 and not strategies.get(self.strategy).takes_share:
            takers = " and ".join(repr(n) for n in strategies.SHARE_TAKERS)
            raise ConfigError(f"TierConfig.fetch_share={share!r} applies to strategies {takers} only")

    @property
    def offloads(self) -> bool:
        """True when some of the context leaves HBM."""
        return self.hbm < 1.0 - SUM_TOLERANCE

    @property
    def is_lossless(self) -> bool:
        """Zero-approximation-error offloading: nothing compressed, nothing evicted."""
        return self.compressed == 0.0 and self.evict == 0.0

    def ratios(self) -> dict[str, float]:
        """The split alone, keyed as the CLI options and every result file name it."""
        return {name: getattr(self, name) for name in RATIO_FIELDS}

    def structure(self) -> dict[str, int]:
        """The structural settings alone (:data:`STRUCTURE_FIELDS`)."""
        return {name: getattr(self, name) for name in STRUCTURE_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TierConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def tier_targets(config: TierConfig, context_len: int, protected: int) -> dict[str, int]:
    """Token counts per tier for a context of ``context_len`` tokens, ``protected`` of them pinned to HBM.

    Tiers are filled from the bottom (evicted, then compressed, then DDR) with ``floor(ratio * T)``
    tokens each, capped by the unprotected tokens still available; HBM takes the rest. So the
    eviction ratio, the quality knob, is honoured first, and the pinned sinks and recent window
    squeeze DDR before anything else when the context is short.
    """
    available = max(context_len - protected, 0)
    counts: dict[str, int] = {}
    for tier, ratio in (("evicted", config.evict), ("compressed", config.compressed), ("ddr", config.ddr)):
        n = min(int(math.floor(ratio * context_len + 1e-9)), available)
        counts[tier] = n
        available -= n
    counts["hbm"] = context_len - counts["evicted"] - counts["compressed"] - counts["ddr"]
    return {t: counts[t] for t in TIERS}


def tier_targets_array(config: TierConfig, context_len):
    """:func:`tier_targets` over an array of context lengths (numpy), for traces and the simulator;
    pinned = sinks + recent window."""
    import numpy as np

    t = np.asarray(context_len, dtype=float)
    available = t - np.minimum(t, config.sink_tokens + config.recent_window)
    counts = {}
    for tier, ratio in (("evicted", config.evict), ("compressed", config.compressed), ("ddr", config.ddr)):
        n = np.minimum(np.floor(ratio * t + 1e-9), available)
        counts[tier] = n
        available = available - n
    counts["hbm"] = t - counts["evicted"] - counts["compressed"] - counts["ddr"]
    return counts

"""The semantics-aware memory hierarchy: policy, tiered cache, quantization, eviction baselines.

Written once and used by capture, the quality grid and the validator alike.
"""

from tiersim.hierarchy.config import TIERS, TierConfig, tier_targets

__all__ = ["TIERS", "TierConfig", "tier_targets"]

"""Policy name -> policy class: where the hierarchy and every eviction baseline are looked up by name.

It sits beside the implementations and imports them (``policy``, ``baselines``), which import
nothing back, so building a policy from ``TierConfig.policy`` needs no import inside a function.
``config.POLICIES`` names the same set without torch, for TierConfig's own check (tested equal).
"""

from __future__ import annotations

from tiersim.hierarchy.baselines import BASELINES
from tiersim.hierarchy.config import TierConfig
from tiersim.hierarchy.policy import Policy

POLICY_CLASSES: dict[str, type[Policy]] = {Policy.name: Policy, **BASELINES}


def make_policy(config: TierConfig) -> Policy:
    """The policy object named by ``config.policy``."""
    return POLICY_CLASSES[config.policy](config)

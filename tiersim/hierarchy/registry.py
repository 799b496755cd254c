"""Policy name -> policy class: where the hierarchy and every eviction baseline are looked up by name.

Standard library only, so ``TierConfig`` checks ``policy`` against these names (``config.POLICIES`` is
:data:`NAMES`) without importing torch. Each entry names the module and class that implement it; the
class is imported when a policy is built (:func:`make_policy`), and it must carry the entry's name
(``Policy.name``, tested), so a policy is listed here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from tiersim.hierarchy.config import TierConfig
    from tiersim.hierarchy.policy import Policy


@dataclass(frozen=True)
class PolicyEntry:
    """One ranking rule: its name (``TierConfig.policy``) and where its class lives."""

    name: str
    module: str
    cls: str
    label: str  # how tables and plots name it
    color: str  # its bars' colour in the report (the hierarchy's are per tier split instead)


_ENTRIES = (
    PolicyEntry("hierarchy", "tiersim.hierarchy.policy", "Policy", "hierarchy", "#1f2937"),
    PolicyEntry("streamingllm", "tiersim.hierarchy.baselines", "StreamingLLM", "StreamingLLM", "#65a30d"),
    PolicyEntry("h2o", "tiersim.hierarchy.baselines", "H2O", "H2O", "#9333ea"),
    PolicyEntry("snapkv", "tiersim.hierarchy.baselines", "SnapKV", "SnapKV", "#ea580c"),
    PolicyEntry("rkv", "tiersim.hierarchy.baselines", "RKV", "R-KV", "#db2777"),
)
REGISTRY: dict[str, PolicyEntry] = {e.name: e for e in _ENTRIES}
#: Every policy name, the hierarchy first (what ``TierConfig.policy`` accepts).
NAMES = tuple(REGISTRY)
#: The eviction baselines: every policy but the hierarchy.
BASELINE_NAMES = NAMES[1:]


def policy_class(name: str) -> type[Policy]:
    """The class that implements policy ``name`` (KeyError for an unknown one)."""
    entry = REGISTRY[name]
    return getattr(import_module(entry.module), entry.cls)


def make_policy(config: TierConfig) -> Policy:
    """The policy object named by ``config.policy``."""
    return policy_class(config.policy)(config)


def __getattr__(name: str):
    if name == "POLICY_CLASSES":  # name -> class, imported on first use (it needs torch)
        return {n: policy_class(n) for n in NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

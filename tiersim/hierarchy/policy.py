"""The placement policy: which token of a layer goes to which tier at a re-tiering point.

One function, :func:`assign_tiers`, turns a policy's per-token keep score into tier codes; the
hierarchy and every eviction baseline differ only in the score, the pinned tokens, how many
tokens each tier gets and when they re-tier. The tiered cache, trace capture, the quality grid
and the validator all call this same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiersim.hierarchy.config import TierConfig, tier_targets

# Tier codes stored per token (uint8). Order = speed: lower code, faster tier.
HBM, DDR, COMPRESSED, EVICTED = 0, 1, 2, 3
TIER_CODES = {"hbm": HBM, "ddr": DDR, "compressed": COMPRESSED, "evicted": EVICTED}


@dataclass
class LayerView:
    """What a policy may look at for one layer at a re-tiering point (retained tokens only).

    positions:    [B, N] absolute token positions, ascending per row.
    cumulative:   [B, N] float32 cumulative attention: per step, the probability the token got,
                  averaged over query heads, summed over the steps it has been scored
                  (prefill contributes the policy's ``prefill_queries`` last prompt queries).
    recent_probs: [B, Hq, r, N] float32 probabilities of the last r queries (oldest first), or
                  None when the policy asked for none (``Policy.recent_queries``).
    keys:         [B, Hkv, N, D] current keys (post-RoPE, as attention sees them), or None unless
                  ``Policy.needs_keys``.
    context_len:  tokens seen so far, evicted ones included (T).
    prompt_len:   tokens of the prompt.
    step:         decode steps taken so far (0 at prefill).
    first_real:   [B] long, position of each row's first real token (left padding sits before
                  it), or None for an unpadded batch. Pads are never pinned and rank lowest.
    """

    positions: torch.Tensor
    cumulative: torch.Tensor
    recent_probs: torch.Tensor | None
    keys: torch.Tensor | None
    context_len: int
    prompt_len: int
    step: int
    num_kv_heads: int
    first_real: torch.Tensor | None = None

    @property
    def padding(self) -> torch.Tensor | None:
        """[B, N] bool: left-padding tokens, or None when no row is padded."""
        if self.first_real is None:
            return None
        return self.positions < self.first_real[:, None]


class Policy:
    """Base policy: the hierarchy's rule. Baselines override the hooks they need."""

    name = "hierarchy"
    #: whether tokens may go to DDR / compressed (eviction baselines keep only HBM or nothing)
    tiered = True
    #: prompt queries scored at prefill (None: all of them)
    prefill_queries: int | None = None
    #: decode queries whose full probability rows are kept for the policy (R-KV, SnapKV)
    recent_queries: int = 0
    needs_keys = False

    def __init__(self, config: TierConfig):
        self.config = config
        if self.prefill_queries is None and self.name == "hierarchy":
            self.prefill_queries = config.prefill_score_window

    # -- hooks -------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Re-tier after this forward? (step 0 is the prefill, k the k-th decode step)."""
        return step % self.config.retier_every == 0

    def protected(self, view: LayerView) -> torch.Tensor:
        """[B, N] bool: tokens pinned to HBM (attention sinks and the recent window)."""
        cfg = self.config
        pos = view.positions
        newest = view.context_len - 1
        # The sinks are a row's first real tokens: after its left padding, if any.
        first = 0 if view.first_real is None else view.first_real[:, None]
        sinks = (pos >= first) & (pos < first + cfg.sink_tokens)
        return sinks | (pos > newest - cfg.recent_window)

    def keep_score(self, view: LayerView) -> torch.Tensor:
        """[B, N] higher = more valuable = faster tier. The hierarchy ranks by cumulative attention."""
        return view.cumulative

    def targets(self, view: LayerView, n_protected: int) -> dict[str, int]:
        """Token count per tier (evicted counts all tokens ever evicted)."""
        return tier_targets(self.config, view.context_len, n_protected)


def assign_tiers(policy: Policy, view: LayerView, already_evicted: int) -> torch.Tensor:
    """Tier code per retained token, [B, N] uint8, following ``policy``.

    Unprotected tokens are sorted by keep score (ties: older first); the lowest-scored go to
    evicted (only as many as the eviction target still asks for: eviction is permanent and
    counts tokens evicted earlier), then compressed, then DDR; the rest stay in HBM. Left-padding
    tokens are never pinned and rank below every real token, so they leave HBM first.
    """
    protected = policy.protected(view)
    padding = view.padding
    if padding is not None:
        protected = protected & ~padding
    # Counts are per batch (rectangular tiers): size them for the row with the most pinned tokens.
    n_protected = int(protected.sum(dim=1).max()) if protected.numel() else 0
    counts = policy.targets(view, n_protected)
    batch, n = view.positions.shape
    n_evict = max(counts["evicted"] - already_evicted, 0)
    n_comp, n_ddr = counts["compressed"], counts["ddr"]
    unprotected = n - n_protected
    # Never move more than exists; the targets already cap at the available tokens.
    n_evict = min(n_evict, unprotected)
    n_comp = min(n_comp, unprotected - n_evict)
    n_ddr = min(n_ddr, unprotected - n_evict - n_comp)

    score = policy.keep_score(view).to(torch.float64)
    score = score.masked_fill(protected, float("inf"))
    if padding is not None:
        score = score.masked_fill(padding, float("-inf"))
    # Stable ascending sort: equal scores keep position order, so older tokens go first.
    order = torch.sort(score, dim=-1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=order.device).expand(batch, n))
    tiers = torch.full((batch, n), HBM, dtype=torch.uint8, device=view.positions.device)
    tiers[ranks < n_evict + n_comp + n_ddr] = DDR
    tiers[ranks < n_evict + n_comp] = COMPRESSED
    tiers[ranks < n_evict] = EVICTED
    return tiers


"""Eviction baselines (StreamingLLM, H2O, SnapKV, R-KV) as policies over the same tiered cache.

Like for like: a baseline keeps everything it keeps in HBM, and its budget is the hierarchy's HBM
share, ``ceil(hbm * T)`` tokens of a context of T tokens (``TierConfig(hbm=h, evict=1-h,
policy=name)``) -- the same count the hierarchy keeps in HBM when everything else goes to DDR. At
each of its re-tiering points a baseline cuts the cache back to exactly that budget; the rest is
evicted for good. Between re-tiering points new tokens append (R-KV grows up to 128 tokens past
the budget, as in the original).

One decision per token for all heads of a layer: the cache keeps one shape per layer, so every
per-head score is reduced over heads first. H2O's score is the cache's cumulative attention (mean
over query heads); SnapKV's votes are averaged over query heads (avg-pooling is linear, so pooling
per head then averaging is the same); R-KV takes the max over each GQA group as its rule says,
then averages its final per-KV-head score over the KV heads.

SnapKV was designed to compress the prompt once; here it runs at every re-tiering point of the
config (``retier_every``, the hierarchy's own R, and the prefill), with the last ``w`` queries
seen so far (prompt and generated) as its observation window.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tiersim.errors import ConfigError
from tiersim.hierarchy.config import TierConfig
from tiersim.hierarchy.policy import LayerView, Policy


def last_tokens(view: LayerView, count: int) -> torch.Tensor:
    """[B, N] bool: the ``count`` newest retained tokens (retained order is position order)."""
    n = view.positions.shape[1]
    index = torch.arange(n, device=view.positions.device)
    return (index >= n - count).expand_as(view.positions)


class EvictionBaseline(Policy):
    """A policy that keeps ``ceil(hbm * T)`` tokens in HBM and evicts everything else.

    Subclasses say which tokens are pinned (``protected``), how the rest rank (``keep_score``)
    and when they re-tier (``due``). ``config.policy_options`` may override the rule's constants
    (``DEFAULTS``); unknown options are refused.
    """

    tiered = False
    DEFAULTS: dict[str, float | int] = {}

    def __init__(self, config: TierConfig):
        super().__init__(config)
        if config.ddr > 0 or config.compressed > 0:
            raise ConfigError(
                f"policy {self.name!r} is pure eviction: ddr and compressed must be 0 "
                f"(got ddr={config.ddr!r}, compressed={config.compressed!r})"
            )
        if config.hbm <= 0:
            raise ConfigError(f"policy {self.name!r} needs a budget: hbm must be > 0, got {config.hbm!r}")
        unknown = sorted(set(config.policy_options) - set(self.DEFAULTS))
        if unknown:
            allowed = ", ".join(self.DEFAULTS) or "none"
            raise ConfigError(f"policy_options for {self.name!r}: unknown option {unknown[0]!r} (allowed: {allowed})")
        self.options = {**self.DEFAULTS, **config.policy_options}
        for key, value in self.options.items():
            kind = type(self.DEFAULTS[key])
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise ConfigError(f"policy_options.{key} for {self.name!r} must be a {kind.__name__}, got {value!r}")
            if value < 0 or (kind is int and key != "sinks" and value < 1):
                raise ConfigError(f"policy_options.{key} for {self.name!r} is out of range: {value!r}")
            self.options[key] = kind(value)

    def budget(self, context_len: int) -> int:
        """Tokens kept in HBM for a context of ``context_len``: hbm * T rounded up (at least 1)."""
        return min(context_len, max(1, math.ceil(self.config.hbm * context_len - 1e-9)))

    def targets(self, view: LayerView, n_protected: int) -> dict[str, int]:
        keep = self.budget(view.context_len)
        return {"hbm": keep, "ddr": 0, "compressed": 0, "evicted": view.context_len - keep}


class StreamingLLM(EvictionBaseline):
    """Attention sinks + the most recent tokens: 4 sinks + the newest ``budget - 4``, every step.

    The sinks are pinned; the rest rank by position, so the oldest non-sink tokens go first.
    Uses no attention scores (one prefill query is scored only because the cache always listens).
    """

    name = "streamingllm"
    DEFAULTS = {"sinks": 4}
    prefill_queries = 1

    def due(self, step: int) -> bool:
        return True

    def protected(self, view: LayerView) -> torch.Tensor:
        sinks = min(self.options["sinks"], self.budget(view.context_len))
        return (view.positions < self.options["sinks"]) & ~last_tokens(view, view.positions.shape[1] - sinks)

    def keep_score(self, view: LayerView) -> torch.Tensor:
        return view.positions.to(torch.float64)


class H2O(EvictionBaseline):
    """Heavy hitters + recent: the newest ``budget // 2`` tokens, the rest by attention received.

    The score is the cache's cumulative attention: every query's probability (all prompt queries
    at prefill, then one per step), averaged over query heads. Evicts every step.
    """

    name = "h2o"
    prefill_queries = None  # all prompt queries: "attention received, summed over all queries"

    def due(self, step: int) -> bool:
        return True

    def protected(self, view: LayerView) -> torch.Tensor:
        return last_tokens(view, self.budget(view.context_len) // 2)

    def keep_score(self, view: LayerView) -> torch.Tensor:
        return view.cumulative


class SnapKV(EvictionBaseline):
    """The last ``window`` tokens + the top ``budget - window`` by pooled votes of the window's queries.

    Votes: the probabilities of the last ``window`` queries on each earlier token, summed over
    those queries, averaged over query heads, average-pooled along the prefix (``kernel``, zero
    padding counted, as SnapKV's ``avg_pool1d``). Applied at every re-tiering point.
    """

    name = "snapkv"
    DEFAULTS = {"window": 32, "kernel": 5}

    def __init__(self, config: TierConfig):
        super().__init__(config)
        self.prefill_queries = self.options["window"]
        self.recent_queries = self.options["window"]

    def protected(self, view: LayerView) -> torch.Tensor:
        return last_tokens(view, min(self.options["window"], self.budget(view.context_len)))

    def keep_score(self, view: LayerView) -> torch.Tensor:
        probs = _require_recent(view, self.name)
        n = view.positions.shape[1]
        window = min(self.options["window"], self.budget(view.context_len), n)
        votes = probs.float().sum(dim=2).mean(dim=1)[:, : n - window]  # [B, prefix]
        score = torch.full(view.positions.shape, math.inf, dtype=torch.float64, device=votes.device)
        if votes.shape[1]:
            kernel = self.options["kernel"]
            pooled = F.avg_pool1d(votes[:, None, :], kernel, stride=1, padding=kernel // 2)[:, 0, : votes.shape[1]]
            score[:, : n - window] = pooled.double()
        return score


class RKV(EvictionBaseline):
    """Redundancy-aware eviction for reasoning: every ``every`` steps, once over budget, cut back.

    Candidates are all but the last ``window`` tokens (those stay). Per KV head:
    importance = probabilities of the last ``window`` queries, max over the GQA group, mean over
    the queries, max-pooled along the tokens (``kernel``); redundancy = each candidate key's mean
    cosine similarity to the other candidates (diagonal excluded), softmaxed over the candidates;
    score = lam * importance - (1 - lam) * redundancy, then averaged over KV heads. The prefill is
    a re-tiering point too (step 0), so a short generation still starts within budget.
    """

    name = "rkv"
    DEFAULTS = {"window": 8, "kernel": 7, "lam": 0.1, "every": 128}
    needs_keys = True

    def __init__(self, config: TierConfig):
        super().__init__(config)
        if not 0.0 <= self.options["lam"] <= 1.0:
            raise ConfigError(f"policy_options.lam for 'rkv' must be in [0, 1], got {self.options['lam']!r}")
        self.prefill_queries = self.options["window"]
        self.recent_queries = self.options["window"]

    def due(self, step: int) -> bool:
        return step % self.options["every"] == 0

    def protected(self, view: LayerView) -> torch.Tensor:
        return last_tokens(view, min(self.options["window"], self.budget(view.context_len)))

    def keep_score(self, view: LayerView) -> torch.Tensor:
        probs = _require_recent(view, self.name)
        if view.keys is None:
            raise ConfigError("policy 'rkv' needs the keys in its LayerView (needs_keys)")
        n = view.positions.shape[1]
        window = min(self.options["window"], self.budget(view.context_len), n)
        m = n - window
        score = torch.full(view.positions.shape, math.inf, dtype=torch.float64, device=probs.device)
        if m == 0:
            return score
        lam = self.options["lam"]
        per_head = lam * rkv_importance(probs, view.num_kv_heads, self.options["kernel"])[..., :m]
        per_head = per_head - (1.0 - lam) * rkv_redundancy(view.keys[:, :, :m, :])
        score[:, :m] = per_head.mean(dim=1).double()
        return score


def _require_recent(view: LayerView, name: str) -> torch.Tensor:
    if view.recent_probs is None or view.recent_probs.shape[2] == 0:
        raise ConfigError(f"policy {name!r} needs the recent queries' probabilities (recent_queries > 0)")
    return view.recent_probs


def rkv_importance(probs: torch.Tensor, num_kv_heads: int, kernel: int) -> torch.Tensor:
    """[B, Hq, r, N] probabilities -> [B, Hkv, N]: max over each GQA group, mean over queries, max-pooled."""
    batch, q_heads, r, n = probs.shape
    grouped = probs.float().reshape(batch, num_kv_heads, q_heads // num_kv_heads, r, n)
    importance = grouped.amax(dim=2).mean(dim=2)  # [B, Hkv, N]
    pooled = F.max_pool1d(importance.reshape(batch * num_kv_heads, 1, n), kernel, stride=1, padding=kernel // 2)
    return pooled[:, 0, :n].reshape(batch, num_kv_heads, n)


def rkv_redundancy(keys: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, M, D] keys -> [B, Hkv, M]: softmax over tokens of each key's mean cosine similarity to the others.

    The sum over the others is ``k_i . sum_j k_j - k_i . k_i`` on L2-normalised keys: the row sum
    of the similarity matrix with its diagonal zeroed, in O(M D) memory instead of O(M^2) (a 16K
    context would need gigabytes per layer for the matrix).
    """
    m = keys.shape[2]
    unit = F.normalize(keys.float(), dim=-1)
    if m < 2:
        return torch.softmax(torch.zeros(unit.shape[:3], device=keys.device), dim=-1)
    total = unit.sum(dim=2, keepdim=True)  # [B, H, 1, D]
    self_sim = (unit * unit).sum(dim=-1)  # 1, or 0 for an all-zero key
    mean_sim = ((unit * total).sum(dim=-1) - self_sim) / (m - 1)
    return torch.softmax(mean_sim, dim=-1)


BASELINES: dict[str, type[EvictionBaseline]] = {cls.name: cls for cls in (StreamingLLM, H2O, SnapKV, RKV)}

"""What the engine does when the next step's KV does not fit: the four ``--on-full`` policies, and bringing spilled
tokens back (docs/serving.md, "When the next step does not fit").

A mixin of :class:`tiersim.serving.engine.Engine`: the policies act on the engine's batch and pool, and live apart
so that the engine module holds the processes and the batch bookkeeping, this one the memory decisions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from tiersim.serving import memory
from tiersim.serving.memory import blocks

if TYPE_CHECKING:  # pragma: no cover
    from tiersim.serving.engine import Request


class OnFull:
    """``--on-full``: preempt (recompute or swap), queue (nothing to do: reservations), spill within its cap
    (then preempt); and restore."""

    def _victim(self) -> Request | None:
        return max(self.decoding.values(), key=lambda r: r.order, default=None)

    def _preempt(self, r: Request, swap: bool) -> float:
        """Free ``r``'s blocks and queue it at the front; seconds of KV moved over the link (swap)."""
        self._leave(r)
        seconds = 0.0
        swap = swap and r.cached * self.pricer.kv_per_token <= self._ddr_room() and r.spilled == 0
        self.pool.give(r.blocks)
        self.pool.reserved -= max(r.reserve, 0)
        r.blocks = r.reserve = 0
        if swap:
            seconds = self._move(r.cached, "d2h")
            r.swapped = True
            self.swapped_tokens += r.cached
        else:
            r.recomputed += r.cached
            r.target, r.prefilled, r.cached, r.spilled = r.cached, 0, 0, 0
        r.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(r)
        self._set_staging()
        return seconds

    def _spill_one(self) -> int:
        """Move the tier split's DDR share of the longest decoding request to DDR; tokens moved (0: none, or
        reading them would cost the step more than the spill cap)."""
        rs = list(self.decoding.values())
        count = len(rs)
        spilled = np.fromiter((r.spilled for r in rs), np.int64, count)
        cached = np.fromiter((r.join_cached - r.join_step for r in rs), np.int64, count) + self.g
        more = memory.spill_tokens_many(self.config.tiers, cached, spilled)
        freed = memory.blocks_many(cached - spilled) - memory.blocks_many(cached - spilled - more)
        more[(freed <= 0) | (more * self.pricer.kv_per_token > self._ddr_room())] = 0
        pick = int(np.argmax(more)) if count else 0  # the first of the longest, as the decoding order has them
        best, best_n = (rs[pick], int(more[pick])) if count and more[pick] > 0 else (None, 0)
        if best is None or not self._within_cap(best_n):
            return 0
        self._leave(best)
        before = best.blocks
        best.spilled += best_n
        best.spills += 1
        best.spilled_peak = max(best.spilled_peak, best.spilled)
        best.blocks = blocks(self._hbm_tokens(best))
        self.pool.give(before - best.blocks)
        self._join(best)
        self.spilled_tokens_total += best_n
        self.moved_bytes["d2h"] += best_n * self.pricer.kv_per_token
        self._set_staging()
        return best_n

    def _within_cap(self, more: int) -> bool:
        """Whether the next decode step, reading ``more`` tokens from DDR beside those already there, costs at
        most ``spill_cap`` over the same batch with every token in HBM (the step model's price, by --strategy).
        A request decoding alone always may: preempting it instead would only queue it to overflow again (spill
        is how a request longer than HBM runs at all, ``memory.check_fits``)."""
        batch, tokens, ddr = len(self.decoding), self._batch_tokens(), self.sum_spilled + more
        if batch == 1:
            return True
        spilled, in_hbm = self.pricer.decode_s(batch, np.array([tokens - ddr, tokens], dtype=float),
                                               np.array([ddr, 0.0]))  # one array call: both prices
        return spilled <= (1.0 + self.config.spill_cap) * in_hbm

    def _restore(self) -> float:
        """Bring spilled tokens back to HBM while the pool has room to spare; seconds of copies."""
        seconds = 0.0
        for r in sorted((r for r in self.decoding.values() if r.spilled), key=lambda r: r.order):
            cached = self._cached_now(r)
            extra = blocks(cached) - blocks(cached - r.spilled)
            staging_after = self.budget.staging_blocks(self.sum_spilled - r.spilled)
            room = self.pool.free + self.pool.staging - staging_after - int(self.phase.sum())
            if room - extra < memory.RESTORE_HEADROOM * self.pool.total:
                continue
            self._leave(r)  # sum_spilled no longer counts r's DDR tokens
            seconds += self._move(r.spilled, "h2d")
            r.spilled = 0
            self._set_staging()
            self.pool.take(blocks(r.cached) - r.blocks)
            r.blocks = blocks(r.cached)
            self._join(r)
        return seconds

    def _make_room(self) -> tuple[float, float, bool]:
        """Free blocks for the next decode step by ``--on-full``: (serial seconds, demoted tokens, preempted)."""
        seconds, demoted, preempted = 0.0, 0.0, False
        policy = self.config.on_full
        if policy in memory.RESERVING:
            return seconds, demoted, preempted
        while self._next_need() > self.pool.free:
            if policy == "spill":
                moved = self._spill_one()
                if moved:
                    demoted += moved
                    continue
            victim = self._victim()
            if victim is None:
                break
            seconds += self._preempt(victim, swap=policy == "preempt-swap")
            preempted = True
        return seconds, demoted, preempted

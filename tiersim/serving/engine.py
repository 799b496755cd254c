"""The serving engine as SimPy processes: requests arrive, a scheduler loop forms each iteration's batch.

Two processes read like the system: ``arrivals`` puts each request in the waiting queue at its time, and
``scheduler`` runs iterations back to back: restore spilled KV when HBM has room, make room for the next
step's KV blocks (``--on-full``), admit waiting requests FCFS while the batch (``--max-batch``) and the
token budget (``--token-budget``, Sarathi-style: decode rows first, prefill chunks fill the rest) allow, price
the iteration (``stepcost``) and advance time.

Cost grows with iterations, not with requests x tokens: while no prompt is being prefilled, the decode batch
is the same from one step to the next until a request finishes, a block runs out or a request arrives, so
those steps are priced in one array call and advanced in one timeout (cut at the step boundary after an
arrival, found on their cumulative times). A decoding request's counters are kept lazily (its tokens at
join + steps since), block needs by their phase modulo the block size, so a run of K steps costs O(K), not
O(K x batch).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np
import simpy

from tiersim.hierarchy.config import TierConfig
from tiersim.serving import memory
from tiersim.serving.memory import BLOCK_TOKENS, blocks
from tiersim.serving.onfull import OnFull
from tiersim.serving.stepcost import StepPricer
from tiersim.serving.workload import Requests

#: Decode steps priced and advanced at once at most (bounds the arrays; a finish or an arrival cuts sooner).
MAX_RUN = 2048
#: What each timeline row holds: start s, seconds, decode steps, decode rows, prefill tokens, HBM and DDR tokens
#: attended (batch totals at the first step), requests waiting, HBM blocks in use (staging included), DDR tokens held.
TIMELINE_COLUMNS = ("start_s", "seconds", "steps", "batch", "prefill_tokens", "hbm_tokens", "ddr_tokens", "waiting",
                    "hbm_blocks", "ddr_held_tokens")


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 256
    token_budget: int = 2048
    on_full: str = "preempt-recompute"
    tiers: TierConfig = field(default_factory=lambda: TierConfig(hbm=0.5, ddr=0.5))
    spill_cap: float = memory.SPILL_CAP  # spill: the most a step may slow down reading spilled tokens
    max_tokens: int | None = None  # what a request asked for at most (queue reserves it) where the workload does not
    # say (Requests.max_tokens); None: memory.default_max_tokens of the outputs


@dataclass(eq=False)
class Request:
    index: int
    arrival: float
    prompt: int
    output: int
    max_tokens: int = 0  # what it asked for at most: queue's reservation
    generated: int = 0  # tokens sampled so far
    cached: int = 0  # KV tokens held (HBM + DDR)
    spilled: int = 0  # of them in DDR (spill)
    swapped: bool = False  # the whole KV in DDR (preempt-swap)
    target: int = 0  # tokens to (re)prefill before decoding
    prefilled: int = 0
    blocks: int = 0
    reserve: int = 0  # queue: blocks reserved for the tokens still to come
    order: int = 0  # admission order (the preemption victim is the latest)
    scheduled: float = math.nan
    first_token: float = math.nan
    finish: float = math.nan
    preemptions: int = 0
    spills: int = 0
    spilled_peak: int = 0
    recomputed: int = 0  # tokens prefilled again after a preemption
    # lazy decode state
    join_step: int = -1
    join_cached: int = 0
    join_generated: int = 0
    version: int = 0


class Engine(OnFull):
    """One serving run: ``requests`` on ``pricer``'s model and GPUs under ``config``."""

    def __init__(self, requests: Requests, pricer: StepPricer, config: EngineConfig,
                 stop_after_late: tuple[float, int] | None = None):
        """``stop_after_late = (ttft_s, count)``: end the run once ``count`` requests got their first token later
        than ``ttft_s`` after arriving (a capacity search's point that has already failed its p99)."""
        self.pricer, self.config = pricer, config
        self.stop_after_late, self.late, self.stopped = stop_after_late, 0, False
        memory.check_on_full(config.on_full)
        self.reserving = config.on_full in memory.RESERVING
        self.max_tokens = memory.default_max_tokens(requests.output) if config.max_tokens is None else config.max_tokens
        self.budget = replace(memory.budget(pricer.model, pricer.rank, pricer.gpu, config.max_batch,
                                            config.token_budget), staged=pricer.staged_share())
        limits = [self.max_tokens] * len(requests) if requests.max_tokens is None else requests.max_tokens.tolist()
        for i, (p, o, m) in enumerate(zip(requests.prompt.tolist(), requests.output.tolist(), limits)):
            memory.check_fits(self.budget, config.tiers, config.on_full, p, o, i, m)
        self.requests = [Request(i, a, p, o, m) for i, (a, p, o, m) in enumerate(zip(
            requests.arrival.tolist(), requests.prompt.tolist(), requests.output.tolist(), limits))]
        self.pool = memory.Pool(self.budget.blocks)
        self.env = simpy.Environment()
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.decoding: dict[int, Request] = {}
        self.g = 0  # decode steps so far (the lazy counters' clock)
        self.sum_c = 0  # sum over decoding requests of (join_cached - join_step)
        self.sum_spilled = 0  # DDR tokens of decoding requests (spill)
        self.swapped_tokens = 0
        self.phase = np.zeros(BLOCK_TOKENS, dtype=np.int64)  # decoding requests by (HBM tokens - g) mod 16
        self.finishing: list[tuple[int, int, int]] = []  # (finish step, index, version)
        self.admitted = 0
        self.done = 0
        self.in_system, self.area, self.last_change = 0, 0.0, 0.0  # for Little's law
        self.area_at_last_arrival = 0.0
        self.steps = self.prefill_steps = 0
        self.preemptions = 0
        self.spilled_tokens_total = 0
        self.moved_bytes = {"h2d": 0.0, "d2h": 0.0}
        self.timeline: list[tuple] = []
        self.arrived = self.env.event()

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def _count(self, delta: int) -> None:
        now = self.env.now
        self.area += self.in_system * (now - self.last_change)
        self.in_system += delta
        self.last_change = now

    def _hbm_tokens(self, r: Request) -> int:
        return r.cached - r.spilled

    def _cached_now(self, r: Request) -> int:
        """A decoding request's KV tokens now, from its lazy counters (``r.cached`` is as of its join)."""
        return r.join_cached + self.g - r.join_step

    def _batch_tokens(self) -> int:
        """KV tokens the decoding requests attend at the next step, HBM and DDR together (lazy counters)."""
        return self.sum_c + len(self.decoding) * (self.g + 1)

    def _ddr_room(self) -> float:
        """Bytes of DDR still free for swapped and spilled KV."""
        return self.budget.ddr_bytes - (self.swapped_tokens + self.sum_spilled) * self.pricer.kv_per_token

    def _join(self, r: Request) -> None:
        r.join_step, r.join_cached, r.join_generated = self.g, r.cached, r.generated
        self.decoding[r.index] = r
        self.sum_c += r.cached - self.g
        self.sum_spilled += r.spilled
        self.phase[(self._hbm_tokens(r) - self.g) % BLOCK_TOKENS] += 1
        heapq.heappush(self.finishing, (self.g + r.output - r.generated, r.index, r.version))

    def _leave(self, r: Request) -> None:
        """Take ``r`` out of the decode batch with its counters brought up to date."""
        self.phase[(r.join_cached - r.spilled - r.join_step) % BLOCK_TOKENS] -= 1
        self.sum_c -= r.join_cached - r.join_step
        self.sum_spilled -= r.spilled
        r.cached, r.generated = self._cached_now(r), r.join_generated + self.g - r.join_step
        r.blocks = blocks(self._hbm_tokens(r))
        if self.reserving:  # the blocks grown came out of the reservation
            r.reserve -= r.blocks - blocks(r.join_cached - r.spilled)
        r.version += 1
        del self.decoding[r.index]

    def _set_staging(self) -> None:
        self.pool.staging = self.budget.staging_blocks(self.sum_spilled)

    def _move(self, tokens: int, direction: str) -> float:
        self.moved_bytes[direction] += tokens * self.pricer.kv_per_token
        return self.pricer.move_s(tokens, direction)

    def _next_need(self) -> int:
        """Blocks the decoding requests need before the next step (those whose HBM tokens fill their blocks)."""
        return int(self.phase[(-self.g) % BLOCK_TOKENS])

    def _admit(self, room_rows: int) -> tuple[float, list[Request]]:
        """Admit waiting requests FCFS while the batch and memory allow; (serial seconds, swapped in)."""
        seconds, resumed = 0.0, []
        busy = bool(self.decoding or self.prefilling)
        watermark = int(memory.WATERMARK * self.pool.total) if busy else 0
        queue = self.reserving
        while self.waiting and len(self.decoding) + len(self.prefilling) < self.config.max_batch:
            r = self.waiting[0]
            if r.swapped:
                need = blocks(r.cached)
                if need + watermark + self._next_need() > self.pool.free:
                    break
                self.waiting.popleft()
                self.pool.take(need)
                r.blocks, r.swapped = need, False
                self.swapped_tokens -= r.cached
                seconds += self._move(r.cached, "h2d")
                resumed.append(r)
                continue
            if room_rows <= 0:
                break
            if r.target == 0 and r.generated == 0:
                r.target = r.prompt
            need = blocks(r.target)
            reserve = blocks(r.prompt + memory.reservation(self.config.on_full, r.output, r.max_tokens) - 1) - need \
                if queue else 0
            if need + reserve + (0 if queue else watermark + self._next_need()) > self.pool.free:
                break
            self.waiting.popleft()
            self.pool.take(need)
            self.pool.reserved += reserve
            r.blocks, r.reserve = need, reserve
            self.admitted += 1
            r.order = self.admitted
            if math.isnan(r.scheduled):
                r.scheduled = max(self.env.now, r.arrival)  # the clock sums gaps: no rounding before arrival
            self.prefilling.append(r)
            room_rows -= r.target - r.prefilled
        return seconds, resumed

    # -- the processes ---------------------------------------------------------------------------------------
    def arrivals(self):
        for r in self.requests:
            yield self.env.timeout(max(r.arrival - self.env.now, 0.0))  # from the clock: no drift over gaps
            self.waiting.append(r)
            self._count(+1)
            self.area_at_last_arrival = self.area
            if not self.arrived.triggered:
                self.arrived.succeed()

    def _finish(self, r: Request) -> None:
        r.finish = self.env.now
        self.pool.give(r.blocks)
        self.pool.reserved -= r.reserve
        r.blocks = r.reserve = 0
        self.done += 1
        self._count(-1)

    def _finish_due(self) -> None:
        while self.finishing and self.finishing[0][0] <= self.g:
            step, index, version = heapq.heappop(self.finishing)
            r = self.requests[index]
            if r.version != version or index not in self.decoding:
                continue
            self._leave(r)
            self._finish(r)
        self._set_staging()

    def _record(self, start: float, steps: int, batch: int, prefill: int, hbm: float, ddr: float) -> None:
        """One row per iteration or run of decode steps (:data:`TIMELINE_COLUMNS`)."""
        self.timeline.append((start, self.env.now - start, steps, batch, prefill, hbm, ddr, len(self.waiting),
                              self.pool.used + self.pool.staging, self.sum_spilled + self.swapped_tokens))

    def scheduler(self):
        env, config, pricer = self.env, self.config, self.pricer
        n = len(self.requests)
        while self.done < n and not self.stopped:
            if not (self.decoding or self.prefilling or self.waiting):
                self.arrived = env.event()
                yield self.arrived
            serial = self._restore() if self.sum_spilled else 0.0
            seconds, demoted, preempted = self._make_room()
            serial += seconds
            room = config.token_budget - len(self.decoding)
            room -= sum(r.target - r.prefilled for r in self.prefilling)
            if not preempted or not (self.decoding or self.prefilling):  # (an engine emptied by preemption admits)
                seconds, resumed = self._admit(room)
                serial += seconds
                for r in resumed:
                    self._join(r)
                if resumed:
                    serial += self._make_room()[0]
            # This step's prefill chunks: the budget left after the decode rows, in admission order.
            room = config.token_budget - len(self.decoding)
            chunks, chunked = [], []
            for r in self.prefilling:
                if room <= 0:
                    break
                size = min(r.target - r.prefilled, room)
                chunks.append((size, r.prefilled, r.prefilled + size == r.target))
                chunked.append((r, size))
                room -= size
            batch = len(self.decoding)
            need = self._next_need()
            self._allocate(need)
            hbm = self._batch_tokens() - self.sum_spilled
            ddr = self.sum_spilled
            start = env.now
            if chunks or serial or demoted or not batch:
                if not chunks and not batch:
                    if not serial and self.waiting:
                        raise AssertionError("serving engine: a waiting request cannot be admitted into an idle engine")
                    if serial:
                        yield env.timeout(serial)
                    continue
                t = serial + pricer.step_s(batch, hbm, self.sum_spilled, chunks, demoted)
                yield env.timeout(t)
                self.steps += 1
                self.prefill_steps += bool(chunks)
                run = 1
            else:
                run, grown = self._decode_run()
                times = pricer.decode_s(batch, hbm + batch * np.arange(run, dtype=float), self.sum_spilled)
                ends = np.cumsum(times)
                cut = len(self.decoding) + len(self.prefilling) < config.max_batch and not self.waiting
                if cut and self.arrived.triggered:
                    self.arrived = env.event()
                if cut:
                    fired = yield env.timeout(float(ends[-1])) | self.arrived
                    if self.arrived in fired and env.now < start + ends[-1]:
                        k = int(np.searchsorted(ends, env.now - start, side="left"))
                        k = min(k, run - 1)
                        yield env.timeout(max(start + float(ends[k]) - env.now, 0.0))
                        run = k + 1
                else:
                    yield env.timeout(float(ends[-1]))
                if run > 1:  # the blocks decode steps 2..run allocate (the first step's were taken before it)
                    self._allocate(int(grown[run - 2]))
                self.steps += run
            self.g += run
            now = env.now
            for r, size in chunked:
                r.prefilled += size
                if r.prefilled == r.target:
                    self.prefilling.remove(r)
                    r.cached = r.target
                    r.generated += 1
                    if math.isnan(r.first_token):
                        r.first_token = now
                        if self.stop_after_late and now - r.arrival > self.stop_after_late[0]:
                            self.late += 1
                            self.stopped = self.late >= self.stop_after_late[1]
                    if r.generated >= r.output:
                        self._finish(r)
                    else:
                        self._join(r)
            self._finish_due()
            self._record(start, run, batch, sum(size for _, size in chunked), hbm, ddr)

    def _allocate(self, n: int) -> None:
        """Blocks the decoding requests grow into: out of their reservations (queue), else out of the pool."""
        if self.reserving:
            self.pool.reserved -= n
            self.pool.used += n
        else:
            self.pool.take(n)

    def _decode_run(self) -> tuple[int, np.ndarray]:
        """Decode steps the batch can run unchanged (until the first finish, and while blocks last), and the
        cumulative blocks steps 2, 3, ... of the run allocate (the first step's were taken before it)."""
        run = min(MAX_RUN, self.finishing[0][0] - self.g) if self.finishing else 1
        run = max(run, 1)
        grown = np.cumsum(self.phase[(-(self.g + np.arange(1, run))) % BLOCK_TOKENS])
        if not self.reserving and len(grown) and grown[-1] > self.pool.free:  # a reservation never runs out
            run = 1 + int(np.argmax(grown > self.pool.free))
        return run, grown

    def run(self) -> "Engine":
        self.env.process(self.arrivals())
        self.env.process(self.scheduler())
        self.env.run()
        self._count(0)
        return self

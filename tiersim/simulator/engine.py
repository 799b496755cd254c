"""The SimPy discrete-event model of one GPU decoding a batch: compute stream, copy engines, PCIe.

Per decode step the compute stream walks the layers. When layer l starts, the prefetch of layer
l+1's DDR tier is queued on the H2D copy engine into the free one of two staging buffers (the
last layer prefetches layer 0 of the next step); layer l+1 cannot start before its prefetch
lands: that wait is the stall. After its attention, layer l's newly demoted tokens go down on
the D2H engine. Each copy engine runs one copy at a time, in order; a copy pays its per-call
latency (link idle) and then moves its bytes on the link.

Both directions share one PCIe link: each is capped at its own bandwidth and together at the
bidirectional ceiling. The link is processor-shared: rates are recomputed whenever a transfer
starts or ends, and the next completion is a timer stamped with a generation number, so a timer
made stale by a later change is ignored. The transfer a valid timer was set for completes
exactly then, whatever float residue its byte count carries: time cannot stop advancing.

Events per step are O(layers), independent of the batch size: the batch's bytes are aggregated
per layer (see ``analytic.build_workload``). Copies and the link run on event callbacks rather
than processes: at most eight events per layer and step (prefetch call and link, demotion call and
link, compute), and a step with no copies at all is a single timeout.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import simpy

from tiersim.simulator.link import COPY_CALLS_PER_LAYER, DIRECTIONS, call_latency, shared_rates  # noqa: F401  (re-exported)
from tiersim.simulator.presets import GPU
from tiersim.simulator.step import StepCosts, StepResult, step_compute  # noqa: F401  (StepResult: its old home)
_SIMULTANEOUS = 1e-9  # transfers within this relative share of the next finish time end together


class _Transfer:
    __slots__ = ("direction", "remaining", "size", "done", "rate")

    def __init__(self, direction: str, nbytes: float, done: simpy.Event):
        self.direction = direction
        self.remaining = nbytes
        self.size = nbytes
        self.done = done
        self.rate = 0.0


class Link:
    """Full-duplex link with per-direction caps and a shared ceiling, processor-shared."""

    def __init__(self, env: simpy.Environment, gpu: GPU):
        self.env = env
        self.gpu = gpu
        self.active: list[_Transfer] = []
        self.bytes = {"h2d": 0.0, "d2h": 0.0}
        self._last = env.now
        self._generation = 0
        self._shares: dict[tuple, dict[str, float]] = {}  # per-transfer rate by transfers per direction

    def transfer(self, direction: str, nbytes: float, done: simpy.Event | None = None) -> simpy.Event:
        """Start moving ``nbytes``; the returned event (``done`` if given) fires when they have landed."""
        if direction not in DIRECTIONS:
            raise ValueError(f"link direction must be h2d or d2h, got {direction!r}")
        done = done if done is not None else self.env.event()
        if nbytes <= 0:
            done.succeed()
            return done
        self._advance()
        self.active.append(_Transfer(direction, float(nbytes), done))
        self.bytes[direction] += nbytes
        self._reschedule()
        return done

    def rates(self) -> list[float]:
        """Each active transfer's rate (see :func:`shared_rates`)."""
        count: dict[str, int] = {}
        for tr in self.active:
            count[tr.direction] = count.get(tr.direction, 0) + 1
        key = tuple(sorted(count.items()))
        share = self._shares.get(key)
        if share is None:
            share = self._shares[key] = shared_rates(self.gpu, count)
        return [share[tr.direction] for tr in self.active]

    def _advance(self) -> None:
        """Move every active transfer on by the time since the last change, at the rates then set."""
        dt = self.env.now - self._last
        self._last = self.env.now
        if dt > 0:
            for tr in self.active:
                tr.remaining -= tr.rate * dt

    def _reschedule(self) -> None:
        self._generation += 1
        if not self.active:
            return
        for tr, rate in zip(self.active, self.rates()):
            tr.rate = rate
        horizon = min(max(tr.remaining, 0.0) / tr.rate for tr in self.active)
        generation = self._generation
        timer = self.env.timeout(horizon)
        timer.callbacks.append(lambda _event: self._finish(generation, horizon))

    def _finish(self, generation: int, horizon: float) -> None:
        if generation != self._generation:  # a start or finish since re-shared the link
            return
        self._advance()
        # The transfer this timer was set for is done by construction, whatever float residue its
        # byte count carries; any other within a relative hair of it finishes with it.
        target = min(self.active, key=lambda tr: tr.remaining / tr.rate)
        finished = [tr for tr in self.active if tr is target or tr.remaining <= _SIMULTANEOUS * tr.size
                    or max(tr.remaining, 0.0) / tr.rate <= _SIMULTANEOUS * horizon]
        for tr in finished:
            self.active.remove(tr)
            tr.done.succeed()
        self._reschedule()


class CopyEngine:
    """One DMA engine: copies run one at a time in arrival order, each paying its per-call latency
    before its bytes go on the link."""

    def __init__(self, env: simpy.Environment, link: Link, direction: str, latency: float, done: simpy.Event):
        self.env = env
        self.link = link
        self.direction = direction
        self.latency = latency
        self.queue: deque = deque()
        self.busy = False
        self._done = done  # an already-processed event, returned for empty copies

    def copy(self, nbytes: float) -> simpy.Event:
        if nbytes <= 0:
            return self._done
        done = self.env.event()
        self.queue.append((float(nbytes), done))
        if not self.busy:
            self._start_next()
        return done

    def _start_next(self, _event=None) -> None:
        if not self.queue:
            self.busy = False
            return
        self.busy = True
        nbytes, done = self.queue.popleft()
        done.callbacks.append(self._start_next)
        if self.latency > 0:
            call = self.env.timeout(self.latency)
            call.callbacks.append(lambda _event: self.link.transfer(self.direction, nbytes, done))
        else:
            self.link.transfer(self.direction, nbytes, done)


class CountingEnvironment(simpy.Environment):
    """A SimPy environment that counts scheduled events (for the events/s benchmark)."""

    def __init__(self):
        super().__init__()
        self.scheduled = 0

    def schedule(self, event, priority=1, delay=0):
        self.scheduled += 1
        super().schedule(event, priority, delay)


def simulate(costs: StepCosts, num_layers: int, gpu: GPU) -> StepResult:
    """Run the decode steps described by ``costs`` through the event model.

    Host work (``costs.host``: host attention) starts with its layer, beside the GPU's own attention over
    the HBM tier (``host_window``); the layer's remaining GPU work waits for both."""
    env = CountingEnvironment()
    link = Link(env, gpu)
    empty = env.event()
    empty.succeed()
    latency = call_latency(gpu)
    h2d = CopyEngine(env, link, "h2d", latency, empty)
    d2h = CopyEngine(env, link, "d2h", latency, empty)
    steps = len(costs.compute)
    step_time = np.zeros(steps)
    stall = np.zeros(steps)
    # Plain floats: numpy scalars in the inner loop cost more than the events themselves.
    compute = [float(x) for x in costs.compute]
    host = [float(x) for x in np.broadcast_to(np.asarray(costs.host, dtype=float), (steps,))]
    window = [min(float(w), c) for w, c in zip(np.broadcast_to(np.asarray(costs.host_window, dtype=float), (steps,)),
                                                 compute)]
    layer_s = [float(x) for x in costs.layer_s]
    extra = [float(x) for x in np.broadcast_to(np.asarray(costs.step_extra, dtype=float), (steps,))]
    floor = [float(x) for x in np.broadcast_to(np.asarray(costs.host_floor, dtype=float), (steps,))]
    up = [float(x) for x in costs.h2d_bytes] + [0.0]  # step S prefetches nothing
    down = [float(x) for x in costs.d2h_bytes]

    def compute_stream():
        # Layer 0 of the first step has nothing to overlap with: its prefetch counts as warm-up.
        ready = h2d.copy(up[0])
        yield ready
        for s in range(steps):
            start = env.now
            waited = 0.0
            c = compute[s]
            if up[s] <= 0 and up[s + 1] <= 0 and down[s] <= 0:  # no copies: the layers just run
                yield env.timeout(max(layer_s[s] * num_layers + extra[s], floor[s]))
                step_time[s] = env.now - start
                continue
            for layer in range(num_layers):
                if not ready.triggered:
                    t0 = env.now
                    yield ready
                    waited += env.now - t0
                # Queue the next layer's prefetch (the last layer queues layer 0 of the next step).
                ready = h2d.copy(up[s] if layer + 1 < num_layers else up[s + 1])
                if host[s] > 0:  # host attention: it starts with the layer's query, beside the HBM-tier attention
                    host_done = env.timeout(host[s])
                    yield env.timeout(window[s])
                    if not host_done.processed:
                        yield host_done
                    yield env.timeout(c - window[s])
                else:
                    yield env.timeout(c)
                if down[s] > 0:
                    d2h.copy(down[s])
            if extra[s] > 0:  # final norm, LM head, sampling: after the last layer, once per step
                yield env.timeout(extra[s])
            if env.now - start < floor[s]:  # the host has not finished issuing this step yet
                yield env.timeout(floor[s] - (env.now - start))
            step_time[s] = env.now - start
            stall[s] = waited

    env.process(compute_stream())
    env.run()
    return StepResult(
        step_time=step_time,
        stall=stall,
        compute=step_compute(costs, num_layers),
        h2d_bytes=costs.h2d_bytes * num_layers,
        d2h_bytes=costs.d2h_bytes * num_layers,
        events=env.scheduled,
        wall_time=float(env.now),
    )

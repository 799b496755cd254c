"""The SimPy discrete-event model of one GPU decoding a batch: compute stream, copy engines, PCIe.

Per decode step the compute stream walks the layers. When layer l starts, the prefetch of layer
l+1's DDR tier is queued on the H2D copy engine into the free one of two staging buffers (the
last layer prefetches layer 0 of the next step); layer l+1 cannot start before its prefetch
lands: that wait is the stall. After its attention, layer l's newly demoted tokens go down on
the D2H engine. Both directions share one PCIe link: each is capped at its own bandwidth and
together at the bidirectional ceiling, and the link is processor-shared, rates recomputed
whenever a transfer starts or ends (remaining bytes compared relatively, so time always moves).

Events per step are O(layers), independent of the batch size: the batch's bytes are aggregated
per layer (see ``analytic.build_workload``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import simpy

from tiersim.simulator.analytic import COPY_CALLS_PER_LAYER, LayerCosts
from tiersim.simulator.presets import GPU

_DONE = 1e-9  # a transfer is complete when this share of its bytes remains


class Link:
    """Full-duplex link with per-direction caps and a shared ceiling, processor-shared."""

    def __init__(self, env: simpy.Environment, gpu: GPU):
        self.env = env
        self.caps = {"h2d": gpu.h2d_bw, "d2h": gpu.d2h_bw}
        self.ceiling = gpu.bidir_bw
        self.active: dict[int, list] = {}  # id -> [direction, remaining, size, event]
        self._next_id = 0
        self._last = 0.0
        self._wake = env.event()
        self.bytes = {"h2d": 0.0, "d2h": 0.0}
        env.process(self._run())

    def transfer(self, direction: str, nbytes: float) -> simpy.Event:
        done = self.env.event()
        if nbytes <= 0:
            done.succeed()
            return done
        self._advance()
        self.active[self._next_id] = [direction, float(nbytes), float(nbytes), done]
        self._next_id += 1
        self.bytes[direction] += nbytes
        self._poke()
        return done

    def rates(self) -> dict[int, float]:
        """Max-min fair shares: each direction's cap split among its transfers, the sum under the ceiling."""
        by_dir: dict[str, list[int]] = {}
        for tid, (direction, *_rest) in self.active.items():
            by_dir.setdefault(direction, []).append(tid)
        want = {d: self.caps[d] for d in by_dir}
        total = sum(want.values())
        if total > self.ceiling:
            fair = self.ceiling / len(want)
            low = {d: w for d, w in want.items() if w <= fair}
            left = self.ceiling - sum(low.values())
            high = [d for d in want if d not in low]
            want = {**low, **{d: left / len(high) for d in high}}
        return {tid: want[d] / len(ids) for d, ids in by_dir.items() for tid in ids}

    def _advance(self) -> None:
        dt = self.env.now - self._last
        self._last = self.env.now
        if dt <= 0 or not self.active:
            return
        for tid, rate in self.rates().items():
            self.active[tid][1] -= rate * dt

    def _poke(self) -> None:
        if not self._wake.triggered:
            self._wake.succeed()

    def _run(self):
        while True:
            if not self.active:
                self._wake = self.env.event()
                yield self._wake
                continue
            rates = self.rates()
            horizon = min(self.active[t][1] / r for t, r in rates.items())
            self._wake = self.env.event()
            yield self.env.timeout(max(horizon, 0.0)) | self._wake
            self._advance()
            for tid in [t for t, (_, rem, size, _) in self.active.items() if rem <= _DONE * size or rem < 1.0]:
                self.active.pop(tid)[3].succeed()


class CountingEnvironment(simpy.Environment):
    """A SimPy environment that counts scheduled events (for the events/s benchmark)."""

    def __init__(self):
        super().__init__()
        self.scheduled = 0

    def schedule(self, event, priority=1, delay=0):
        self.scheduled += 1
        super().schedule(event, priority, delay)


@dataclass
class StepResult:
    """Per simulated step, seconds / bytes."""

    step_time: np.ndarray
    stall: np.ndarray
    compute: np.ndarray
    h2d_bytes: np.ndarray
    d2h_bytes: np.ndarray
    events: int


def simulate(costs: LayerCosts, num_layers: int, gpu: GPU) -> StepResult:
    """Run the decode steps described by ``costs`` through the event model."""
    env = CountingEnvironment()
    link = Link(env, gpu)
    h2d_engine = simpy.Resource(env, capacity=1)
    d2h_engine = simpy.Resource(env, capacity=1)
    steps = len(costs.compute)
    step_time = np.zeros(steps)
    stall = np.zeros(steps)
    latency = COPY_CALLS_PER_LAYER * gpu.copy_latency

    def copy(engine: simpy.Resource, direction: str, nbytes: float, done: simpy.Event):
        with engine.request() as slot:
            yield slot
            yield env.timeout(latency)
            yield link.transfer(direction, nbytes)
        done.succeed()

    def prefetch(step: int) -> simpy.Event:
        done = env.event()
        if step >= steps or costs.h2d_bytes[step] <= 0:
            done.succeed()
        else:
            env.process(copy(h2d_engine, "h2d", costs.h2d_bytes[step], done))
        return done

    def compute_stream():
        # Layer 0 of the first step has nothing to overlap with: its prefetch counts as warm-up.
        ready = prefetch(0)
        yield ready
        for s in range(steps):
            start = env.now
            waited = 0.0
            for layer in range(num_layers):
                if not ready.triggered:
                    t0 = env.now
                    yield ready
                    waited += env.now - t0
                # Queue the next layer's prefetch (the last layer queues layer 0 of the next step).
                ready = prefetch(s if layer + 1 < num_layers else s + 1)
                yield env.timeout(costs.compute[s])
                if costs.d2h_bytes[s] > 0:
                    env.process(copy(d2h_engine, "d2h", costs.d2h_bytes[s], env.event()))
            step_time[s] = env.now - start
            stall[s] = waited

    env.process(compute_stream())
    env.run()
    events = env.scheduled
    return StepResult(
        step_time=step_time,
        stall=stall,
        compute=costs.compute * num_layers,
        h2d_bytes=costs.h2d_bytes * num_layers,
        d2h_bytes=costs.d2h_bytes * num_layers,
        events=events,
    )

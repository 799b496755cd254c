"""The engine's per-step recurrence solved directly: the fast path for runs whose copies do not compete.

Within a step every layer has the same compute time c and prefetch time H (``analytic.build_workload``
aggregates the batch per step); the H2D engine is idle whenever a layer starts (the layer has just waited
for its own prefetch, the only copy on that engine); and nothing the compute stream does waits on the D2H
engine. So, as long as the demotions do not take link bandwidth from a prefetch, the SimPy model reduces
to a max-plus recurrence on two times per step: when the step starts (a) and when its last layer starts
(x, which queues the next step's layer-0 prefetch):

    t0      = max(a_s, x_{s-1} + H_s)            layer 0 waits for its prefetch (that wait is stall)
    x_s     = t0 + (L - 1) * max(c_s, H_s)       every later layer: its compute or its prefetch
    a_{s+1} = max(x_s + c_s + extra_s, a_s + floor_s)

A loop over steps, not layers and events: ~1 µs per step whatever the batch and the layer count.

What it leaves out is link sharing: a demotion on the D2H engine that overlaps a prefetch while the two
directions' caps exceed the bidirectional ceiling slows the prefetch. A demotion of D bytes can cost the
prefetch at most its own transfer time at the shared rate times the share of H2D bandwidth it takes away;
the model is max-plus, so delays never amplify and the run's total delay is at most the sum of those
bounds. :func:`simulate` takes the recurrence when that bound is under ``CONTENTION_TOLERANCE`` of the
simulated time and the SimPy engine otherwise ("SimPy where copies really compete"): SimPy stays the
reference, and ``tests/test_simulator_fastpath.py`` holds the two within 0.5% over a matrix of runs.
"""

from __future__ import annotations

import numpy as np

from tiersim.simulator.link import copy_s, shared_rates
from tiersim.simulator.presets import GPU
from tiersim.simulator.step import StepCosts, StepResult, step_compute

#: The fast path is taken when the link-sharing it ignores can change the simulated time by at most this share.
CONTENTION_TOLERANCE = 1e-3
ENGINES = ("auto", "fast", "simpy")


def contention_bound(costs: StepCosts, num_layers: int, gpu: GPU) -> float:
    """Upper bound, seconds, on how much the demotions' share of the link can delay the whole run."""
    alone = shared_rates(gpu, {"h2d": 1})["h2d"]
    both = shared_rates(gpu, {"h2d": 1, "d2h": 1})
    slowdown = 1.0 - both["h2d"] / alone
    if slowdown <= 0:  # each direction keeps its own cap: nothing to share
        return 0.0
    up = np.asarray(costs.h2d_bytes, dtype=float)
    near_prefetch = (up > 0) | (np.append(up[1:], 0.0) > 0)  # this step's prefetches or the next step's layer 0
    down = np.where(near_prefetch, np.asarray(costs.d2h_bytes, dtype=float), 0.0)
    return float(num_layers * (down / both["d2h"]).sum() * slowdown)


def recurrence(costs: StepCosts, num_layers: int, gpu: GPU) -> StepResult:
    """The SimPy model's step times without link sharing between directions, by the recurrence above."""
    steps = len(costs.compute)
    prefetch = copy_s(gpu, costs.h2d_bytes, "h2d")
    layer = costs.layer_s  # the compute stream's time per layer (host work that outlasts its window included)
    # Plain floats: the loop runs once per step, and numpy scalars would cost more than the arithmetic.
    comp = layer.tolist()
    pre = prefetch.tolist() + [0.0]  # step S prefetches nothing
    extra = np.broadcast_to(np.asarray(costs.step_extra, dtype=float), (steps,)).tolist()
    floor = np.broadcast_to(np.asarray(costs.host_floor, dtype=float), (steps,)).tolist()
    step_time, stall, first = [0.0] * steps, [0.0] * steps, [0.0] * steps
    rest = num_layers - 1
    a = pre[0]  # the run's first prefetch is warm-up, outside every step
    x = 0.0
    for s in range(steps):
        c, h = comp[s], pre[s]
        t0 = x + h if x + h > a else a
        per_layer = h if h > c else c
        x = t0 + rest * per_layer
        end = x + c + extra[s]
        if a + floor[s] > end:
            end = a + floor[s]
        first[s] = t0
        step_time[s] = end - a
        stall[s] = (t0 - a) + rest * (h - c if h > c else 0.0)
        a = end
    return StepResult(
        step_time=np.array(step_time),
        stall=np.array(stall),
        compute=step_compute(costs, num_layers),
        h2d_bytes=costs.h2d_bytes * num_layers,
        d2h_bytes=costs.d2h_bytes * num_layers,
        events=0,
        wall_time=max(a, _last_demotion_landed(costs, num_layers, gpu, np.array(first), prefetch, layer)),
        engine="fast",
    )


def _last_demotion_landed(costs: StepCosts, num_layers: int, gpu: GPU, first: np.ndarray,
                          prefetch: np.ndarray, layer: np.ndarray) -> float:
    """When the D2H engine finishes its last copy (trailing demotions outlive the last step).

    The engine is a FIFO queue: a copy ends at ``max(arrival, previous end) + service``, so the last end is
    ``total service + max over copies of (arrival - service before it)``. Within a step the L copies arrive
    ``max(c, H)`` apart with equal service, so that maximum sits at the step's first or last copy: O(steps).
    """
    down = np.asarray(costs.d2h_bytes, dtype=float)
    busy = down > 0
    if not busy.any():
        return 0.0
    service = copy_s(gpu, down, "d2h")
    per_step = num_layers * service
    before = np.cumsum(per_step) - per_step  # service queued by earlier steps
    period = np.maximum(layer, prefetch)
    arrival = first + layer - before  # the step's first copy, less the service ahead of it
    best = arrival + np.maximum(0.0, (num_layers - 1) * (period - service))
    return float(per_step.sum() + best[busy].max())


def simulate_events(costs: StepCosts, num_layers: int, gpu: GPU) -> StepResult:
    """The SimPy engine, imported on use: the GPU machine (torch + numpy) runs the recurrence without simpy."""
    from tiersim.simulator.engine import simulate as events

    return events(costs, num_layers, gpu)


def simulate(costs: StepCosts, num_layers: int, gpu: GPU, engine: str = "auto") -> StepResult:
    """Step times for ``costs``: the recurrence where link sharing cannot matter, else the SimPy engine.

    ``engine="simpy"`` always runs the event model (the reference), ``"fast"`` always the recurrence.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "simpy":
        return simulate_events(costs, num_layers, gpu)
    fast = recurrence(costs, num_layers, gpu)
    if engine == "fast" or contention_bound(costs, num_layers, gpu) <= CONTENTION_TOLERANCE * fast.wall_time:
        return fast
    return simulate_events(costs, num_layers, gpu)

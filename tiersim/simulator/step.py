"""One model of a decode step: what a step costs (:class:`StepCosts`) and the solvers that time it; numpy only.

A strategy (``tiersim.simulator.strategies``, looked up by the names of ``tiersim.hierarchy.strategies``)
says what one step of a batch does: per layer, the GPU's own time, the bytes queued on each copy engine
(H2D one layer ahead, D2H after the layer), the host work that runs beside the layer, what is staged in
HBM; per step, the work after the last layer and the host floor; and whether the output is exact. That
is a :class:`StepCosts`, and nothing else describes a step. Three solvers time it:

* ``"closed form"`` (:func:`closed_form`): contention-free steady state, vectorised over steps;
* ``"fast"`` (``fastpath.recurrence``): the event model's max-plus recurrence, one loop over steps;
* ``"simpy"`` (``engine.simulate``): the discrete-event reference (link sharing, copy-engine queues).

Every strategy runs on every solver (``tests/test_simulator_step.py`` holds the fast ones to SimPy), so a
strategy is written once, as costs, and never as a step formula. :func:`price` is the public constructor
from aggregate token counts per tier (the serving simulator's entry point).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The solvers by name (what ``solve`` accepts; "auto" picks fast or SimPy, see fastpath.simulate).
SOLVERS = ("closed form", "fast", "simpy")


@dataclass
class StepCosts:
    """What each simulated step costs: arrays over steps (one value per layer, every layer alike: the
    batch is aggregated per step), seconds and bytes.

    The first eight fields keep the order of the former ``analytic.LayerCosts`` (an alias of this class).
    """

    compute: np.ndarray  # the GPU's own time per layer (its strategy's GPU additions included)
    h2d: np.ndarray  # per layer: the H2D copy queued one layer ahead (prefetch), latency included
    d2h: np.ndarray  # per layer: the D2H copy after the layer's attention (demotions), latency included
    h2d_bytes: np.ndarray  # what those two copies move, per layer
    d2h_bytes: np.ndarray
    #: Device work once per step after the last layer (final norm, LM head, embedding gather, rotary
    #: table) plus the preset's per-step host overhead; 0 keeps the layers-only model.
    step_extra: np.ndarray | float = 0.0
    #: Host time to issue one step (an eager, launch-bound harness): a step takes at least this long.
    host_floor: np.ndarray | float = 0.0
    compute_model: str = "roofline"
    #: Host work per layer that starts with the layer (host attention: it needs this layer's query) and that
    #: the layer waits for; it overlaps ``host_window`` seconds of the layer's GPU work (its HBM-tier attention).
    host: np.ndarray | float = 0.0
    host_window: np.ndarray | float = 0.0
    #: Bytes the host work itself moves per layer (query down, partial outputs up), priced inside ``host``.
    host_h2d_bytes: np.ndarray | float = 0.0
    host_d2h_bytes: np.ndarray | float = 0.0
    #: Share of the DDR tier staged in HBM per layer (sets the two staging buffers) and those bytes.
    staged: float = 1.0
    staged_bytes: np.ndarray | float = 0.0
    strategy: str = "prefetch"
    #: The strategy's split: hybrid's share on the host, recompute's share sent as activations,
    #: selective's share fetched, compressed-transfer's bytes per byte; 1 for prefetch.
    share: float = 1.0
    exact: bool = True

    def _per_step(self, value) -> np.ndarray:
        return np.broadcast_to(np.asarray(value, dtype=float), np.shape(self.compute))

    @property
    def layer_s(self) -> np.ndarray:
        """Seconds the compute stream spends on one layer: its GPU work, plus any host work that outlasts the
        GPU work it overlaps."""
        host = self._per_step(self.host)
        if not host.any():
            return np.asarray(self.compute, dtype=float)
        return self.compute + np.maximum(host - np.minimum(self._per_step(self.host_window), self.compute), 0.0)

    def link_bytes(self) -> dict[str, np.ndarray]:
        """Bytes per layer and step over the host link by direction: the copy engines' and the host work's."""
        return {"h2d": self.h2d_bytes + self._per_step(self.host_h2d_bytes),
                "d2h": self.d2h_bytes + self._per_step(self.host_d2h_bytes)}


@dataclass
class StepResult:
    """Per simulated step, seconds / bytes."""

    step_time: np.ndarray
    stall: np.ndarray
    compute: np.ndarray
    h2d_bytes: np.ndarray
    d2h_bytes: np.ndarray
    events: int
    wall_time: float = 0.0  # simulated time at the end, prefetch warm-up and trailing demotions included
    engine: str = "simpy"  # which solver produced it: "simpy", "fast" or "closed form"


def closed_form(costs: StepCosts, num_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """Contention-free step time and stall per step, seconds.

    The prefetch of layer l+1 starts when layer l starts computing, on one H2D engine. In steady
    state layers start ``max(compute, copy)`` apart: compute-bound when the copy hides under the
    previous layer's compute, link-bound (stall = copy - compute per layer) otherwise. The per-step
    work after the last layer (``step_extra``) overlaps the prefetch of the next step's layer 0, so
    the step is ``(L - 1) * max(c, h) + max(c + extra, h)``; a host floor (an eager, launch-bound
    harness) makes it at least that long. ``c`` is the compute stream's time per layer (host work that
    outlasts its window included).
    """
    c, h = costs.layer_s, costs.h2d
    extra = np.broadcast_to(np.asarray(costs.step_extra, dtype=float), c.shape)
    gpu_step = (num_layers - 1) * np.maximum(c, h) + np.maximum(c + extra, h)
    stall = (num_layers - 1) * np.maximum(h - c, 0.0) + np.maximum(h - c - extra, 0.0)
    step = np.maximum(gpu_step, np.broadcast_to(np.asarray(costs.host_floor, dtype=float), c.shape))
    return step, stall


def closed_form_result(costs: StepCosts, num_layers: int) -> StepResult:
    """:func:`closed_form` in the other solvers' result shape."""
    step, stall = closed_form(costs, num_layers)
    return StepResult(step_time=step, stall=stall, compute=step_compute(costs, num_layers),
                      h2d_bytes=costs.h2d_bytes * num_layers, d2h_bytes=costs.d2h_bytes * num_layers, events=0,
                      wall_time=float(step.sum()), engine="closed form")


def step_compute(costs: StepCosts, num_layers: int) -> np.ndarray:
    """The compute stream's busy time per step: every layer and the per-step work."""
    return costs.layer_s * num_layers + np.asarray(costs.step_extra, dtype=float)


def solve(costs: StepCosts, num_layers: int, gpu, solver: str = "auto") -> StepResult:
    """Time ``costs`` with one solver (:data:`SOLVERS`, or "auto": the recurrence unless copies compete)."""
    if solver == "closed form":
        return closed_form_result(costs, num_layers)
    from tiersim.simulator.fastpath import simulate

    return simulate(costs, num_layers, gpu, solver)


def price(model, gpu, tiers, batch: int, hbm, ddr, compressed=0.0, demoted=0.0, context=None,
          strategy: str = "prefetch", cover: float = 1.0, table=None, share: float | None = None) -> StepCosts:
    """The :class:`StepCosts` of one step or an array of steps from aggregate token counts per layer.

    ``hbm``, ``ddr``, ``compressed`` (the batch's tokens per tier, per layer), ``demoted`` (tokens copied down
    at the step) and ``context`` (tokens retained; default their sum) are numbers or arrays over steps;
    ``tiers`` is the cache's :class:`~tiersim.hierarchy.config.TierConfig` (or an ``analytic.Offload``);
    ``strategy`` a registered name. This is the constructor a request-level simulator calls with its changing
    batch: the same costs, strategies and solvers as the capacity planner, no second step formula.
    """
    from tiersim.simulator import analytic, strategies

    offload = tiers if isinstance(tiers, analytic.Offload) else analytic.Offload(tiers)
    work = analytic.workload_from_counts(batch, hbm, ddr, compressed, demoted, context)
    return strategies.step_costs(strategy, model, gpu, offload, work, cover=cover, table=table, share=share)

"""The one result row: a (split, strategy, batch) timed by any solver, as every table and file holds it.

Typed, so the keys are written once. :meth:`Row.as_dict` is a row of ``capacity``'s grid, ``simulate``'s
summary and the sweep (the capacity file's ``rows``, docs/file-formats.md: the fields below up to
``compute_model``, then ``overhead_pct`` and ``baseline_fits`` once the row is set against its baseline);
:meth:`Row.as_point` is the planner's point (``points``), the same numbers under the planner's keys. One
constructor (:meth:`Row.of`) builds it from a :class:`~tiersim.simulator.step.StepCosts` and whichever
solver's :class:`~tiersim.simulator.step.StepResult`; :func:`overhead_pct` is the one overhead.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from tiersim.simulator.analytic import GB


#: What each solver's rows say in ``method``.
METHODS = {"simpy": "SimPy", "fast": "fast path", "closed form": "closed form"}


@dataclass
class Row:
    hbm: float  # the tier ratios
    ddr: float
    compressed: float
    evict: float
    prefetch: float  # share of the DDR tier fetched per step
    strategy: str
    batch: int
    steps: int
    method: str  # "SimPy", "fast path" or "closed form": which solver ran (METHODS)
    context_tokens_mean: float
    context_tokens_peak: float
    kv_full_gb: float
    kv_hbm_gb: float
    compressed_gb: float
    staging_gb: float
    hbm_saved_gb: float
    peak_hbm_gb: float
    hbm_capacity_gb: float
    ddr_gb: float  # the DDR tier in host memory at peak
    host_capacity_gb: float
    fits: bool  # hbm_fits and ddr_fits
    hbm_fits: bool
    ddr_fits: bool
    step_ms: float  # mean over the simulated steps
    step_p50_ms: float
    step_p99_ms: float
    stall_ms: float
    stall_p99_ms: float
    compute_ms: float
    h2d_gb_per_step: float
    d2h_gb_per_step: float
    tokens_per_s: float
    max_batch: int | None  # None where the largest-batch search was skipped
    events: int
    compute_model: str
    # Beyond the grid row's keys (the planner's point shows them):
    approximate: bool = False  # the strategy's output differs from the full cache's
    share: float = 1.0  # the strategy's split (StepCosts.share)

    @classmethod
    def of(cls, policy, costs, result, work, mem, gpu, max_batch: int | None = None) -> "Row":
        """From one solver's ``result`` for ``costs`` (the strategy's) on ``work``; ``mem`` its memory at peak."""
        step = result.step_time
        hbm_fits, ddr_fits = (bool(x) for x in mem.fit_flags(gpu))
        return cls(
            **policy.tiers.ratios(),
            prefetch=costs.staged,
            strategy=costs.strategy,
            batch=work.batch,
            steps=int(len(step)),
            method=METHODS[result.engine],
            context_tokens_mean=round(work.context_mean, 1),
            context_tokens_peak=round(float(work.full_context.max()) / work.batch, 1),
            kv_full_gb=mem.kv_full / GB,
            kv_hbm_gb=mem.kv_hbm / GB,
            compressed_gb=mem.compressed / GB,
            staging_gb=mem.staging / GB,
            hbm_saved_gb=mem.saved / GB,
            peak_hbm_gb=mem.peak / GB,
            hbm_capacity_gb=gpu.hbm_bytes / GB,
            ddr_gb=mem.ddr / GB,
            host_capacity_gb=gpu.host_bytes / GB,
            fits=hbm_fits and ddr_fits,
            hbm_fits=hbm_fits,
            ddr_fits=ddr_fits,
            step_ms=float(step.mean() * 1e3),
            step_p50_ms=float(np.percentile(step, 50) * 1e3),
            step_p99_ms=float(np.percentile(step, 99) * 1e3),
            stall_ms=float(result.stall.mean() * 1e3),
            stall_p99_ms=float(np.percentile(result.stall, 99) * 1e3),
            compute_ms=float(result.compute.mean() * 1e3),
            h2d_gb_per_step=float(result.h2d_bytes.mean() / GB),
            d2h_gb_per_step=float(result.d2h_bytes.mean() / GB),
            tokens_per_s=float(work.batch / step.mean()),
            max_batch=max_batch,
            events=result.events,
            compute_model=costs.compute_model,
            approximate=not costs.exact,
            share=round(float(costs.share), 4),
        )

    def as_dict(self) -> dict[str, Any]:
        """The row as the capacity file's ``rows`` and the tables hold it."""
        return {k: getattr(self, k) for k in GRID_KEYS}

    def as_point(self, tpot_slo_ms: float | None = None, strategy: str | None = None) -> dict[str, Any]:
        """The row as the planner's point (the capacity file's ``points``); ``strategy`` renames it (``none``)."""
        return {
            "strategy": strategy or self.strategy, "approximate": self.approximate, "share": self.share,
            "hbm": self.hbm, "ddr": self.ddr, "compressed": self.compressed, "evict": self.evict,
            "batch": self.batch, "steps": self.steps,
            "context_tokens_mean": self.context_tokens_mean, "context_tokens_peak": self.context_tokens_peak,
            "tpot_ms": self.step_ms, "tpot_p99_ms": self.step_p99_ms, "step_ms": self.step_ms,
            "tokens_per_s": self.tokens_per_s,
            "hbm_saved_gb": self.hbm_saved_gb, "peak_hbm_gb": self.peak_hbm_gb, "ddr_gb": self.ddr_gb,
            "hbm_capacity_gb": self.hbm_capacity_gb,
            "fits": self.fits, "hbm_fits": self.hbm_fits, "ddr_fits": self.ddr_fits,
            "within_slo": tpot_slo_ms is None or self.step_ms <= tpot_slo_ms,
            "compute_model": self.compute_model,  # a batch range's table names the model it priced from this
        }


#: The grid row's keys, in file order (every field up to ``compute_model``).
GRID_KEYS = tuple(f.name for f in fields(Row))[: [f.name for f in fields(Row)].index("compute_model") + 1]
CapacityRow = Row  # the former name


def overhead_pct(step_ms: float, baseline_step_ms: float) -> float:
    """Step time against the all-in-HBM baseline's, percent. Rounded far below any reported digit, so float
    noise between event orders is not "-0.0%"."""
    return round((step_ms / baseline_step_ms - 1.0) * 100.0, 9) + 0.0

"""The summary row of one simulated configuration: a row of ``capacity``'s grid and ``simulate``'s summary.

Typed, so the keys of the capacity file's ``rows`` (docs/file-formats.md) are written once: the
fields below, then ``overhead_pct`` and ``baseline_fits`` once the row is set against its baseline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tiersim.simulator.analytic import GB


@dataclass
class CapacityRow:
    hbm: float  # the tier ratios
    ddr: float
    compressed: float
    evict: float
    prefetch: float  # share of the DDR tier fetched per step
    strategy: str
    batch: int
    steps: int
    method: str  # "SimPy" or "fast path": which engine ran (tiersim.simulator.fastpath)
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

    @classmethod
    def simulated(cls, policy, batch: int, steps: int, work, mem, gpu, result, compute_model: str, fits: bool,
                  max_batch: int | None) -> "CapacityRow":
        """From the engine's ``result`` for ``policy`` on ``work``, with ``mem`` its memory at peak."""
        step = result.step_time
        return cls(
            **policy.tiers.ratios(),
            prefetch=policy.prefetch,
            strategy="prefetch" if policy.prefetch >= 1.0 else "selective",
            batch=batch,
            steps=steps,
            method="SimPy" if result.engine == "simpy" else "fast path",
            context_tokens_mean=round(work.context_mean, 1),
            context_tokens_peak=round(float(work.full_context.max()) / batch, 1),
            kv_full_gb=mem.kv_full / GB,
            kv_hbm_gb=mem.kv_hbm / GB,
            compressed_gb=mem.compressed / GB,
            staging_gb=mem.staging / GB,
            hbm_saved_gb=mem.saved / GB,
            peak_hbm_gb=mem.peak / GB,
            hbm_capacity_gb=gpu.hbm_bytes / GB,
            ddr_gb=mem.ddr / GB,
            host_capacity_gb=gpu.host_bytes / GB,
            fits=fits,
            hbm_fits=bool(mem.peak <= gpu.hbm_bytes),
            ddr_fits=bool(mem.ddr <= gpu.host_bytes),
            step_ms=float(step.mean() * 1e3),
            step_p50_ms=float(np.percentile(step, 50) * 1e3),
            step_p99_ms=float(np.percentile(step, 99) * 1e3),
            stall_ms=float(result.stall.mean() * 1e3),
            stall_p99_ms=float(np.percentile(result.stall, 99) * 1e3),
            compute_ms=float(result.compute.mean() * 1e3),
            h2d_gb_per_step=float(result.h2d_bytes.mean() / GB),
            d2h_gb_per_step=float(result.d2h_bytes.mean() / GB),
            tokens_per_s=float(batch / step.mean()),
            max_batch=max_batch,
            events=result.events,
            compute_model=compute_model,
        )

    def as_dict(self) -> dict[str, Any]:
        """The row as the file and the tables hold it."""
        return asdict(self)

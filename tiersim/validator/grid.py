"""The decode grid both executors walk, and the calibration file's body it becomes.

The HF harness (:mod:`calibrate`) and the graph executor (:mod:`graph_run`) time different steps but share
the grid's order (HBM 1.0 first at each batch and context: the other ratios' baseline), its skips (a spent
time budget, memory that ran out), the compute fit over the baselines and the file's fields besides the
points, so the two files stay alike and ``simulate --against`` reads either. torch and numpy only.
"""

from __future__ import annotations

import time

from tiersim import fileformat
from tiersim.validator import compute
from tiersim.validator.calibrate import base_gpu_preset
from tiersim.validator.predict import effective_context, layer_bytes
from tiersim.validator.operators_timing import is_oom


def measure_grid(batches, contexts, hbms, measure, baselines: list, log, label: str, budget_s=None, started=None):
    """The decode grid's order and skips, the same for both executors: at each (batch, context) HBM 1.0 comes
    first (the baseline of the other ratios), each point is ``measure(batch, context, hbm)`` unless the time
    budget counted from ``started`` is spent or the device or pinned host memory ran out (then ``m`` is None
    and ``why`` says so). Yields ``(batch, context, hbm, m, baseline, why)`` for the ratios in ``hbms``; the
    measured baselines are appended to ``baselines`` (the compute fit's points)."""
    for batch in batches:
        for context in contexts:
            baseline = None
            for hbm in [1.0] + [h for h in hbms if h != 1.0]:
                m, why = measure_one(batch, context, hbm, measure, log, label, budget_s, started)
                if hbm == 1.0:
                    baseline = m
                    if m:
                        baselines.append(m)
                if hbm in hbms:
                    yield batch, context, hbm, m, baseline, why


def measure_one(batch, context, hbm, measure, log, label: str, budget_s=None, started=None):
    """One point under the grid's skips: ``(m, why)``, ``m`` None when the time budget counted from ``started``
    is spent or the device or pinned host memory ran out (``why`` says which, and is logged)."""
    import gc

    m, why = None, None
    if budget_s is not None and time.monotonic() - started > budget_s:
        why = f"skipped: time budget of {budget_s:g} s spent"
    else:
        # the seconds since the run began: a first GPU run's log then sizes the next one's budget point by point
        at = f" (at {time.monotonic() - started:.0f} s)" if started is not None else ""
        log(f"{label}: batch {batch}, context {context}, hbm {hbm}{at}")
        try:
            m = measure(batch, context, hbm)
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError; cudaHostAlloc: a RuntimeError
            if not is_oom(exc):
                raise
            gc.collect()
            why = "out of memory: point skipped"
    if why:
        log(f"  {why}")
    return m, why


def layer_fit(model_doc: dict, shape, baselines: list, warmup: int, steps: int, copy_rate: float) -> dict:
    """The compute fit over the HBM-1.0 points: per-layer bytes (at the context the timed steps saw) vs time."""
    return compute.fit_layer_model(
        [layer_bytes(model_doc, b["batch"], effective_context(b["context"], warmup, steps)) for b in baselines],
        [b["step_ms"] / 1e3 / shape.num_layers for b in baselines], fallback_gbps=copy_rate)


def calibration_doc(command, executor: str, info: dict, dev, shape, params: int, settings: dict, link_doc: dict,
                    tflops: float, copy_rate: float, fit: dict) -> dict:
    """The calibration file's body before its points: what either executor measured besides the grid."""
    return {
        **fileformat.header(fileformat.CALIBRATION),
        "command": command,
        "executor": executor,
        "device": info,
        "gpu_preset": base_gpu_preset(info["name"] if dev.type == "cuda" else None),
        "model_shape": {**shape.to_dict(), "params": params},
        "settings": settings,
        "link": link_doc,
        "compute": {"hbm_bw_gbps": fit["hbm_bw_gbps"], "peak_tflops": tflops,
                    "layer_overhead_us": fit["layer_overhead_us"], "copy_gbps": copy_rate, "method": fit["method"]},
        "points": [],
    }

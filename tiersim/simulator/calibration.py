"""Reading a calibration file written by the validator; stdlib only.

A calibration measured on a real GPU overrides the preset's link (bandwidth per direction, the
shared bidirectional ceiling, per-copy latency) and compute numbers (achieved HBM bandwidth,
matrix throughput, per-layer overhead).
"""

from __future__ import annotations

import math
from pathlib import Path

from tiersim import fileformat
from tiersim.errors import TiersimError
from tiersim.simulator.presets import GB, GPU, with_overrides


#: The executor a measurement came from (a calibration's ``executor``; files before it are the HF harness's).
GPU_BOUND_EXECUTOR = "cuda-graph"


def executor_of(doc: dict) -> str:
    """``cuda-graph``, ``graph-eager`` (the CPU smoke run of the same step) or ``hf-eager`` (HF ``generate`` over
    TieredCache, and every operator profile's decode runs); a file without the field is the HF harness's."""
    if doc.get("kind") == "operator-profile":
        return "hf-eager"
    return doc.get("executor") or "hf-eager"


def host_bound_note(doc: dict, label: str = "calibration") -> str | None:
    """One line when ``doc`` was measured by an executor whose step time includes the host's per-step work
    (Python, kernel launches): calibrating or judging the simulator by it predicts a host-bound engine."""
    executor = executor_of(doc)
    if executor == GPU_BOUND_EXECUTOR:
        return None
    return (f"{label}: measured by the {executor} executor, whose steps include the host's per-step work; it "
            "predicts a host-bound engine, not the memory hierarchy (measure with `tiersim validate --executor "
            "graph` on a GPU: executor cuda-graph)")


#: (section, key, lowest, highest) of every number apply_calibration reads: a measured figure far outside any
#: host link or GPU (a NaN, 1e-300 GB/s, 1e308) would price every step as NaN or zero, so it is refused.
NUMBERS = (("link", "h2d_gbps", 1e-3, 1e5), ("link", "d2h_gbps", 1e-3, 1e5), ("link", "bidir_total_gbps", 1e-3, 2e5),
           ("link", "copy_latency_us", 1e-3, 1e6), ("compute", "hbm_bw_gbps", 1e-3, 1e6),
           ("compute", "peak_tflops", 1e-6, 1e6), ("compute", "layer_overhead_us", 1e-3, 1e7))
OBJECTS = ("device", "link", "compute", "settings", "model_shape")
TEXTS = ("executor", "gpu_preset")


def load_calibration(path: str | Path, label: str = "calibration file") -> dict:
    """A calibration document from `tiersim validate`, or one clear error naming ``label`` (the option or
    the file's role), the file and the field."""
    doc = fileformat.read(path, [fileformat.CALIBRATION], label=label)[0]
    check_objects(doc, f"{label} {path}", OBJECTS)
    for field in TEXTS:
        if doc.get(field) is not None and not isinstance(doc[field], str):
            raise TiersimError(f"{label} {path}: {field} must be text, got {doc[field]!r:.40}")
    for section, key, lo, hi in NUMBERS:
        value = (doc.get(section) or {}).get(key)
        if value is not None and not _in_range(value, lo, hi):
            raise TiersimError(f"{label} {path}: {section}.{key} must be a number in {lo:g}..{hi:g}, "
                               f"got {value!r:.40}")
    return doc


def check_objects(doc: dict, where: str, fields) -> None:
    """Each of ``fields`` absent, null or a JSON object: a measurement file's sections are read with ``.get``."""
    for field in fields:
        if doc.get(field) is not None and not isinstance(doc[field], dict):
            raise TiersimError(f"{where}: {field} must be an object, got {doc[field]!r:.40}")


def _in_range(value, lo: float, hi: float) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and lo <= value <= hi)


def apply_calibration(gpu: GPU, calibration: dict) -> GPU:
    """The preset with every number the calibration measured replaced by the measurement."""
    link = calibration.get("link") or {}
    compute = calibration.get("compute") or {}

    def num(section: dict, key: str, scale: float):
        value = section.get(key)
        if value is None:
            return None
        if not _in_range(value, 1e-300, math.inf) or value <= 0:  # positive, finite, a number (not a bool)
            raise TiersimError(f"calibration: {key} must be a positive number, got {value!r}")
        return float(value) * scale

    hbm_bw = num(compute, "hbm_bw_gbps", GB)
    peak = num(compute, "peak_tflops", 1e12)
    overhead = num(compute, "layer_overhead_us", 1e-6)
    device = (calibration.get("device") or {}).get("name", "unknown device")
    h2d, d2h = num(link, "h2d_gbps", GB), num(link, "d2h_gbps", GB)
    measured_link = h2d is not None and d2h is not None  # an assumed preset link is assumed no more
    return with_overrides(
        gpu,
        link_assumed=False if measured_link else None,
        link_source=f"measured: the calibration's link sweep on {device}" if measured_link else None,
        h2d_bw=h2d,
        d2h_bw=d2h,
        bidir_bw=num(link, "bidir_total_gbps", GB),
        copy_latency=num(link, "copy_latency_us", 1e-6),
        # Measured rates are achieved rates: use them as the datasheet figure at 100% efficiency.
        hbm_bw=hbm_bw,
        hbm_efficiency=1.0 if hbm_bw else None,
        # The validator fits one achieved bandwidth and one per-layer overhead on whole decode steps: they
        # replace the preset's per-stream physics (weights, attention, kernel costs) rather than stack on it.
        weight_efficiency=1.0 if hbm_bw else None,
        attn_efficiency=1.0 if hbm_bw else None,
        gemm_kernel_s=0.0 if hbm_bw else None,
        attn_kernel_s=0.0 if hbm_bw else None,
        gemm_batch_slowdown=0.0 if hbm_bw else None,
        peak_flops=peak,
        flops_efficiency=1.0 if peak else None,
        layer_overhead=overhead,
        layer_overhead_per_width=0.0 if overhead is not None else None,
        name=f"{gpu.name} (calibrated: {device})",
    )

"""The one model every measured cost is fitted to: ``time = fixed + bytes / bandwidth``.

Used twice: a copy's per-call latency and link bandwidth, and a decoder layer's fixed overhead
(launches, small ops) and achieved memory bandwidth.
"""

from __future__ import annotations

import numpy as np


def fit_latency_bandwidth(nbytes, seconds) -> tuple[float, float]:
    """(fixed seconds, bandwidth bytes/s) minimising the *relative* error of ``fixed + bytes / bw``.

    Relative, because absolute least squares lets the largest points decide everything and
    leaves the fixed term (microseconds) to noise. Both parameters are kept non-negative.
    """
    b = np.asarray(nbytes, dtype=float)
    t = np.asarray(seconds, dtype=float)
    if b.shape != t.shape or b.ndim != 1 or b.size < 2 or np.any(t <= 0) or np.any(b < 0):
        raise ValueError("the fit needs at least two points with positive times and non-negative sizes")
    design = np.stack([1.0 / t, b / t], axis=1)
    (fixed, inv_bw), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    if inv_bw <= 0:  # the fixed cost alone explains the data: keep the best observed rate
        return float(np.min(t)), float(np.max(b / t))
    if fixed < 0:
        r = b / t
        return 0.0, float((r * r).sum() / r.sum())
    return float(fixed), float(1.0 / inv_bw)

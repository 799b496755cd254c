"""The layer compute-time model: achieved memory bandwidth and per-layer overhead, fitted on real decodes.

The simulator prices a decoder layer as a roofline, ``max(bytes / hbm_bw, flops / peak) +
layer_overhead``. Datasheet numbers overstate what HF-style decode achieves, so the validator
fits ``hbm_bw`` and ``layer_overhead`` on the all-in-HBM decode steps it measured anyway (per-layer
time against the bytes the simulator says a layer reads), and measures ``peak`` with one large
matmul. A device-to-device copy is recorded too, as a sanity bound on the fitted bandwidth.
"""

from __future__ import annotations

import torch

from tiersim.validator.fit import fit_latency_bandwidth
from tiersim.validator.timing import Stopwatch


def _timed(watch: Stopwatch, fn, reps: int) -> float:
    """Seconds per call of ``fn`` after one warm-up call."""
    fn()
    watch.sync()
    start = watch.mark()
    for _ in range(reps):
        fn()
    end = watch.mark()
    watch.sync()
    return watch.elapsed_ms(start, end) / 1e3 / reps


def matmul_tflops(device, n: int | None = None, reps: int = 10) -> float:
    """Dense matmul throughput (bf16 on CUDA, float32 on CPU) in TFLOP/s."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 256)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = _timed(Stopwatch(device), lambda: torch.matmul(a, b, out=out), reps)
    return 2 * n**3 / seconds / 1e12


def copy_gbps(device, nbytes: int | None = None, reps: int = 10) -> float:
    """Device memory bandwidth of a plain copy (bytes read + written) in GB/s."""
    device = torch.device(device)
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (32 << 20))
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = _timed(Stopwatch(device), lambda: dst.copy_(src), reps)
    return 2 * nbytes / seconds / 1e9


def fit_layer_model(layer_bytes, layer_seconds, fallback_gbps: float) -> dict:
    """``{"hbm_bw_gbps", "layer_overhead_us", "method"}`` from per-layer (bytes read, seconds) samples.

    With fewer than two distinct byte counts (one batch and one context) there is nothing to fit
    a slope to: the copy benchmark's bandwidth is used and the overhead is the mean residual.
    A fit that finds no positive overhead reports ``None`` (the simulator keeps its preset).
    """
    xs = [float(x) for x in layer_bytes]
    ys = [float(y) for y in layer_seconds]
    if len({round(x) for x in xs}) >= 2:
        overhead, bandwidth = fit_latency_bandwidth(xs, ys)
        method = "fit on all-in-HBM decode steps"
    else:
        bandwidth = fallback_gbps * 1e9
        overhead = max(sum(y - x / bandwidth for x, y in zip(xs, ys)) / max(len(xs), 1), 0.0)
        method = "device copy bandwidth; overhead = mean residual"
    return {
        "hbm_bw_gbps": bandwidth / 1e9,
        "layer_overhead_us": overhead * 1e6 if overhead > 0 else None,
        "method": method,
    }

"""The host link: a pinned-memory copy sweep and the ``time = latency + bytes / bandwidth`` fit.

The simulator charges every copy a fixed per-call latency plus its bytes over the link's
bandwidth. Both numbers come from here: copies of 4 KiB to 64 MiB host->device, device->host
and both directions at once (on two side streams, so the DMA engines really overlap), each
timed with CUDA events over a burst of back-to-back copies so launch cost is included the way
the cache pays it.
"""

from __future__ import annotations

import statistics

import torch

from tiersim.validator.fit import fit_latency_bandwidth
from tiersim.validator.timing import Stopwatch

SIZES = tuple(4096 * 4**i for i in range(8))  # 4 KiB .. 64 MiB
DIRECTIONS = ("h2d", "d2h", "both")
BURST_BYTES = 256 << 20  # bytes per timed burst: long enough to dwarf event resolution
MIN_REPS, MAX_REPS = 4, 256
TRIALS = 3


def _reps(size: int) -> int:
    return int(min(MAX_REPS, max(MIN_REPS, BURST_BYTES // (size * 16))))


class _Buffers:
    """One host and one device buffer per direction, allocated once at the largest size."""

    def __init__(self, device: torch.device, max_bytes: int) -> None:
        pin = device.type == "cuda"
        self.host_src = torch.ones(max_bytes, dtype=torch.uint8, pin_memory=pin)
        self.host_dst = torch.empty(max_bytes, dtype=torch.uint8, pin_memory=pin)
        self.dev_dst = torch.empty(max_bytes, dtype=torch.uint8, device=device)
        self.dev_src = torch.ones(max_bytes, dtype=torch.uint8, device=device)


def _burst(buffers: _Buffers, direction: str, size: int, reps: int, streams) -> None:
    h2d_stream, d2h_stream = streams
    for _ in range(reps):
        if direction in ("h2d", "both"):
            with _on(h2d_stream):
                buffers.dev_dst[:size].copy_(buffers.host_src[:size], non_blocking=True)
        if direction in ("d2h", "both"):
            with _on(d2h_stream):
                buffers.host_dst[:size].copy_(buffers.dev_src[:size], non_blocking=True)


class _on:
    """``torch.cuda.stream`` that is a no-op on CPU."""

    def __init__(self, stream) -> None:
        self.ctx = torch.cuda.stream(stream) if stream is not None else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def time_copy(buffers: _Buffers, watch: Stopwatch, direction: str, size: int, streams) -> float:
    """Seconds per copy (per pair of concurrent copies for ``both``), median of a few bursts."""
    reps = _reps(size)
    _burst(buffers, direction, size, 2, streams)  # warm-up
    current = torch.cuda.current_stream(watch.device) if watch.cuda else None
    trials = []
    for _ in range(TRIALS):
        if watch.cuda:
            current.synchronize()
        start = watch.mark()
        if watch.cuda:
            for stream in streams:
                stream.wait_stream(current)
        _burst(buffers, direction, size, reps, streams)
        if watch.cuda:
            for stream in streams:
                current.wait_stream(stream)
        end = watch.mark()
        watch.sync()
        trials.append(watch.elapsed_ms(start, end) / 1e3 / reps)
    return statistics.median(trials)


def sweep(device, sizes=SIZES) -> list[dict]:
    """Rows ``{"bytes", "direction", "seconds", "gbps"}``; ``gbps`` counts both directions for ``both``."""
    device = torch.device(device)
    watch = Stopwatch(device)
    buffers = _Buffers(device, max(sizes))
    streams = (torch.cuda.Stream(device), torch.cuda.Stream(device)) if watch.cuda else (None, None)
    rows = []
    for size in sizes:
        for direction in DIRECTIONS:
            seconds = time_copy(buffers, watch, direction, size, streams)
            moved = size * (2 if direction == "both" else 1)
            rows.append({"bytes": size, "direction": direction, "seconds": seconds, "gbps": moved / seconds / 1e9})
    return rows


def summarize_link(rows: list[dict]) -> dict:
    """The calibration's ``link`` section: fitted bandwidths and the per-copy latency, plus the sweep."""
    fits = {}
    for direction in DIRECTIONS:
        pts = [r for r in rows if r["direction"] == direction]
        moved = [r["bytes"] * (2 if direction == "both" else 1) for r in pts]
        latency, bandwidth = fit_latency_bandwidth(moved, [r["seconds"] for r in pts])
        fits[direction] = {
            "latency_us": latency * 1e6,
            "gbps": bandwidth / 1e9,
            "peak_gbps": max(r["gbps"] for r in pts),
        }
    return {
        "h2d_gbps": fits["h2d"]["gbps"],
        "d2h_gbps": fits["d2h"]["gbps"],
        # The shared ceiling is what both directions together really reached, not the fit's asymptote.
        "bidir_total_gbps": fits["both"]["peak_gbps"],
        # The prefetch (H2D) is the copy on the critical path: its per-call latency is the one charged.
        # null when the fit finds none (the simulator then keeps its preset's latency).
        "copy_latency_us": fits["h2d"]["latency_us"] or None,
        "fit": fits,
        "sweep": rows,
    }

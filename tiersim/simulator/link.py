"""The host link's arithmetic, written once: how fast each direction runs and what one copy costs; numpy only.

Every model of a step prices a copy the same way (the closed form, the recurrence, the strategies and
the validator's predictions): ``calls · latency + bytes / rate``, where ``calls`` is the number of
``cudaMemcpyAsync`` calls (keys and values gathered into one contiguous region each: two per layer) and
``rate`` the direction's bandwidth while it runs alone under the shared ceiling. The SimPy engine
(``engine.Link``) shares the same rates between concurrent transfers (:func:`shared_rates`).
"""

from __future__ import annotations

import numpy as np

from tiersim.simulator.presets import GPU

DIRECTIONS = ("h2d", "d2h")
COPY_CALLS_PER_LAYER = 2  # keys and values, each gathered into one contiguous staging region


def shared_rates(gpu: GPU, count: dict[str, int]) -> dict[str, float]:
    """Per-transfer rate in each direction with ``count[direction]`` transfers active: each direction's cap
    split among its transfers, the directions' sum held under the shared ceiling, shared max-min fairly or,
    where the preset measured an uneven split (``GPU.bidir_h2d_share``), by that split."""
    caps = {"h2d": gpu.h2d_bw, "d2h": gpu.d2h_bw}
    want = {d: caps[d] for d, n in count.items() if n > 0}
    if len(want) == 2 and gpu.bidir_h2d_share is not None and sum(want.values()) > gpu.bidir_bw:
        # A measured uneven split (a host whose H2D collapses while D2H runs): each direction its share.
        h2d = min(caps["h2d"], gpu.bidir_h2d_share * gpu.bidir_bw)
        want = {"h2d": h2d, "d2h": min(caps["d2h"], gpu.bidir_bw - h2d)}
    elif sum(want.values()) > gpu.bidir_bw:
        fair = gpu.bidir_bw / len(want)
        low = {d: w for d, w in want.items() if w <= fair}
        high = [d for d in want if d not in low]
        left = gpu.bidir_bw - sum(low.values())
        want = {**low, **{d: left / len(high) for d in high}}
    return {d: want[d] / n for d, n in count.items() if n > 0}


def rate(gpu: GPU, direction: str) -> float:
    """Bytes/s of one copy in ``direction`` with nothing else on the link."""
    if direction not in DIRECTIONS:
        raise ValueError(f"link direction must be h2d or d2h, got {direction!r}")
    return shared_rates(gpu, {direction: 1})[direction]


def call_latency(gpu: GPU, calls: int = COPY_CALLS_PER_LAYER) -> float:
    """Seconds a copy's ``cudaMemcpyAsync`` calls cost before its bytes move (the SimPy copy engines pay it too)."""
    return calls * gpu.copy_latency


def copy_s(gpu: GPU, nbytes, direction: str = "h2d", calls: int = COPY_CALLS_PER_LAYER):
    """Seconds one copy of ``nbytes`` takes (numbers or arrays; 0 where there is nothing to move):
    ``calls · latency + bytes / rate``, the link idle during each call's latency."""
    nbytes = np.asarray(nbytes, dtype=float)
    return np.where(nbytes > 0, call_latency(gpu, calls) + nbytes / rate(gpu, direction), 0.0)

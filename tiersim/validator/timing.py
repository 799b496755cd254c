"""Timing that reads the GPU's own clock: CUDA events on the stream, not host timers.

Host timers around asynchronous launches measure how fast Python enqueues work, not how long
the GPU runs it. Events recorded on the stream measure the device timeline, idle gaps included
(so a launch-bound step still shows its real duration). On CPU the same API falls back to
``perf_counter`` so the smoke mode runs the identical code path.
"""

from __future__ import annotations

import statistics
import time

import torch


class Stopwatch:
    """``mark()`` returns a timestamp handle; ``elapsed_ms(a, b)`` reads it after ``sync()``."""

    def __init__(self, device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def mark(self, stream=None):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return event

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def elapsed_ms(self, start, end) -> float:
        if not self.cuda:
            return (end - start) * 1e3
        return start.elapsed_time(end)


def summarize(values_ms: list[float]) -> dict:
    """Median (the headline: robust to a stray re-tier or a page fault), mean and p90."""
    if not values_ms:
        return {"median": None, "mean": None, "p90": None}
    ordered = sorted(values_ms)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"median": statistics.median(ordered), "mean": statistics.fmean(ordered), "p90": p90}

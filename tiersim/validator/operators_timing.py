"""The operator profiler's clock: device time per call from a replayed CUDA graph, host issue time per
call, rotated operands so no call is served from L2, and the wall-clock budget a borrowed GPU runs under.

Split from ``tiersim.validator.operators``. torch and the standard library only.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from typing import Callable

import torch

#: Rotated working set per operator: several times an H100's 50 MB L2, so no call finds its inputs there.
ROTATE_BYTES = 256 << 20
MIN_CALLS = 8  # calls per timed graph (a multiple of the copies)
REPS = 5  # timed graph replays; the median is kept


class OpTimer:
    """Times ``fn(i)`` (i = rotation index) as device time per call and host issue time per call."""

    def __init__(self, device: torch.device, reps: int = REPS) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.reps = reps

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def host_us(self, fn: Callable[[int], object], calls: int) -> float:
        """CPU time to issue one eager call (the GPU may still be running when it returns)."""
        fn(0)
        self.sync()
        start = time.perf_counter()
        for i in range(calls):
            fn(i)
        elapsed = time.perf_counter() - start
        self.sync()
        return elapsed / calls * 1e6

    def device_us(self, fn: Callable[[int], object], calls: int) -> tuple[float, str]:
        """(microseconds per call, method): a replayed CUDA graph, or on failure (and on CPU) an eager burst."""
        if self.cuda:
            try:
                return self._graph_us(fn, calls), "cuda-graph"
            except Exception:  # noqa: BLE001 - an op that cannot be captured is timed eagerly instead
                torch.cuda.synchronize(self.device)
        return self._burst_us(fn, calls), "eager-burst"

    def _graph_us(self, fn, calls: int) -> float:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for i in range(min(calls, 3)):
                fn(i)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        pool = torch.cuda.graph_pool_handle()  # named: a failed capture's pool is recovered, so the profile goes on
        before = torch.cuda.current_stream(self.device)
        try:
            with torch.cuda.graph(graph, pool=pool):
                for i in range(calls):
                    fn(i)
        except BaseException:
            recover_failed_capture(self.device, pool, before)
            raise
        graph.replay()
        times = []
        for _ in range(self.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / calls)
        del graph
        return statistics.median(times)

    def _burst_us(self, fn, calls: int) -> float:
        fn(0)
        self.sync()
        times = []
        for _ in range(self.reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for i in range(calls):
                    fn(i)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3 / calls)
            else:
                t0 = time.perf_counter()
                for i in range(calls):
                    fn(i)
                times.append((time.perf_counter() - t0) * 1e6 / calls)
        return statistics.median(times)

    def row(self, fn, copies: int, **fields) -> dict:
        calls = copies * math.ceil(MIN_CALLS / copies)
        device_us, method = self.device_us(fn, calls)
        return {**fields, "device_us": device_us, "host_us": self.host_us(fn, calls), "method": method}


def copies_for(nbytes: float, limit: int) -> int:
    """How many distinct copies of an operand keep the rotated working set at ``ROTATE_BYTES``."""
    return max(1, min(limit, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


class Budget:
    """A wall-clock deadline; sections that start after it are recorded as skipped."""

    def __init__(self, seconds: float | None) -> None:
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def spent(self) -> bool:
        return self.left() <= 0


def recover_failed_capture(device, pool, stream=None) -> None:
    """Undo what a capture that failed leaves in torch, so the point runs eagerly and the grid goes on.

    ``CUDAGraph.capture_end`` stops the caching allocator's allocating to the graph's ``pool`` only after
    ``cudaStreamEndCapture`` succeeds, and a graph whose capture failed never releases its pool: the allocator then
    still counts a capture as underway, and the next ``torch.cuda.empty_cache()`` (each grid point's ``free``, each
    ``torch.cuda.graph``'s entry) fails an internal assert (``captures_underway.empty()``), so one failed capture
    would end the whole grid. This ends the allocation to ``pool`` and, only if that was still underway (the failed
    capture's own ``capture_begin`` then counted a use of the pool), releases that use once; a torch that already
    ended it is left alone. ``stream``: the stream to make current again (``torch.cuda.graph``'s exit skips
    restoring it when ``capture_end`` raises). CUDA only."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    end = getattr(torch._C, "_cuda_endAllocateToPool", None)
    release = getattr(torch._C, "_cuda_releasePool", None)
    pool = tuple(pool) if pool is not None else None
    if pool is not None and end is not None:
        try:
            end(index, pool)
        except RuntimeError:  # "not currently recording to mempool_id": nothing was left underway
            pass
        else:
            if release is not None:
                try:
                    release(index, pool)
                except RuntimeError:  # pragma: no cover - a pool torch already dropped
                    pass
    if stream is not None:
        torch.cuda.set_stream(stream)


def free(device) -> None:
    gc.collect()  # inside frozen_heap: only what the run made since, not every object of torch and transformers
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def frozen_heap():
    """Leave everything alive now (torch's and transformers' objects, a model built for the whole run) out of the
    collections inside: with transformers loaded, a full ``gc.collect()`` between points scans ~350k objects
    (0.2 s each time); inside, it scans what the points made. What is frozen is not garbage while inside
    (models and tensors are freed by reference count anyway); on exit it is collectable again."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


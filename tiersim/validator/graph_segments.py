"""The host strategies' step recorded as CUDA graphs cut at the host points, replayed with the host part between.

Why cut, and what it costs: :mod:`tiersim.validator.graph_host`. The segments share one memory pool and are
replayed in the order they were recorded (torch's condition for sharing a pool); tensors one segment leaves
for the next (the residual stream, the device part's partial attention) stay at the addresses recorded.
CUDA only; not yet run on a GPU (none lent): tests/test_graph_host.py holds it to the eager static step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tiersim.errors import TiersimError
from tiersim.validator.operators_timing import recover_failed_capture

if TYPE_CHECKING:  # pragma: no cover
    from tiersim.validator.graph_host import HostStep


class SegmentedCapture:
    """A :class:`HostStep` recorded as ``2L + 1`` CUDA graphs with the host part between them (CUDA only)."""

    def __init__(self, step: HostStep, warmup: int = 2) -> None:
        if not step.cuda or step.exact:
            raise TiersimError("a CUDA graph needs the static step on a CUDA device")
        self.step, device = step, step.buffers.device
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm up off the default stream, as torch's graph docs ask
            for _ in range(max(warmup, 1)):
                step.run()
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: list = []
        self.points: list = []  # after graphs[i]: a layer's host part (int) or the device part's end (None)
        self.event = torch.cuda.Event()
        self.warmup = max(warmup, 1)
        step.capture = self
        try:
            with torch.cuda.stream(stream):
                self._begin()
                self.logits = step.forward()  # recorded, not run: the counters did not move
                self.graphs[-1].capture_end()
        except BaseException:
            with torch.cuda.stream(stream):  # leave no stream capturing: the point runs eagerly next
                if torch.cuda.is_current_stream_capturing():
                    try:
                        self.graphs[-1].capture_end()
                    except RuntimeError:  # an invalidated capture still ends; its error is the first one
                        pass
            # the failed segment's allocation to the shared pool, which torch leaves underway
            # (operators_timing.recover_failed_capture says why)
            recover_failed_capture(device, self.pool)
            raise
        finally:
            step.capture = None
        torch.cuda.synchronize(device)

    def _begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool)
        self.graphs.append(graph)

    def cut(self, layer_idx: int | None) -> None:
        """End the segment being recorded and start the next (the step calls this at its host points)."""
        self.graphs[-1].capture_end()
        self.points.append(layer_idx)
        self._begin()

    def replay(self) -> torch.Tensor:
        step = self.step
        step.refresh()
        step.step_started()
        stream = torch.cuda.current_stream(step.buffers.device)
        last = len(self.points) // 2 - 1
        if step.fetches:
            step.fetch_share(0)
        self.graphs[0].replay()
        for i in range(0, len(self.points), 2):
            layer = self.points[i]
            self.event.record(stream)
            if step.fetches:
                if layer < last:
                    step.fetch_share(layer + 1)  # one layer ahead, on the side stream
                step.wait_share(layer)
            self.graphs[i + 1].replay()  # the device part, while the host works
            if step.copies:
                self.event.synchronize()  # the query is down
                step.host_part(layer)
            self.graphs[i + 2].replay()
        step.buffers.advanced()
        step.step_done()
        return self.logits

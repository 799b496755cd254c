"""Host attention and hybrid in the graph executor: the DDR tier attended where it lives, on CPU threads.

The cache's ``host-attention`` and ``hybrid`` (:mod:`tiersim.hierarchy.access`) split a layer's attention
into a device part (HBM, and for hybrid a fetched share of the DDR tier) and a host part (the DDR tokens
in host memory), merged exactly by log-sum-exp (:mod:`tiersim.hierarchy.split_attention`). This module
runs that split over the graph executor's static buffers (:class:`~tiersim.validator.graph_tiers.TierBuffers`),
with the same functions, never a second copy of the math:

* ``exact=True`` (eager): the layer's tiers are handed to the cache's own ``HostAttention.attend`` /
  ``Hybrid.attend`` through a view with the ``TieredLayer`` attributes it reads; only the order of tokens
  inside each part differs from ``TieredCache`` (the cache keeps one DDR chunk per demotion batch, with
  holes; the buffers keep one, holes refilled). Before the first re-tiering that moves a DDR token the
  layouts coincide and the step is bit-identical to ``TieredCache``; after it, float32 summation order
  only (bound and measurements: tests/test_graph_host.py, docs/validation/README.md).
* ``exact=False`` (static shapes, what a graph holds): the device part is ``partial_attention`` over the
  whole HBM buffer (plus, for hybrid, the share of the DDR buffer's capacity, packed contiguously in
  pinned memory whenever re-tiering changes it and copied H2D one layer ahead on a side stream, as the
  simulator's hybrid prices it; the cache copies it when the layer attends: same data, other timing),
  under the length mask; the query and the DDR columns of the mask go down to static (pinned) buffers,
  the host runs ``partial_attention`` over the DDR buffer on torch's CPU threads (eagerly on CUDA from a
  worker thread joined by an event; inline when the device is the CPU) and writes output, log-sum-exp
  and probabilities into static result buffers, which go up and are ``merge``d; the scores come from
  ``merged_probabilities`` (the cache's scatter).

Why the CUDA graph is cut per layer (:class:`~tiersim.validator.graph_segments.SegmentedCapture`): a
graph replays device work only, and the host part needs the layer's query, which exists only mid-step,
while its result is needed before the layer's output projection. torch exposes no host nodes (and a
host node could not run torch code anyway), so the step is captured as ``2L + 1`` graphs over one
memory pool: ``A_l`` (merge and the rest of layer l-1, layer l up to its query, the query's D2H) and
``D_l`` (the device part). Replay: ``A_l``, an event, hybrid's share of layer l+1 copied on the side
stream (plain async copies between graphs: a graph cannot leave a side stream unjoined), the compute
stream waits for layer l's share, ``D_l`` (launched: the GPU runs it while the host works), the CPU
waits for the event, runs the host part, then ``A_{l+1}``. Cost
per layer beyond prefetch's single graph: two graph launches (a few microseconds each), a D2H of the
query and an H2D of output + lse + probabilities, and the host part on the critical path: the GPU idles
for max(0, host - device part) per layer, which is this strategy's ``stall``. When the capture fails the
same step runs eagerly on CUDA, the host part on a worker thread joined by the same event (the point
says ``cuda-eager``). Neither CUDA path has run yet (no GPU lent): the tests marked ``cuda`` hold them
to the eager step when one is (on CPU, a stand-in for torch.cuda checks only the cuts and the replay order).

``copies=False`` is the same step without its host part and copies (stale result buffers, weight 0 on
the first step): its time is the GPU-busy time, and the difference to the full step is the stall.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch

from tiersim.errors import TiersimError
from tiersim.hierarchy.access import make_access
from tiersim.hierarchy.ddr import DDRChunk
from tiersim.hierarchy.split_attention import (
    Partial,
    Segment,
    allowed_columns,
    merge,
    merged_probabilities,
    partial_attention,
)
from tiersim.validator import graph_tiers
from tiersim.validator.graph import CapturedStep, GraphStep

HOST_STRATEGIES = graph_tiers.HOST_STRATEGIES  # one list: the buffers size themselves by it
STRATEGIES = ("prefetch", *HOST_STRATEGIES)


def check_executor_strategy(strategy: str) -> None:
    """Refuse, in one line, a strategy the graph executor does not run in any of its step classes (which
    class runs it is :func:`make_step`'s choice; the class checks it: ``graph.check_step_strategy``)."""
    if strategy not in STRATEGIES:
        raise TiersimError(f"--strategy {strategy}: the graph executor runs {', '.join(STRATEGIES)} "
                           "(selective picks DDR pages after the query is known: not built)")


HYBRID_SHARE = 0.5  # hybrid's fetched share when none is given


def strategy_options(strategy: str, fetch_share: float | None = None) -> dict | None:
    """TierConfig's ``strategy`` / ``fetch_share`` for a graph run (None: prefetch, the default config);
    refuses, in one line, what the executor does not run."""
    check_executor_strategy(strategy)
    if strategy != "hybrid":
        implied = 1.0 if strategy == "prefetch" else 0.0  # the share it fetches: a --fetch-share saying so is harmless
        if fetch_share is not None and fetch_share != implied:
            raise TiersimError(f"--fetch-share {fetch_share:g}: only hybrid takes a fetched share in the graph "
                               f"executor; --strategy {strategy} fetches {'all' if strategy == 'prefetch' else 'none'}")
        return None if strategy == "prefetch" else {"strategy": strategy}
    share = HYBRID_SHARE if fetch_share is None else float(fetch_share)
    if not 0.0 <= share <= 1.0:
        raise TiersimError(f"--fetch-share {share:g}: hybrid's fetched share must be in [0, 1]")
    return {"strategy": strategy, "fetch_share": share}


def point_strategy(options: dict | None) -> dict:
    """A point's ``strategy`` and ``fetch_share`` (the share of the DDR tier its step fetches) from the TierConfig
    options it runs with (:func:`strategy_options`; None: prefetch), as the file records them: a measured point by
    :func:`amend`, and one that failed or was skipped by the grid, so that it still says what it was to run."""
    opts = options or {}
    name = opts.get("strategy", "prefetch")
    return {"strategy": name, "fetch_share": graph_tiers.fetched_share(name, opts.get("fetch_share", 1.0))}


def refresh(*steps) -> None:
    """After a re-tiering: the host strategies re-pack what changed (timed with the re-tiering)."""
    for step in steps:
        if isinstance(step, HostStep):
            step.refresh()


def make_step(model, buffers, exact: bool = False, copies: bool = True) -> GraphStep:
    """The step for the buffers' strategy: prefetch's :class:`GraphStep` or this module's :class:`HostStep`."""
    strategy = buffers.config.strategy
    check_executor_strategy(strategy)
    cls = HostStep if strategy in HOST_STRATEGIES else GraphStep
    return cls(model, buffers, exact=exact, copies=copies)


def capture(step: GraphStep, warmup: int = 2):
    """The step recorded for replay: one graph (prefetch), or one per segment between host points
    (:class:`~tiersim.validator.graph_segments.SegmentedCapture`)."""
    if isinstance(step, HostStep) and step.offloaded:
        from tiersim.validator.graph_segments import SegmentedCapture

        return SegmentedCapture(step, warmup)
    return CapturedStep(step, warmup)


class _LayerView:
    """What ``HostAttention.attend`` reads of a ``TieredLayer``, over one layer of the static buffers."""

    residual_k = None

    def __init__(self, hbm, ddr_chunk: DDRChunk, n_keys: int, n_ddr: int, device) -> None:
        self._hbm, self.ddr, self.num_retained, self.num_ddr, self.device = hbm, [ddr_chunk], n_keys, n_ddr, device

    def device_tiers(self) -> list:
        return [(*self._hbm, None, None)]

    def note_buffer(self, size: int) -> None:
        """The cache's per-step buffer peak; the static buffers are sized once."""


class _HostState:
    """Static buffers the host part reads and writes (pinned on CUDA): query and mask down, results up."""

    def __init__(self, buffers, q_heads: int, n_host: int, q_dtype) -> None:
        b, d, pin = buffers.batch, buffers.head_dim, buffers.pinned
        self.q = torch.zeros((b, q_heads, 1, d), dtype=q_dtype, pin_memory=pin)
        self.mask = torch.zeros((b, 1, 1, n_host), dtype=torch.bool, pin_memory=pin)
        self.out = torch.zeros((b, q_heads, 1, d), dtype=torch.float32, pin_memory=pin)
        self.lse = torch.full((b, q_heads, 1), float("-inf"), dtype=torch.float32, pin_memory=pin)
        self.probs = torch.zeros((b, q_heads, 1, n_host), dtype=torch.float32, pin_memory=pin)
        self.scaling = 1.0
        self.scored = False


class HostStep(GraphStep):
    """The decode step with the DDR tier attended on the host (``host-attention``, ``hybrid``); see the module."""

    STRATEGIES = HOST_STRATEGIES

    def __init__(self, model, buffers, exact: bool = False, copies: bool = True) -> None:
        config = buffers.config
        if not config.is_lossless:  # the device part attends the HBM tier only: a compressed tier would be lost
            raise TiersimError(f"--strategy {config.strategy}: the graph executor's host strategies run lossless "
                               f"splits only (compressed = evict = 0); got compressed={config.compressed}, "
                               f"evict={config.evict}")
        super().__init__(model, buffers, exact=exact, copies=copies)
        self.access = make_access(config.strategy, config.fetch_share)  # the cache's own strategy object
        self.hybrid = config.strategy == "hybrid"
        self.n_fetch = buffers.n_stage  # static: the device fetches [cut:], the host takes [:cut]
        self.cut = buffers.cap_ddr - self.n_fetch
        self.capture = None  # a SegmentedCapture while it records
        self.host_times: list[float] = []  # ms of host attention per step (summed over layers)
        self._host_ms = 0.0
        self._state: _HostState | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiersim-graph-host")
        self._ready = torch.cuda.Event() if self.cuda else None
        self._version = None
        self._share = None
        if self.hybrid and self.n_fetch and copies and not exact:  # the copy-free step reads stale staging
            shape = (buffers.batch, buffers.kv_heads, self.n_fetch, buffers.head_dim)
            self._share = [[torch.zeros(shape, dtype=buffers.dtype, pin_memory=buffers.pinned) for _ in range(2)]
                           for _ in buffers.layers]
        self.refresh()

    # -- bytes per step --------------------------------------------------------------------------
    def traffic(self) -> dict:
        """Bytes one step moves per direction in the static shape (the link's work, as the cache counts it)."""
        buf = self.buffers
        if not self.offloaded:
            return {"h2d": 0, "d2h": 0, "fetched": 0, "staging": 0}
        q_heads = self.model.config.num_attention_heads
        item = torch.empty((), dtype=buf.dtype).element_size()
        rows = buf.batch * q_heads
        down = rows * buf.head_dim * item + buf.batch * self.cut  # query + mask columns
        up = rows * (buf.head_dim + 1 + (self.cut if self.scoring else 0)) * 4  # output, lse, probabilities
        fetched = self.n_fetch * buf.token_bytes
        layers = len(buf.layers)
        return {"h2d": layers * (up + fetched), "d2h": layers * down, "fetched": layers * fetched,
                "staging": 2 * fetched}

    def refresh(self) -> None:
        """Pack each layer's hybrid share contiguously (pinned) when re-tiering changed the DDR tier:
        only a contiguous host region copies H2D as one DMA, and only that a graph can hold."""
        version = (self.buffers.retiers, self.buffers.bytes_d2h)
        if self._share is None or version == self._version:
            return
        for lt, (k, v) in zip(self.buffers.layers, self._share):
            k.copy_(lt.ddr_k[:, :, self.cut :])
            v.copy_(lt.ddr_v[:, :, self.cut :])
        self._version = version

    # -- the step --------------------------------------------------------------------------------
    def run(self) -> torch.Tensor:
        self.refresh()
        self.step_started()
        logits = super().run()
        self.step_done()
        return logits

    def step_started(self) -> None:
        self._host_ms = 0.0

    def step_done(self) -> None:
        """Record the step's host time (the host parts of every layer, summed)."""
        self.host_times.append(self._host_ms)

    def _split(self, layer_idx: int) -> bool:
        return self.offloaded and not (self.exact and self.buffers.layers[layer_idx].n_ddr == 0)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if not self._split(layer_idx):  # nothing on the host: the prefetch step's own path (stock attention)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        lt = self.append(key_states, value_states, layer_idx)
        return lt.hbm_k, lt.hbm_v  # not read: attend_split computes the output from every tier

    @property
    def fetches(self) -> bool:
        """Whether the step copies a hybrid share H2D (host attention and the copy-free step do not)."""
        return self._share is not None

    def _prefetch(self, layer_idx: int) -> None:
        """Hybrid's share of layer ``layer_idx`` into staging ``layer_idx % 2``, one layer ahead on the side
        stream (as the simulator's hybrid prices its fetched part); host attention fetches nothing. While a
        graph records, nothing: the segmented replay issues these copies between its graphs."""
        if self._share is None or self.capture is not None:
            return
        staged = self._staged(layer_idx)
        if not self.cuda:
            for dst, src in zip(staged, self._share[layer_idx]):
                dst.copy_(src)
            return
        # The staging buffer was last read two layers ago, on the compute stream: start after it.
        self.side.wait_stream(torch.cuda.current_stream(self.buffers.device))
        with torch.cuda.stream(self.side):
            for dst, src in zip(staged, self._share[layer_idx]):
                dst.copy_(src, non_blocking=True)
            self.events[layer_idx].record(self.side)

    def fetch_share(self, layer_idx: int) -> None:
        """Start layer ``layer_idx``'s share copy (the segmented replay, between graphs)."""
        self._prefetch(layer_idx)

    def wait_share(self, layer_idx: int) -> None:
        """The compute stream waits for layer ``layer_idx``'s share (before its device part)."""
        self._wait(layer_idx)

    def attend_split(self, layer_idx: int, query: torch.Tensor, attention_mask, scaling: float, n_queries: int):
        if not self._split(layer_idx):
            return super().attend_split(layer_idx, query, attention_mask, scaling, n_queries)
        if self.exact:
            return self._attend_exact(layer_idx, query, attention_mask, scaling, n_queries)
        return self._attend_static(layer_idx, query, attention_mask, scaling, n_queries)

    def _attend_exact(self, layer_idx, query, attention_mask, scaling, n_queries):
        """The cache's own ``attend`` over the tokens held (as ``TieredCache.attend_split`` calls it)."""
        buf, lt = self.buffers, self.buffers.layers[layer_idx]
        n_h, n_d = lt.n_hbm + 1, lt.n_ddr
        chunk = DDRChunk(lt.ddr_k[:, :, :n_d], lt.ddr_v[:, :, :n_d],
                         torch.ones((buf.batch, n_d), dtype=torch.bool, device=buf.device), lt.ddr_slots[:, :n_d])
        view = _LayerView((lt.hbm_k[:, :, :n_h], lt.hbm_v[:, :, :n_h], lt.hbm_slots[:, :n_h]), chunk,
                          buf.n_seen + 1, n_d, buf.device)
        started = time.perf_counter()
        output, probs = self.access.attend(view, query, attention_mask, scaling, n_queries)
        self._host_ms += (time.perf_counter() - started) * 1e3  # the whole split attention (host part inside)
        if n_queries:
            self.observe_attention(layer_idx, probs)
        return output

    def _attend_static(self, layer_idx, query, mask, scaling, n_probs):
        buf, lt = self.buffers, self.buffers.layers[layer_idx]
        q_len, n_keys = query.shape[2], buf.cap_tokens + 1
        if self._state is None:
            self._state = _HostState(buf, query.shape[1], self.cut, query.dtype)
        st = self._state
        st.scaling, st.scored = scaling, bool(n_probs)
        host_slots = lt.ddr_slots[:, : self.cut]
        job = self._send(layer_idx, query, allowed_columns(mask, host_slots, None, q_len, n_keys))
        if self.capture is not None:
            self.capture.cut(layer_idx)  # replay: the host part of this layer runs after this segment
        segments = [Segment(lt.hbm_k, lt.hbm_v, allowed_columns(mask, lt.hbm_slots, None, q_len, n_keys))]
        slots = [(lt.hbm_slots, None)]
        if self.n_fetch:
            if self.fetches and self.capture is None:
                if layer_idx + 1 < len(self.decoders):
                    self._prefetch(layer_idx + 1)  # while this layer attends (layer 0: at the step's start)
                self._wait(layer_idx)
            stage_k, stage_v = self._staged(layer_idx)  # the copy-free step: stale
            fetched_slots = lt.ddr_slots[:, self.cut :]
            segments.append(Segment(stage_k, stage_v, allowed_columns(mask, fetched_slots, None, q_len, n_keys)))
            slots.append((fetched_slots, None))
        device = partial_attention(query, segments, scaling, n_probs)
        if self.capture is not None:
            self.capture.cut(None)
        host = self._receive(job, query.device)
        parts = [device, host]
        out, _, weights = merge(parts)
        output = out.to(query.dtype).transpose(1, 2).contiguous()
        if n_probs:
            probs = merged_probabilities(parts, [slots, [(host_slots, None)]], weights, q_len, n_probs, n_keys)
            self.observe_attention(layer_idx, probs)
        return output

    # -- the host part and its copies -----------------------------------------------------------
    def _staged(self, layer_idx: int):
        """Staging buffer ``layer_idx % 2``: sized for the share (``TierBuffers.n_stage``), contiguous (one DMA each)."""
        return self.buffers.staging[layer_idx % 2]

    def _send(self, layer_idx: int, query, host_mask):
        """Query and the DDR columns of the mask into the static host buffers; eagerly, start the host part
        (on CUDA it waits for the copies by an event). Returns the host part's future (None: none started)."""
        st = self._state
        if not self.copies:
            return None
        st.q.copy_(query, non_blocking=self.cuda)
        if host_mask is None:
            st.mask.fill_(True)
        else:
            st.mask.copy_(host_mask.expand(st.mask.shape), non_blocking=self.cuda)
        if self.capture is not None:
            return None  # the replay runs the host part between the graphs
        if not self.cuda:
            # The CPU is the device too: a second Python thread would only contend for the GIL with the device
            # part's many small ops (measured: hybrid's tiny step 2 ms inline, 6-8 ms with a thread).
            self.host_part(layer_idx)
            return None
        self._ready.record(torch.cuda.current_stream(self.buffers.device))
        return self._pool.submit(self._host_thread, layer_idx, torch.is_inference_mode_enabled())

    def _host_thread(self, layer_idx: int, inference: bool) -> None:
        self._ready.synchronize()  # the query and mask are down
        with torch.inference_mode(inference):
            self.host_part(layer_idx)

    def host_part(self, layer_idx: int) -> None:
        """Attention over the layer's DDR buffer (up to the hybrid cut) on CPU threads, into the result buffers."""
        st, lt = self._state, self.buffers.layers[layer_idx]
        started = time.perf_counter()
        part = partial_attention(st.q, [Segment(lt.ddr_k[:, :, : self.cut], lt.ddr_v[:, :, : self.cut], st.mask)],
                                 st.scaling, 1 if st.scored else 0)
        st.out.copy_(part.out)
        st.lse.copy_(part.lse)
        if st.scored:
            st.probs.copy_(part.probs[0])
        self._host_ms += (time.perf_counter() - started) * 1e3

    def _receive(self, job, device) -> Partial:
        """The host part's result on the device: its static buffers, copied up on CUDA."""
        if job is not None:
            job.result()
        st = self._state

        def up(t):
            return t.to(device, non_blocking=True) if self.cuda else t

        return Partial(up(st.out), up(st.lse), [up(st.probs)] if st.scored else None)


def amend(point: dict, step: GraphStep, copy_ms: float | None) -> dict:
    """A point's measurement (graph_run.measure_point) corrected for a host strategy's traffic, with its
    host time; unchanged for prefetch."""
    if not isinstance(step, HostStep):
        return {**point, **point_strategy(None), "host_ms": None}
    traffic = step.traffic()
    buf = step.buffers
    host = sorted(step.host_times[-point["steps"]:]) if step.host_times else []
    fetched = traffic["fetched"]
    point = {**point, **point_strategy({"strategy": buf.config.strategy, "fetch_share": buf.config.fetch_share}),
             "h2d_bytes": traffic["h2d"], "d2h_bytes": point["d2h_bytes"] + traffic["d2h"],
             "prefetch_gbps": fetched / copy_ms / 1e6 if fetched and copy_ms else None,
             "h2d_gbps_in_step": traffic["h2d"] / point["step_ms"] / 1e6 if traffic["h2d"] else None,
             "host_ms": host[len(host) // 2] if host and step.offloaded else None}
    point["tier_bytes"] = {**point["tier_bytes"], "staging": traffic["staging"]}
    return point

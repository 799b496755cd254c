"""How the DDR tier reaches attention: one small interface, one implementation per strategy.

A :class:`~tiersim.hierarchy.layer.TieredLayer` owns its tiers; a ``DDRAccess`` decides how the DDR tokens
take part in its attention: ``attention_inputs`` (in ``update``), ``prefetch`` (one layer ahead), ``attend``
(strategies that attend where the tokens live). ``prefetch``/``fetch`` are public for the validator's timing.

* ``prefetch``: the whole DDR tier is copied to the device (staging buffers, side stream on CUDA)
  and the layer is reassembled in token order; attention is stock SDPA, bit-identical to
  ``DynamicCache``.
* ``hybrid``: a share of the DDR tokens is copied to the device and joins its part, the rest is
  attended on the host, merged the same way.
* ``selective`` (approximate): a per-page key-bound predictor picks the DDR pages fetched once the
  query is known; the rest is hidden from attention.
* ``host-attention``: attention over the DDR tokens runs on the host (a worker thread over the
  host tensors) while the device part (HBM, compressed) runs in parallel; the two partial outputs
  are merged with their log-sum-exp (:mod:`tiersim.hierarchy.split_attention`). Exact up to float32
  rounding inside each part (per dtype: docs/quality.md); reassembled only to re-tier (promotions).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from tiersim.errors import ConfigError
from tiersim.hierarchy import ddr, pages
from tiersim.hierarchy.config import STRATEGIES
from tiersim.hierarchy.masks import allowed_keys
from tiersim.hierarchy.split_attention import Segment, allowed_columns, merge, merged_probabilities, partial_attention


class DDRAccess:
    """The interface: how one layer's DDR tier reaches its attention."""

    name = ""
    host_attention = False  # True: the "tiersim" attention must call ``attend``
    complete_view = True  # attention_inputs hold every retained token (re-tiering may reuse them)

    def __init__(self) -> None:
        self.bytes_h2d = 0
        self.bytes_d2h = 0
        self.fetched_tokens = 0  # DDR tokens that reached attention on the device, and of how many
        self.ddr_tokens = 0

    def __getstate__(self) -> dict:
        """Copies (deepcopy, pickle) leave out the CUDA stream: a copy makes its own on first use."""
        state = dict(self.__dict__)
        if "stream" in state:
            state["stream"] = None
        return state

    @property
    def fetched_share(self) -> float | None:
        """Share of the DDR tier's tokens fetched to the device for attention (None: no DDR step yet)."""
        return self.fetched_tokens / self.ddr_tokens if self.ddr_tokens else None

    def prepare(self, layer, query: torch.Tensor, attention_mask):
        """Once the query is known: fetch what is still missing, return the mask attention uses."""
        return attention_mask

    def attention_inputs(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values ``update`` hands the model's attention for this layer."""
        raise NotImplementedError

    def prefetch(self, layer) -> None:
        """Start moving the layer's DDR tier toward its attention (called one layer ahead)."""

    def fetch(self, layer) -> list:
        """Device copies (keys, values) of the layer's DDR chunks, once they are there."""
        return [(c.keys.to(layer.device), c.values.to(layer.device)) for c in layer.ddr]

    def full_view(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole layer in token order, for re-tiering (promotions need the DDR tokens on the device)."""
        return layer.assemble(self.fetch(layer))

    def fetched_this_step(self, layer) -> int | None:
        """DDR tokens (batch row 0) the layer's attention saw this step, for a strategy that chooses
        which DDR tokens to fetch (the step record's ``ddr_fetched``); None: it does not choose."""
        return None


class Prefetch(DDRAccess):
    """Copy the whole DDR tier to the device one layer ahead; reassemble the layer in token order."""

    name = "prefetch"

    def __init__(self) -> None:
        super().__init__()
        self.stream = None
        self.staging: list[list[torch.Tensor] | None] = [None, None]

    def attention_inputs(self, layer):
        staged = self.fetch(layer)
        # Every step the DDR tier crosses the link once (on CPU this counts what a GPU would move).
        self.bytes_h2d += sum(c.nbytes for c in layer.ddr)
        if layer.ddr:
            n = layer.num_ddr
            self.fetched_tokens += n
            self.ddr_tokens += n
        return layer.assemble(staged)

    def fetch(self, layer) -> list:
        if not layer.ddr:
            return []
        if layer.device.type != "cuda":
            return [(c.keys, c.values) for c in layer.ddr]
        if layer.staged is None:  # first use or after a re-tier: nothing was prefetched
            self.prefetch(layer)
        torch.cuda.current_stream(layer.device).wait_event(layer.prefetch_event)
        staged, layer.staged = layer.staged, None
        return staged

    def full_view(self, layer):
        raise AssertionError("prefetch re-tiers from the view attention saw")  # pragma: no cover

    def prefetch(self, layer) -> None:
        """Copy the layer's DDR chunks into staging buffer ``layer.index % 2`` on the side stream."""
        if layer.device.type != "cuda" or not layer.ddr:
            return
        device = layer.device
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=device)
        stream = self.stream
        # The staging buffer was last read by the layer before last; the new DDR chunk may still be
        # on its way down on the compute stream: wait for both.
        stream.wait_stream(torch.cuda.current_stream(device))
        # Flat buffers: each chunk lands in one contiguous region (one DMA per tensor, no
        # strided copy), and the buffer grows by 25% headroom when the tier outgrows it.
        need = sum(c.keys.numel() for c in layer.ddr)
        slot = layer.index % 2
        buffers = self.staging[slot]
        if buffers is None or buffers[0].numel() < need or buffers[0].dtype != layer.dtype:
            capacity = int(need * 1.25) + 1
            buffers = [torch.empty(capacity, dtype=layer.dtype, device=device) for _ in range(2)]
            for buffer in buffers:
                buffer.record_stream(stream)  # written on the side stream, read on the compute stream
            self.staging[slot] = buffers
        staged, offset = [], 0
        with torch.cuda.stream(stream):
            for chunk in layer.ddr:
                n = chunk.keys.numel()
                sk = buffers[0][offset : offset + n].view(chunk.keys.shape)
                sv = buffers[1][offset : offset + n].view(chunk.values.shape)
                sk.copy_(chunk.keys, non_blocking=True)
                sv.copy_(chunk.values, non_blocking=True)
                staged.append((sk, sv))
                offset += n
            event = torch.cuda.Event()
            event.record(stream)
        layer.staged, layer.prefetch_event = staged, event


class HostAttention(DDRAccess):
    """Attend to the DDR tier where it lives (host threads) in parallel with the device part; merge by lse."""

    name = "host-attention"
    host_attention = True

    def __init__(self) -> None:
        super().__init__()
        self.stream = None
        self._start_workers()

    def _start_workers(self) -> None:
        # No shutdown call: the cache has no end (a later generate may continue it); an executor's
        # idle worker exits once the executor is garbage collected with the cache.
        self._host = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiersim-host")
        self._device = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiersim-device")

    def __getstate__(self) -> dict:
        """Worker threads cannot be copied or pickled: a copy (deepcopy, pickle) starts its own."""
        return {k: v for k, v in super().__getstate__().items() if k not in ("_host", "_device")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._start_workers()

    def attention_inputs(self, layer):
        if not layer.ddr:
            # Nothing to attend to on the host: the stock attention runs, over every device tier.
            return layer.assemble([])
        # The model's attention does not read these (``attend`` reads every tier from ``device_tiers``).
        return layer.hbm_k, layer.hbm_v

    def attend(self, layer, query: torch.Tensor, attention_mask, scaling: float, n_probs: int):
        """Attention output [B, q, Hq, D] (query dtype) and, when ``n_probs``, the float32 probabilities
        of the last ``n_probs`` queries over the retained tokens in order [B, Hq, n, N]."""
        q_len, n_keys = query.shape[2], layer.num_retained
        fetched, host_items = self.split(layer)
        dev_segs, dev_slots = [], []
        device_tiers = [tier[:4] for tier in layer.device_tiers()]
        # Dequantized compressed tokens and fetched DDR copies exist on the device for this step only.
        layer.note_buffer(sum(2 * _nbytes(k) for k, *_ in device_tiers[1:] + fetched if k is not layer.residual_k))
        for keys, values, slots, valid in device_tiers + fetched:
            dev_segs.append(Segment(keys, values, allowed_columns(attention_mask, slots, valid, q_len, n_keys)))
            dev_slots.append((slots, valid))
        live = layer.num_ddr
        self.ddr_tokens += live
        self.fetched_tokens += sum(int(v[0].sum()) for _, _, _, v in fetched)
        if not host_items:  # everything came to the device (hybrid with a share of 1)
            parts, slots_of = [partial_attention(query, dev_segs, scaling, n_probs)], [dev_slots]
        else:
            dev, host = self._both_parts(query, dev_segs, host_items, attention_mask, scaling, n_probs, n_keys)
            parts, slots_of = [dev, host], [dev_slots, [(slot, valid) for _, _, slot, valid, _ in host_items]]
        out, _, weights = merge(parts)
        output = out.to(query.dtype).transpose(1, 2).contiguous()
        if not n_probs:
            return output, None
        return output, merged_probabilities(parts, slots_of, weights, q_len, n_probs, n_keys)

    def split(self, layer):
        """(device copies of DDR tokens attended on the device as (keys, values, slot, valid),
        host tokens as (keys, values, slot, valid, ready)): here every DDR token stays on the host."""
        return [], [(c.keys, c.values, c.slot, c.valid, c.ready) for c in layer.ddr]

    def _both_parts(self, query, dev_segs, host_items, attention_mask, scaling, n_probs, n_keys):
        """The device and host partial attentions, computed in parallel worker threads."""
        q_len = query.shape[2]
        host_masks = [allowed_columns(attention_mask, slot, valid, q_len, n_keys)
                      for _, _, slot, valid, _ in host_items]
        cuda = query.device.type == "cuda"
        q_host, masks_host, ready = self._to_host(query, host_masks) if cuda else (query.clone(), host_masks, None)

        def host_part():
            if ready is not None:
                ready.synchronize()
            for *_, written in host_items:
                if written is not None:
                    written.synchronize()
            segs = [Segment(k, v, m) for (k, v, _, _, _), m in zip(host_items, masks_host)]
            return partial_attention(q_host, segs, scaling, n_probs)

        host_future = self._host.submit(host_part)
        if cuda:  # the device's kernels stay on the compute stream of this thread
            dev = partial_attention(query, dev_segs, scaling, n_probs)
        else:
            dev = self._device.submit(partial_attention, query, dev_segs, scaling, n_probs).result()
        host = host_future.result()
        self.bytes_d2h += _nbytes(q_host) + sum(_nbytes(m) for m in masks_host if m is not None)
        if cuda:
            host = self._to_device(host, query.device)
        self.bytes_h2d += _nbytes(host.out) + _nbytes(host.lse) + sum(_nbytes(p) for p in host.probs or [])
        return dev, host

    def _to_host(self, query, masks):
        """Query and masks down to pinned host memory on the side stream (:func:`ddr.pinned_down`)."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=query.device)
        return ddr.pinned_down(self.stream, query, masks)

    @staticmethod
    def _to_device(part, device):
        def up(t):
            return t.pin_memory().to(device, non_blocking=True)

        return type(part)(up(part.out), up(part.lse), [up(p) for p in part.probs] if part.probs else part.probs)


class Hybrid(HostAttention):
    """Part of each DDR chunk copied to the device and attended there, the rest attended on the host.

    ``share`` (``TierConfig.fetch_share``) of every chunk's stored tokens (its newest columns) joins the
    device part; the simulator picks the share that makes both parts finish together
    (:func:`tiersim.simulator.strategies.step_times`, ``hybrid``). Exact up to rounding, like
    ``host-attention``. The device share is copied when the layer attends (not one layer ahead).
    """

    name = "hybrid"

    def __init__(self, share: float) -> None:
        super().__init__()
        self.share = share

    def split(self, layer):
        fetched, host = [], []
        for c in layer.ddr:
            m = c.keys.shape[2]
            cut = m - round(self.share * m)
            if cut < m:
                if c.ready is not None:
                    c.ready.synchronize()
                keys = c.keys[:, :, cut:].to(layer.device, non_blocking=True)
                values = c.values[:, :, cut:].to(layer.device, non_blocking=True)
                self.bytes_h2d += _nbytes(keys) + _nbytes(values)
                fetched.append((keys, values, c.slot[:, cut:], c.valid[:, cut:]))
            if cut > 0:
                host.append((c.keys[:, :, :cut], c.values[:, :, :cut], c.slot[:, :cut], c.valid[:, :cut], c.ready))
        return fetched, host


class Selective(Prefetch):
    """Fetch only the DDR pages a predictor says matter (approximate); the rest is hidden from attention.

    The predictor keeps, on the device, each page's per-channel key minimum and maximum (``PAGE``
    stored tokens of a chunk per page, computed once when the chunk is written). For a query q the
    largest logit any key of the page can give is at most ``sum_d max(q_d * min_d, q_d * max_d)``
    (over the page's KV heads and the query heads that share them); each batch row fetches the
    pages with the largest bound until they hold ``share`` of its DDR tokens (at least one page),
    after the query is known, and the mask hides
    every DDR token it did not fetch. With ``share = 1.0`` it is ``prefetch`` exactly (same code path).
    Unfetched tokens get no attention probability, so they gain no score while they stay unfetched.
    """

    name = "selective"
    PAGE = pages.PAGE

    def __init__(self, share: float) -> None:
        super().__init__()
        self.share = share
        self.complete_view = share >= 1.0
        self.buffers: dict[int, tuple] = {}
        self.fetched_last: dict[int, int] = {}  # per layer, this step (batch row 0)

    def attention_inputs(self, layer):
        if self.share >= 1.0:
            return super().attention_inputs(layer)
        keys, values = layer.assemble([])  # the device tiers at their slots; the DDR slots come in prepare
        if layer.ddr:
            for chunk in layer.ddr:  # unfetched slots must hold finite values (weight 0 times garbage)
                chunk.index.clear(keys, values)
            self.buffers[layer.index] = (keys, values)
        return keys, values

    def prefetch(self, layer) -> None:
        if self.share >= 1.0:
            super().prefetch(layer)

    def fetched_this_step(self, layer) -> int | None:
        return self.fetched_last.pop(layer.index, layer.num_ddr)

    def full_view(self, layer):
        return layer.assemble([(c.keys.to(layer.device), c.values.to(layer.device)) for c in layer.ddr])

    def prepare(self, layer, query, attention_mask):
        if self.share >= 1.0:
            self.fetched_last[layer.index] = layer.num_ddr
            return attention_mask
        keys, values = self.buffers.pop(layer.index)
        batch, q_len, n_keys = query.shape[0], query.shape[2], layer.num_retained
        bounds = [pages.page_bounds(c, layer.device, self.PAGE) for c in layer.ddr]
        scores = torch.cat([pages.upper_bound(query, lo, hi) for lo, hi in bounds], dim=1)  # [B, pages]
        live = torch.cat([pages.live_per_page(c, lo.shape[2], self.PAGE) for c, (lo, _) in zip(layer.ddr, bounds)],
                         dim=1)
        chosen = pages.choose(scores, live, self.share)
        allowed = allowed_keys(attention_mask, batch, q_len, n_keys, device=query.device)
        if allowed is None:  # one query, no mask: it sees every key until the unfetched ones are hidden
            allowed = torch.ones((batch, 1, q_len, n_keys), dtype=torch.bool, device=query.device)
        else:
            allowed = allowed.clone()  # written below (an expanded view may share one row)
        start, fetched_row0, live_row0 = 0, 0, 0
        for chunk, (lo, _) in zip(layer.ddr, bounds):
            n_pages = lo.shape[2]
            page_of = torch.arange(chunk.keys.shape[2], device=query.device) // self.PAGE
            picked = chosen[:, start : start + n_pages][:, page_of] & chunk.valid
            start += n_pages
            rows, cols = torch.nonzero(picked, as_tuple=True)
            if rows.numel():
                slots = chunk.slot[rows, cols]
                hr, hc = rows.to(chunk.keys.device), cols.to(chunk.keys.device)
                keys[rows, :, slots] = chunk.keys[hr, :, hc].to(keys.device)
                values[rows, :, slots] = chunk.values[hr, :, hc].to(values.device)
                self.bytes_h2d += 2 * rows.numel() * chunk.keys.shape[1] * chunk.keys.shape[3] * keys.element_size()
            hidden_rows, hidden_cols = torch.nonzero(chunk.valid & ~picked, as_tuple=True)
            if hidden_rows.numel():
                allowed[hidden_rows, :, :, chunk.slot[hidden_rows, hidden_cols]] = False
            fetched_row0 += int(picked[0].sum())
            live_row0 += int(chunk.valid[0].sum())
        self.fetched_tokens += fetched_row0
        self.ddr_tokens += live_row0
        self.fetched_last[layer.index] = fetched_row0
        return allowed


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def make_access(strategy: str, fetch_share: float = 1.0) -> DDRAccess:
    """The DDRAccess that runs ``strategy``: a lookup in the strategy registry (tiersim.hierarchy.strategies)."""
    from tiersim.hierarchy.strategies import REGISTRY

    spec = REGISTRY.get(strategy)
    if spec is None or spec.access is None:
        raise ConfigError(f"the cache runs strategies {', '.join(STRATEGIES)}; got {strategy!r}")
    cls = globals()[spec.access]
    return cls(fetch_share) if spec.takes_share else cls()

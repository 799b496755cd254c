"""Timing decode steps of a model with the TieredCache at one (batch, context, HBM ratio) point.

Each point builds a fresh cache, fills it with ``context`` tokens, runs a few warm-up decode
steps (the first one pays the prefetch that the prefill's re-tiering left cold) and then times
``steps`` decode steps with CUDA events; the median is the headline. On CUDA a few more probe
steps follow, in which the :class:`InstrumentedCache` also times its own prefetch copies on the
side stream (achieved H2D bandwidth) and how long the compute stream waits for them (the stall).
"""

from __future__ import annotations

import gc

import torch

from tiersim.compat import cache_kwargs
from tiersim.hierarchy import scoring
from tiersim.hierarchy.access import Prefetch
from tiersim.hierarchy.cache import TieredCache
from tiersim.hierarchy.config import TierConfig
from tiersim.hierarchy.support import head_dim_of
from tiersim.validator.sdpa import sdpa_backends
from tiersim.validator.timing import Stopwatch, summarize

PREFILLS = ("synthetic", "model")


class TimedPrefetch(Prefetch):
    """The ``prefetch`` strategy, recording CUDA events around its public ``prefetch`` (the copies on
    the side stream) and ``fetch`` (the compute stream's wait for them) without changing what they do."""

    def __init__(self, owner: InstrumentedCache) -> None:
        super().__init__()
        self.owner = owner

    def _recording(self, layer) -> bool:
        return self.owner.step_index >= 0 and layer.device.type == "cuda"

    def fetch(self, layer):
        if not (layer.ddr and self._recording(layer)):
            return super().fetch(layer)
        stream = torch.cuda.current_stream(layer.device)
        start = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        staged = super().fetch(layer)
        end = torch.cuda.Event(enable_timing=True)
        end.record(stream)
        self.owner.waits.append((self.owner.step_index, start, end))
        return staged

    def prefetch(self, layer) -> None:
        if not (layer.ddr and self._recording(layer)):
            return super().prefetch(layer)
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=layer.device)
        # Start the clock when the copies may start (``prefetch`` makes the stream wait the same way).
        self.stream.wait_stream(torch.cuda.current_stream(layer.device))
        start = torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        super().prefetch(layer)
        end = torch.cuda.Event(enable_timing=True)
        end.record(self.stream)
        self.owner.copies.append((self.owner.step_index, start, end, sum(c.nbytes for c in layer.ddr)))


class InstrumentedCache(TieredCache):
    """A TieredCache whose ``prefetch`` strategy records CUDA events around its copies and the waits
    for them (:class:`TimedPrefetch`, the strategy's public interface); recording is on only while
    ``step_index >= 0``. Other strategies run untimed (their steps are still timed as a whole).
    """

    def __init__(self, config: TierConfig) -> None:
        super().__init__(config)
        self.step_index = -1
        self.copies: list[tuple] = []  # (step, start event, end event, bytes)
        self.waits: list[tuple] = []  # (step, start event, end event)
        if type(self.access) is Prefetch:
            self.access = TimedPrefetch(self)


def tier_config(hbm: float, **policy) -> TierConfig:
    """Lossless offloading: what leaves HBM goes to DDR (nothing compressed, nothing evicted)."""
    return TierConfig(hbm=hbm, ddr=1.0 - hbm, **policy)


def synthetic_kv(model_config, batch: int, context: int, generator: torch.Generator, device, dtype):
    """Random K/V [B, Hkv, context, D] for one layer (keys first, then values, from ``generator``)."""
    shape = (batch, model_config.num_key_value_heads, context, head_dim_of(model_config))
    keys = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return keys, torch.randn(shape, generator=generator, device=device, dtype=dtype)


def synthetic_probs(batch: int, heads: int, n_queries: int, context: int, generator: torch.Generator,
                    device) -> torch.Tensor:
    """Causal attention rows [B, Hq, n_queries, context] of the prompt's last queries, peaked like trained
    attention (so the ranking is not a tie)."""
    logits = torch.randn((batch, heads, n_queries, context), generator=generator, device=device)
    logits.mul_(3.0)
    rows = torch.arange(context - n_queries, context, device=device)[:, None]
    logits.masked_fill_(torch.arange(context, device=device)[None, :] > rows, float("-inf"))
    return torch.softmax(logits, dim=-1)


def synthetic_prefill(model, cache: TieredCache, batch: int, context: int, generator: torch.Generator) -> None:
    """Fill every layer with ``context`` random K/V and random causal attention rows, without a forward.

    Decode cost depends on the cache's sizes, not on where its values came from, and this costs
    no prefill compute or activation memory (a 32 x 8K prefill of a 7B model would need tens of
    GB of MLP activations). The cache receives exactly what a prefill would hand it: K/V per
    layer through ``update`` and the prompt's attention probabilities through ``observe_attention``.
    The graph executor (``tiersim.validator.graph_run``) draws the same inputs in the same order.
    """
    cfg = model.config
    for layer_idx in range(cfg.num_hidden_layers):
        keys, values = synthetic_kv(cfg, batch, context, generator, model.device, model.dtype)
        cache.update(keys, values, layer_idx)
        n_queries = cache.queries_to_score(layer_idx, context)
        if n_queries:
            probs = synthetic_probs(batch, cfg.num_attention_heads, n_queries, context, generator, model.device)
            cache.observe_attention(layer_idx, probs)
    scoring.clear_listener()


def model_prefill(model, cache: TieredCache, batch: int, context: int, generator: torch.Generator) -> None:
    """A real prefill forward of ``context`` random tokens (one forward: small shapes only)."""
    ids = torch.randint(model.config.vocab_size, (batch, context), generator=generator, device=model.device)
    model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    scoring.clear_listener()


def run_point(
    model,
    batch: int,
    context: int,
    hbm: float,
    steps: int = 24,
    warmup: int = 4,
    prefill: str = "synthetic",
    seed: int = 0,
    policy: dict | None = None,
    probe_steps: int | None = None,
    sdpa: str = "no-cudnn",
) -> dict:
    """Time ``steps`` decode steps after ``warmup``; returns step-time statistics, stall and bytes moved.

    The timed steps run uninstrumented: recording events around every layer's prefetch costs host
    time, which a launch-bound step would show as overhead. ``probe_steps`` further steps (CUDA
    only, default ``min(8, steps)``) record the prefetch copies and waits for ``stall_ms`` and
    ``prefetch_gbps``. ``sdpa`` (tiersim.validator.sdpa): ``no-cudnn`` by default, because cuDNN
    attention builds a plan for every new KV length, a host cost of whichever configuration first
    decodes at a given length (it made HBM 0.5 look 38% faster than HBM 1.0 on the first H100 run).
    """
    device = model.device
    config = tier_config(hbm, **(policy or {}))
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    watch = Stopwatch(device)
    if probe_steps is None:
        probe_steps = min(8, steps) if watch.cuda else 0
    cache = InstrumentedCache(config)
    cache_arg = cache_kwargs(model, cache)  # looked up once: the timed loop stays lean
    total = warmup + steps + probe_steps
    marks = []
    try:
        with torch.inference_mode(), sdpa_backends(sdpa):
            (synthetic_prefill if prefill == "synthetic" else model_prefill)(model, cache, batch, context, generator)
            tokens = torch.randint(model.config.vocab_size, (total, batch, 1), generator=generator, device=device)
            for i in range(total):
                if i == warmup:
                    watch.sync()
                    before = cache.stats()
                if i == warmup + steps:
                    watch.sync()
                    after = cache.stats()
                cache.step_index = i - warmup - steps  # >= 0 only in the probe steps
                start = watch.mark()
                model(input_ids=tokens[i], **cache_arg, use_cache=True, logits_to_keep=1)
                end = watch.mark()
                if warmup <= i < warmup + steps:
                    marks.append((start, end))
            cache.step_index = -1
            watch.sync()
            if not probe_steps:
                after = cache.stats()
            scoring.clear_listener()
        step_ms = [watch.elapsed_ms(a, b) for a, b in marks]
        stall = _per_step(cache.waits, probe_steps, watch) if probe_steps else None
        copied = sum(c[3] for c in cache.copies)
        copy_s = sum(watch.elapsed_ms(c[1], c[2]) for c in cache.copies) / 1e3
        stats = summarize(step_ms)
        return {
            "batch": batch,
            "context": context,
            "hbm": hbm,
            "step_ms": stats["median"],
            "step_ms_mean": stats["mean"],
            "step_ms_p90": stats["p90"],
            "stall_ms": summarize(stall)["median"] if stall is not None else None,
            "h2d_bytes": (after["bytes_h2d"] - before["bytes_h2d"]) // steps,
            "d2h_bytes": (after["bytes_d2h"] - before["bytes_d2h"]) // steps,
            "prefetch_gbps": copied / copy_s / 1e9 if copy_s > 0 and copied else None,
            "tier_bytes": after["bytes"],
            "retiers": after["retiers"] - before["retiers"],
            "steps": steps,
            "warmup": warmup,
            "probe_steps": probe_steps,
            "sdpa": sdpa,
        }
    finally:
        del cache
        gc.collect()
        if watch.cuda:
            torch.cuda.empty_cache()


def _per_step(waits: list, steps: int, watch: Stopwatch) -> list[float]:
    """Milliseconds the compute stream spent waiting for prefetches, summed per timed step."""
    totals = [0.0] * steps
    for step, start, end in waits:
        if 0 <= step < steps:
            totals[step] += watch.elapsed_ms(start, end)
    return totals

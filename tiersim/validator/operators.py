"""Per-operator time tables on the user's GPU: the inputs of the simulator's profile-driven compute model.

A decode step is a fixed list of operators per layer (RMSNorm, q/k/v/o GEMMs, RoPE, the KV
append, attention, SiLU*mul, gate/up/down GEMMs, residual adds) plus a few per step (embedding
gather, rotary table, final norm, LM head). This module times each of them in isolation with the
model's real shapes and transformers' own functions, so the simulator can price any batch and
context by interpolation instead of a roofline, and separately times whole HF eager decode steps
to learn the per-step host overhead that no operator table contains.

Two numbers per operator row: ``device_us``, the GPU time per call (a CUDA graph of back-to-back
calls replayed and timed with events, so launch gaps are excluded), and ``host_us``, the CPU
time to issue one eager call. Inputs and weights rotate over several copies (at least
``ROTATE_BYTES`` in all, at most one per layer) so the L2 cache does not serve a weight or a KV
block that the real model would read from HBM. Writes one JSON (kind ``operator-profile``).

Entry point: ``python -m tiersim.validator.operators --shape r1-distill-qwen-7b,llama-3.1-8b --out FILE``.
Imports torch, numpy, transformers and the standard library only (the GPU machine has no simpy,
plotly, rich or typer). ``--device cpu`` is the smoke mode: same code path, tiny shape, seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import math
import shlex
import statistics
import sys
import time
from typing import Callable

import torch

from tiersim import fileformat
from tiersim.errors import TiersimError
from tiersim.validator.sdpa import SDPA_CHOICES, sdpa_backends

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ATTN_BATCHES = (1, 2, 4, 8, 16, 32, 64)
ATTN_CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384)
DECODE_POINTS = ((1, 2048), (8, 2048), (32, 2048), (1, 8192), (8, 8192), (32, 8192))
#: Rotated working set per operator: several times an H100's 50 MB L2, so no call finds its inputs there.
ROTATE_BYTES = 256 << 20
MIN_CALLS = 8  # calls per timed graph (a multiple of the copies)
REPS = 5  # timed graph replays; the median is kept
TOP_OPS = 15
SMOKE = {"tokens": (1, 4, 16), "batches": (1, 2), "contexts": (64, 128), "decode": ((1, 96), (2, 96))}
_PREFIX = {"qwen2": "Qwen2", "qwen3": "Qwen3", "llama": "Llama"}


# -- timing ----------------------------------------------------------------------------------------
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
        with torch.cuda.graph(graph):
            for i in range(calls):
                fn(i)
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


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# -- the operator tables ---------------------------------------------------------------------------
def linear_shapes(shape) -> dict[str, tuple[int, int, bool]]:
    """(in, out, bias) of every GEMM the HF model runs per layer, and of the LM head (once per step)."""
    h, d = shape.hidden_size, shape.head_dim
    q, kv = shape.num_attention_heads * d, shape.num_kv_heads * d
    bias = shape.architecture == "qwen2"
    return {
        "q_proj": (h, q, bias), "k_proj": (h, kv, bias), "v_proj": (h, kv, bias), "o_proj": (q, h, False),
        "gate_proj": (h, shape.intermediate_size, False), "up_proj": (h, shape.intermediate_size, False),
        "down_proj": (shape.intermediate_size, h, False), "lm_head": (h, shape.vocab_size, False),
    }


def gemm_table(shape, tokens, timer: OpTimer, budget: Budget, dtype, skipped: list) -> list[dict]:
    rows = []
    dev = timer.device
    for op, (k, n, has_bias) in linear_shapes(shape).items():
        if budget.spent():
            skipped.append(f"gemm {op}: time budget spent")
            continue
        w_bytes = k * n * 2
        copies = copies_for(w_bytes, shape.num_layers if op != "lm_head" else 2)
        weights = [torch.randn(n, k, device=dev, dtype=dtype) * 0.02 for _ in range(copies)]
        biases = [torch.zeros(n, device=dev, dtype=dtype) if has_bias else None for _ in range(copies)]
        for t in tokens:
            xs = [torch.randn(t, k, device=dev, dtype=dtype) for _ in range(copies)]

            def fn(i, xs=xs):
                j = i % copies
                return torch.nn.functional.linear(xs[j], weights[j], biases[j])

            rows.append(timer.row(fn, copies, op=op, tokens=t, k=k, n=n, bias=has_bias,
                                  bytes=w_bytes + 2 * t * (k + n), flops=2 * t * k * n))
            del xs
        del weights, biases
        _free(dev)
    return rows


def _hf_module(shape):
    return importlib.import_module(f"transformers.models.{shape.architecture}.modeling_{shape.architecture}")


def small_op_table(shape, tokens, timer: OpTimer, budget: Budget, dtype, skipped: list) -> list[dict]:
    """RMSNorm, RoPE, SiLU*mul and the residual add per layer; embedding, rotary table and final norm per step.

    Each uses the transformers function or module the model itself calls, so kernel counts match.
    """
    from transformers.activations import ACT2FN

    from tiersim.validator.shapes import hf_config

    dev = timer.device
    mod = _hf_module(shape)
    cfg = hf_config(shape)
    norm = getattr(mod, f"{_PREFIX[shape.architecture]}RMSNorm")(shape.hidden_size, eps=1e-6).to(dev, dtype)
    head_norm = getattr(mod, f"{_PREFIX[shape.architecture]}RMSNorm")(shape.head_dim, eps=1e-6).to(dev, dtype)
    rotary = getattr(mod, f"{_PREFIX[shape.architecture]}RotaryEmbedding")(config=cfg).to(dev)
    rope = mod.apply_rotary_pos_emb
    act = ACT2FN["silu"]
    h, inter, d = shape.hidden_size, shape.intermediate_size, shape.head_dim
    hq, hk = shape.num_attention_heads, shape.num_kv_heads
    table = torch.randn(shape.vocab_size, h, device=dev, dtype=dtype)
    rows = []
    for t in tokens:
        if budget.spent():
            skipped.append(f"small ops at {t} tokens: time budget spent")
            continue
        per_copy = 2 * t * max(h, inter, (hq + hk) * d)
        copies = copies_for(2 * per_copy, shape.num_layers)
        xs = [torch.randn(t, 1, h, device=dev, dtype=dtype) for _ in range(copies)]
        gates = [torch.randn(t, 1, inter, device=dev, dtype=dtype) for _ in range(copies)]
        ups = [torch.randn(t, 1, inter, device=dev, dtype=dtype) for _ in range(copies)]
        qs = [torch.randn(t, hq, 1, d, device=dev, dtype=dtype) for _ in range(copies)]
        ks = [torch.randn(t, hk, 1, d, device=dev, dtype=dtype) for _ in range(copies)]
        pos = torch.full((t, 1), 4096, device=dev, dtype=torch.long)
        cos, sin = rotary(xs[0], pos)
        ids = [torch.randint(shape.vocab_size, (t, 1), device=dev) for _ in range(copies)]
        ops = {
            "rmsnorm": (lambda i: norm(xs[i % copies]), "layer", 2),
            "rope": (lambda i: rope(qs[i % copies], ks[i % copies], cos, sin), "layer", 1),
            "silu_mul": (lambda i: act(gates[i % copies]) * ups[i % copies], "layer", 1),
            "residual_add": (lambda i: xs[i % copies] + xs[(i + 1) % copies], "layer", 2),
            "embedding": (lambda i: torch.nn.functional.embedding(ids[i % copies], table), "step", 1),
            "rotary_emb": (lambda i: rotary(xs[i % copies], pos), "step", 1),
            "final_norm": (lambda i: norm(xs[i % copies]), "step", 1),
        }
        if shape.architecture == "qwen3":
            ops["qk_norm"] = (lambda i: (head_norm(qs[i % copies]), head_norm(ks[i % copies])), "layer", 1)
        for op, (fn, scope, count) in ops.items():
            rows.append(timer.row(fn, copies, op=op, tokens=t, scope=scope, calls=count))
        del xs, gates, ups, qs, ks, ids
    del table
    _free(dev)
    return rows


class _AttentionModule(torch.nn.Module):
    """What ``sdpa_attention_forward`` reads from the model's attention module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True
        self.training = False


def attention_table(shape, batches, contexts, timer: OpTimer, budget: Budget, dtype, skipped: list) -> list[dict]:
    """Decode attention (one query) through transformers' SDPA function, and the DynamicCache KV append.

    The SDPA call is the one the model makes (no mask in an unpadded decode step), so the kernel
    transformers and torch choose on this machine is the one timed. ``kv_cat`` is ``torch.cat`` of
    one new token onto K and V, what ``DynamicCache.update`` does every layer and step.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dev = timer.device
    hq, hk, d = shape.num_attention_heads, shape.num_kv_heads, shape.head_dim
    module = _AttentionModule(hq // hk)
    rows = []
    for b in batches:
        for c in contexts:
            if budget.spent():
                skipped.append(f"attention batch {b} context {c}: time budget spent")
                continue
            kv_bytes = 2 * b * c * hk * d * 2
            copies = copies_for(kv_bytes, shape.num_layers)
            try:
                ks = [torch.randn(b, hk, c, d, device=dev, dtype=dtype) for _ in range(copies)]
                vs = [torch.randn(b, hk, c, d, device=dev, dtype=dtype) for _ in range(copies)]
                qs = [torch.randn(b, hq, 1, d, device=dev, dtype=dtype) for _ in range(copies)]
                new = torch.randn(b, hk, 1, d, device=dev, dtype=dtype)

                def attn(i):
                    j = i % copies
                    return sdpa_attention_forward(module, qs[j], ks[j], vs[j], None, scaling=d ** -0.5)[0]

                def cat(i):
                    j = i % copies
                    return torch.cat([ks[j], new], dim=-2), torch.cat([vs[j], new], dim=-2)

                common = {"batch": b, "context": c, "q_heads": hq, "kv_heads": hk, "head_dim": d, "kv_bytes": kv_bytes}
                for op, choice in (("sdpa_decode", "default"), ("sdpa_decode_no_cudnn", "no-cudnn")):
                    with sdpa_backends(choice):
                        timer.sync()
                        t0 = time.perf_counter()
                        attn(0)  # the first call at a new KV length: includes any per-shape plan build
                        timer.sync()
                        first_us = (time.perf_counter() - t0) * 1e6
                        rows.append({**timer.row(attn, copies, op=op, **common), "first_call_us": first_us})
                rows.append(timer.row(cat, copies, op="kv_cat", **common))
            except Exception as exc:  # noqa: BLE001 - out of memory or a failure: recorded, the next point runs
                why = "out of memory" if _is_oom(exc) else f"failed: {type(exc).__name__}: {str(exc)[:200]}"
                skipped.append(f"attention batch {b} context {c}: {why}")
            finally:
                ks = vs = qs = new = None
                _free(dev)
    return rows


# -- whole decode steps ----------------------------------------------------------------------------
def _dynamic_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # pragma: no cover - a transformers without the config argument
        return DynamicCache()


def _fill_dynamic(model, cache, batch: int, context: int, generator) -> None:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = (batch, cfg.num_key_value_heads, context, head_dim)
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(shape, generator=generator, device=model.device, dtype=model.dtype)
        cache.update(k, torch.randn_like(k), layer)


def make_cache(model, kind: str, hbm: float, batch: int, context: int, seed: int = 0):
    """A filled cache: ``dynamic`` (transformers' DynamicCache) or ``tiered`` (TieredCache, lossless at ``hbm``)."""
    from tiersim.validator import decode

    generator = torch.Generator(device=model.device)
    generator.manual_seed(seed)
    if kind == "dynamic":
        cache = _dynamic_cache(model)
        _fill_dynamic(model, cache, batch, context, generator)
    else:
        from tiersim.hierarchy.cache import TieredCache

        cache = TieredCache(decode.tier_config(hbm))
        decode.synthetic_prefill(model, cache, batch, context, generator)
    return cache


def _top_ops(prof, steps: int, limit: int = TOP_OPS) -> tuple[list[dict], float]:
    """The ``limit`` operators with the most self CPU time per step, and the GPU kernel time per step (ms)."""
    def attr(evt, *names):
        for name in names:
            value = getattr(evt, name, None)
            if value is not None:
                return float(value)
        return 0.0

    averages = prof.key_averages()
    # Device rows (kernels, copies, memsets) only: a CPU operator's row repeats its kernels' time.
    device_total = sum(attr(e, "self_device_time_total", "self_cuda_time_total") for e in averages
                       if "CPU" not in str(getattr(e, "device_type", "CPU")))
    cpu_total = sum(attr(e, "self_cpu_time_total") for e in averages)
    ranked = sorted(averages, key=lambda e: attr(e, "self_cpu_time_total"), reverse=True)[:limit]
    rows = [{
        "name": e.key,
        "calls_per_step": e.count / steps,
        "self_cpu_us_per_step": attr(e, "self_cpu_time_total") / steps,
        "cpu_total_us_per_step": attr(e, "cpu_time_total") / steps,
        "self_device_us_per_step": attr(e, "self_device_time_total", "self_cuda_time_total") / steps,
    } for e in ranked]
    return rows, device_total / steps / 1e3, cpu_total / steps / 1e3


def _python_profile(model, tokens, arg, steps: int, dev, limit: int = TOP_OPS) -> list[dict]:
    """The Python functions with the most own time per decode step (cProfile): where host time goes
    that no aten operator accounts for (module calls, cache bookkeeping, mask building)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(steps):
        model(input_ids=tokens[-1 - i], **arg, use_cache=True, logits_to_keep=1)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (primitive calls, calls, tottime, cumtime, callers)}
    ranked = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:limit]
    return [{"function": f"{fn}:{line}({name})", "calls_per_step": calls / steps,
             "self_ms_per_step": tot * 1e3 / steps, "cumulative_ms_per_step": cum * 1e3 / steps}
            for (fn, line, name), (_prim, calls, tot, cum, _callers) in ranked]


def decode_step(model, kind: str, hbm: float, batch: int, context: int, steps: int, warmup: int,
                profile_steps: int, top: bool = False, sdpa: str = "default") -> dict:
    """Median step time (CUDA events), CPU issue time, and the GPU kernel time of profiled steps.

    ``host_overhead_ms`` = step - kernel time: the time the GPU sits idle waiting for the host
    (Python, launches, cache bookkeeping, syncs). With ``top`` the profiler's top operators by
    self CPU time come along.
    """
    from tiersim.compat import cache_kwargs
    from tiersim.hierarchy import scoring

    dev = model.device
    cuda = dev.type == "cuda"
    cache = make_cache(model, kind, hbm, batch, context)
    arg = cache_kwargs(model, cache)
    total = warmup + steps + profile_steps
    tokens = torch.randint(model.config.vocab_size, (total, batch, 1), device=dev)
    step_ms, issue_ms = [], []
    result = {"cache": kind, "hbm": hbm, "batch": batch, "context": context, "steps": steps, "sdpa": sdpa}
    try:
        with torch.inference_mode(), sdpa_backends(sdpa):
            for i in range(warmup + steps):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                t0 = time.perf_counter()
                model(input_ids=tokens[i], **arg, use_cache=True, logits_to_keep=1)
                t1 = time.perf_counter()
                if cuda:
                    end.record()
                    end.synchronize()
                if i >= warmup:
                    issue_ms.append((t1 - t0) * 1e3)
                    step_ms.append(start.elapsed_time(end) if cuda else (time.perf_counter() - t0) * 1e3)
            kernel_ms, top_ops = None, None
            if profile_steps:
                from torch.profiler import ProfilerActivity, profile

                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                with profile(activities=activities) as prof:
                    for i in range(warmup + steps, total):
                        model(input_ids=tokens[i], **arg, use_cache=True, logits_to_keep=1)
                    if cuda:
                        torch.cuda.synchronize(dev)
                rows, kernel, aten_cpu = _top_ops(prof, profile_steps)
                kernel_ms = kernel if cuda else None
                top_ops = rows if top else None
                result["aten_self_cpu_ms"] = aten_cpu
                if top:
                    result["top_python_by_self_time"] = _python_profile(model, tokens, arg, profile_steps, dev)
            scoring.clear_listener()
    finally:
        del cache, arg
        _free(dev)
    median = statistics.median(step_ms)
    result.update({
        "step_ms": median,
        "step_ms_p90": sorted(step_ms)[min(len(step_ms) - 1, int(round(0.9 * (len(step_ms) - 1))))],
        "cpu_issue_ms": statistics.median(issue_ms),
        "gpu_kernel_ms": kernel_ms,
        "host_overhead_ms": median - kernel_ms if kernel_ms is not None else None,
    })
    if top:
        result["top_ops_by_self_cpu"] = top_ops
    return result


def decode_table(model, points, hbm_compare, budget: Budget, steps: int, warmup: int, profile_steps: int,
                 skipped: list, log) -> tuple[list[dict], list[dict]]:
    """DynamicCache steps over ``points``; then DynamicCache vs TieredCache at each HBM ratio at the first point."""
    rows, compare = [], []
    runs = []
    for sdpa in SDPA_CHOICES:
        runs += [("compare", "dynamic", 1.0, *points[0], sdpa)]
        runs += [("compare", "tiered", h, *points[0], sdpa) for h in hbm_compare]
    runs += [("grid", "dynamic", 1.0, b, c, sdpa) for sdpa in SDPA_CHOICES for b, c in points[1:]]
    # Every run starts at KV lengths no earlier run used: a per-length plan cache (cuDNN SDPA) must
    # not make the second configuration at the same lengths look faster than the first.
    span = warmup + steps + 2 * profile_steps + 1
    for n, (where, kind, hbm, b, c, sdpa) in enumerate(runs):
        c = c + n * span
        label = f"decode {kind} hbm {hbm:g} batch {b} context {c} sdpa {sdpa}"
        if budget.spent():
            skipped.append(f"{label}: time budget spent")
            continue
        log(f"  {label}")
        try:
            r = decode_step(model, kind, hbm, b, c, steps, warmup, profile_steps, top=where == "compare", sdpa=sdpa)
        except Exception as exc:  # noqa: BLE001 - out of memory or a failure: recorded, the next point runs
            _free(model.device)
            why = "out of memory" if _is_oom(exc) else f"failed: {type(exc).__name__}: {str(exc)[:200]}"
            skipped.append(f"{label}: {why}")
            log(f"    {why}")
            continue
        log(f"    step {r['step_ms']:.2f} ms, cpu issue {r['cpu_issue_ms']:.2f} ms, "
            f"kernels {r['gpu_kernel_ms'] if r['gpu_kernel_ms'] is not None else float('nan'):.2f} ms")
        (compare if where == "compare" else rows).append(r)
    rows[:0] = [{k: v for k, v in c.items() if not k.startswith("top_")} for c in compare if c["cache"] == "dynamic"]
    return rows, compare


# -- the run ---------------------------------------------------------------------------------------
def profile_shape(shape, dev, dtype, budget: Budget, grid: dict, log, steps: int, warmup: int) -> dict:
    """Every table for one model shape (sections past the budget are listed under ``skipped``)."""
    from tiersim.validator.shapes import build_model, parameter_count

    timer = OpTimer(dev)
    skipped: list[str] = []
    out = {"shape": {**shape.to_dict(), "params": parameter_count(shape)}, "skipped": skipped,
           "gemm": [], "small": [], "attention": [], "decode": [], "decode_compare": []}

    def guarded(section: str, fn):
        """Run one section; a failure is recorded and the next section still runs (a borrowed GPU
        must always end with a file)."""
        try:
            return fn()
        except TiersimError:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded in the file, the run goes on
            skipped.append(f"{section}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            log(f"  {skipped[-1]}")
            _free(dev)
            return None

    log(f"{shape.name}: GEMMs (q/k/v/o, gate/up/down, LM head) at {len(grid['tokens'])} token counts")
    out["gemm"] = guarded("gemm", lambda: gemm_table(shape, grid["tokens"], timer, budget, dtype, skipped)) or []
    log(f"{shape.name}: small ops")
    out["small"] = guarded("small ops", lambda: small_op_table(shape, grid["tokens"], timer, budget, dtype, skipped)) or []
    log(f"{shape.name}: decode attention and KV append, {len(grid['batches'])} batches x {len(grid['contexts'])} contexts")
    out["attention"] = guarded("attention", lambda: attention_table(
        shape, grid["batches"], grid["contexts"], timer, budget, dtype, skipped)) or []
    if budget.spent():
        skipped.append("decode steps: time budget spent")
        return out
    log(f"{shape.name}: building the model (random {str(dtype).removeprefix('torch.')} weights) for decode steps")

    def decode_section():
        model = build_model(shape, dev, dtype=dtype)
        try:
            return decode_table(model, grid["decode"], (1.0, 0.5), budget, steps, warmup, grid["profile_steps"],
                                skipped, log)
        finally:
            del model
            _free(dev)

    out["decode"], out["decode_compare"] = guarded("decode", decode_section) or ([], [])
    return out


def check_args(shapes: list[str], budget_s: float | None, steps: int, warmup: int, out) -> None:
    from tiersim.validator.calibrate import check_out
    from tiersim.validator.shapes import get_shape

    for name in shapes:
        get_shape(name)
    if not shapes:
        raise TiersimError("--shape: give at least one shape")
    if budget_s is not None and not budget_s > 0:
        raise TiersimError(f"--budget-s must be > 0 seconds, got {budget_s!r}")
    if steps < 1 or warmup < 1:
        raise TiersimError(f"--steps and --warmup must be >= 1, got {steps} and {warmup}")
    check_out(out)


def run(shapes: list[str], device: str = "cuda", out=None, budget_s: float | None = 240.0, steps: int = 10,
        warmup: int = 3, command: str | None = None, log=lambda _m: None) -> dict:
    """Profile every shape (each gets an equal share of what is left of the budget); write ``out`` atomically."""
    from tiersim.validator.calibrate import base_gpu_preset, device_info, resolve_device, single_threaded_cpu
    from tiersim.validator.shapes import get_shape

    check_args(shapes, budget_s, steps, warmup, out)
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    grid = ({"tokens": TOKENS, "batches": ATTN_BATCHES, "contexts": ATTN_CONTEXTS, "decode": DECODE_POINTS,
             "profile_steps": 3} if cuda else {**SMOKE, "profile_steps": 1})
    info = device_info(dev)
    log(f"device: {info['name']} (torch {info['torch']}, CUDA {info['cuda']}, driver {info['driver']})")
    started = time.monotonic()
    models = {}
    with single_threaded_cpu(dev):
        for n, name in enumerate(shapes):
            left = None if budget_s is None else budget_s - (time.monotonic() - started)
            share = None if left is None else max(left, 0.0) / (len(shapes) - n)
            models[name] = profile_shape(get_shape(name), dev, dtype, Budget(share), grid, log, steps, warmup)
    doc = {
        **fileformat.header(fileformat.OPERATOR_PROFILE),
        "command": command,
        "device": info,
        "gpu_preset": base_gpu_preset(info["name"] if cuda else None),
        "settings": {"dtype": str(dtype).removeprefix("torch."), "sdpa_choices": list(SDPA_CHOICES),
                     "cudnn_sdp_enabled": bool(getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)()),
                     "rotate_bytes": ROTATE_BYTES, "min_calls": MIN_CALLS,
                     "reps": REPS, "decode_steps": steps, "decode_warmup": warmup, "budget_s": budget_s,
                     "grid": {k: [list(p) for p in v] if k == "decode" else (list(v) if isinstance(v, tuple) else v)
                              for k, v in grid.items()},
                     "elapsed_s": time.monotonic() - started},
        "models": models,
    }
    if out is not None:
        fileformat.write_document(out, doc)
        log(f"wrote {out}")
    return doc


# -- the short table -------------------------------------------------------------------------------
def format_text(doc: dict) -> str:
    lines = [f"operator profile: {doc['device']['name']} | torch {doc['device']['torch']} | "
             f"{doc['settings']['elapsed_s']:.0f} s"]
    for name, m in doc["models"].items():
        lines.append(f"\n{name}: device us per call (host us per call) by tokens")
        ops: dict[str, dict] = {}
        for r in m["gemm"] + m["small"]:
            ops.setdefault(r["op"], {})[r["tokens"]] = r
        shown = [t for t in doc["settings"]["grid"]["tokens"] if t in (1, 8, 64, 512) or len(doc["settings"]["grid"]["tokens"]) <= 4]
        lines.append(f"{'op':>14}  " + "  ".join(f"{t:>16}" for t in shown))
        for op, by_t in ops.items():
            cells = [f"{by_t[t]['device_us']:8.1f} ({by_t[t]['host_us']:5.1f})" if t in by_t else f"{'-':>16}"
                     for t in shown]
            lines.append(f"{op:>14}  " + "  ".join(cells))
        attn = [r for r in m["attention"] if r["op"] == "sdpa_decode"]
        if attn:
            lines.append("decode attention device us (batch x context): " + ", ".join(
                f"{r['batch']}x{r['context']}={r['device_us']:.0f}" for r in attn
                if r["batch"] in (1, 8, 32) and r["context"] in (2048, 8192, 128)))
        for r in m["decode"] + [c for c in m["decode_compare"] if c["cache"] == "tiered"]:
            k = r["gpu_kernel_ms"]
            lines.append(f"decode {r['cache']:>7} sdpa {r.get('sdpa', 'default'):>8} hbm {r['hbm']:.2f} "
                         f"batch {r['batch']:>3} context {r['context']:>5}: "
                         f"step {r['step_ms']:7.2f} ms, cpu issue {r['cpu_issue_ms']:7.2f} ms, "
                         f"kernels {k if k is not None else float('nan'):7.2f} ms")
        for c in m["decode_compare"]:
            lines.append(f"top self-CPU ops, {c['cache']} hbm {c['hbm']:g} sdpa {c.get('sdpa', 'default')} "
                         f"(batch {c['batch']}, context {c['context']}):")
            for op in (c.get("top_ops_by_self_cpu") or [])[:6]:
                lines.append(f"  {op['self_cpu_us_per_step']:9.0f} us/step self CPU  {op['calls_per_step']:7.1f} calls  "
                             f"{op['self_device_us_per_step']:8.0f} us device  {op['name'][:60]}")
            for fn in (c.get("top_python_by_self_time") or [])[:3]:
                lines.append(f"  {fn['self_ms_per_step'] * 1e3:9.0f} us/step python   {fn['calls_per_step']:7.1f} calls  "
                             f"{fn['function'][-70:]}")
        if m["skipped"]:
            lines.append(f"skipped: {len(m['skipped'])} ({m['skipped'][0]}{', ...' if len(m['skipped']) > 1 else ''})")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tiersim.validator.operators", description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="r1-distill-qwen-7b",
                   help="comma-separated shapes from tiersim.validator.shapes.SHAPES (tiny for the smoke mode)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke mode)")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="seconds for everything, shared equally by the shapes; sections past it are skipped")
    p.add_argument("--steps", type=int, default=10, help="timed decode steps per point")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps first")
    p.add_argument("--out", default=None, help="operator-profile JSON to write")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from tiersim.validator.calibrate import NoDeviceError

    argv = sys.argv[1:] if argv is None else argv
    shapes = [s.strip() for s in args.shape.split(",") if s.strip()]
    try:
        doc = run(shapes, device=args.device, out=args.out, budget_s=args.budget_s, steps=args.steps,
                  warmup=args.warmup, command=shlex.join(["python", "-m", "tiersim.validator.operators", *argv]),
                  log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except NoDeviceError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except TiersimError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(format_text(doc))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())

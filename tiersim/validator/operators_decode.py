"""Whole HF eager decode steps for the operator profile: step time, CPU issue time, the GPU kernel time of
profiled steps (so the host overhead no operator table holds is measured), and the top operators and
Python functions by self time.

Split from ``tiersim.validator.operators`` (which re-exports these names). Imports torch and transformers.
"""

from __future__ import annotations

import statistics
import time

import torch

from tiersim.validator.operators_timing import Budget, free, is_oom
from tiersim.validator.sdpa import SDPA_CHOICES, sdpa_backends

TOP_OPS = 15


def _dynamic_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # pragma: no cover - a transformers without the config argument
        return DynamicCache()


def _fill_dynamic(model, cache, batch: int, context: int, generator) -> None:
    from tiersim.validator import decode

    for layer in range(model.config.num_hidden_layers):
        cache.update(*decode.synthetic_kv(model.config, batch, context, generator, model.device, model.dtype), layer)


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
        free(dev)
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
            free(model.device)
            why = "out of memory" if is_oom(exc) else f"failed: {type(exc).__name__}: {str(exc)[:200]}"
            skipped.append(f"{label}: {why}")
            log(f"    {why}")
            continue
        log(f"    step {r['step_ms']:.2f} ms, cpu issue {r['cpu_issue_ms']:.2f} ms, "
            f"kernels {r['gpu_kernel_ms'] if r['gpu_kernel_ms'] is not None else float('nan'):.2f} ms")
        (compare if where == "compare" else rows).append(r)
    rows[:0] = [{k: v for k, v in c.items() if not k.startswith("top_")} for c in compare if c["cache"] == "dynamic"]
    return rows, compare


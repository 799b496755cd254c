"""The graph executor's grid: per (batch, context, HBM) point, what the simulator models, measured on the GPU.

Per point the tier buffers are filled by the same synthetic prefill the HF harness uses (the same draws),
two steps are captured (CUDA) or run eagerly (CPU): the full step and the same step without its H2D
copies. Their replays alternate, so both see the same context lengths; re-tiering runs between replays
every ``retier_every`` steps and is timed apart. Per point:

* ``step_ms``: the full step (CUDA events around a replay; perf_counter on CPU), median, p10, p90;
* ``gpu_busy_ms``: the step without its copies, the time the GPU's kernels need;
* ``stall_ms``: step - busy, the time compute waits on a copy (never below 0);
* ``prefetch_gbps``: the step's H2D bytes over the time the copies take alone; ``h2d_gbps_in_step``:
  those bytes over the full step (the rate decode sustained);
* ``overhead_pct`` against HBM 1.0 at the same batch and lengths.

``--strategy host-attention|hybrid``: the steps are :mod:`tiersim.validator.graph_host`'s (the copy-free
twin skips the host part too), whose ``amend`` adds ``host_ms`` and counts their own traffic.

The file is a ``calibration`` (``executor``: ``cuda-graph`` on CUDA, ``graph-eager`` on CPU), with the
link sweep and the compute fit from the graph's HBM-1.0 points, and the calibrated simulator's prediction
per point, so ``tiersim simulate --against`` and ``--calibration`` read it like the HF harness's.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import asdict

import torch

from tiersim import fileformat
from tiersim.errors import TiersimError
from tiersim.hierarchy.config import TierConfig
from tiersim.hierarchy.quant_layout import bytes_per_token_layer
from tiersim.hierarchy.support import head_dim_of
from tiersim.validator.operators_timing import free, frozen_heap, is_oom
from tiersim.validator.timing import Stopwatch, summarize

EXECUTORS = {"cuda": "cuda-graph", "cpu": "graph-eager"}  # "cuda-eager": a point whose capture failed
DEFAULT_BATCHES = (1, 8, 32, 64)
DEFAULT_CONTEXTS = (2048, 8192)
DEFAULT_HBM = (1.0, 0.5, 0.25)
COPY_REPS = 3


def prefill_scores(probs: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, T] float32: the prompt's score as ``TieredCache.observe_attention`` accumulates it at the prefill
    (the last ``window`` queries, mean over query heads, summed over queries, onto zeros)."""
    scored = probs if window is None else probs[:, :, -window:, :]
    return torch.zeros(probs.shape[0], probs.shape[-1], dtype=torch.float32, device=probs.device).add_(
        scored.mean(dim=1).sum(dim=1))


def load_synthetic(buffers, model, generator: torch.Generator) -> None:
    """Fill every layer as ``tiersim.validator.decode.synthetic_prefill`` fills a TieredCache (same draws,
    same order), placing each layer by the policy as it arrives."""
    from tiersim.validator.decode import synthetic_kv, synthetic_probs

    cfg, b, t = model.config, buffers.batch, buffers.context
    window = buffers.policy.prefill_queries
    for layer in range(cfg.num_hidden_layers):
        keys, values = synthetic_kv(cfg, b, t, generator, buffers.device, buffers.dtype)
        scores = torch.zeros((b, t), dtype=torch.float32, device=buffers.device)
        if buffers.config.offloads:  # the cache scores only then (TieredCache.needs_scores)
            n = max(min(t, window if window is not None else t), 1)
            scores = prefill_scores(synthetic_probs(b, cfg.num_attention_heads, n, t, generator, buffers.device),
                                    window)
        buffers.load(layer, keys, values, scores)
        del keys, values


class HostArena:
    """One pinned host allocation for every point's DDR tier (pinning is slow, and torch's pinned
    allocator rounds each request up to a power of two and keeps it): views are handed out per point."""

    def __init__(self, nbytes: int) -> None:
        self.storage = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
        self.offset = 0

    def reset(self) -> None:
        self.offset = 0

    def take(self, shape, dtype) -> torch.Tensor:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        start = -(-self.offset // 64) * 64
        if start + size > self.storage.numel():
            raise TiersimError("host arena too small for this point (a sizing bug)")  # pragma: no cover
        self.offset = start + size
        return self.storage[start:start + size].view(dtype).view(shape)  # not zeroed: TierBuffers.load does


def interrupted_by(exc: BaseException):
    """The SIGTERM (``calibrate.Terminated``) or Ctrl-C (``KeyboardInterrupt``: what ``tiersim validate`` turns
    SIGTERM into) ``exc`` was raised while handling, if any. A signal that lands inside
    a capture ends the capture half-recorded (a side stream not joined back), so ``torch.cuda.graph``'s exit fails
    with a RuntimeError that hides the signal: that must stop the run as the signal would, not send the point to
    the eager fallback (or pass as a failed check point) until the script's SIGKILL."""
    from tiersim.validator.calibrate import Terminated

    seen = exc
    while seen is not None:
        if isinstance(seen, (Terminated, KeyboardInterrupt)):
            return seen
        seen = seen.__context__
    return None


def run_steps(steps: int, warmup: int) -> int:
    """Decode steps a point's buffers must hold: the full and the copy-free step's warm-up and timed replays
    (they alternate), and one more."""
    return 2 * (max(warmup, 1) + steps) + 1


def point_config(hbm: float, compressed: float = 0.0, retier_every: int = 16, head_dim: int | None = None,
                 **strategy) -> TierConfig:
    """A point's split: ``hbm`` in HBM; of the rest, ``compressed`` (at most all of it) in the compressed tier,
    quantized in groups of the cache's default ``quant_group`` or the whole head when narrower, the rest in DDR."""
    share = min(compressed, 1.0 - hbm) if hbm < 1.0 else 0.0
    group = TierConfig.quant_group if head_dim is None else min(TierConfig.quant_group, head_dim)
    return TierConfig(hbm=hbm, ddr=1.0 - hbm - share, compressed=share, retier_every=retier_every, quant_group=group,
                      **strategy)


def ddr_host_bytes(shape, batch: int, context: int, hbm: float, max_steps: int, retier_every: int, dtype) -> int:
    """Pinned bytes a lossless point's DDR tier takes (both K and V, all layers; a compressed share takes less)."""
    from tiersim.validator.graph_tiers import capacities

    config = point_config(hbm, 0.0, retier_every, shape.head_dim)
    cap = capacities(config, context, context + max_steps)["ddr"]
    item = torch.empty((), dtype=dtype).element_size()
    return 2 * shape.num_layers * (batch * shape.num_kv_heads * cap * shape.head_dim * item + 64)


def _p10(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[int(round(0.1 * (len(ordered) - 1)))]


def measure_point(model, batch: int, context: int, hbm: float, steps: int, warmup: int, retier_every: int = 16,
                  seed: int = 0, sdpa: str = "no-cudnn", arena: HostArena | None = None,
                  strategy: dict | None = None, compressed: float = 0.0) -> dict:
    """Time one point (see the module docstring); returns the measurement dict. ``strategy``: TierConfig's
    ``strategy`` / ``fetch_share`` (default prefetch; host-attention and hybrid: tiersim.validator.graph_host);
    ``compressed``: the share of the context in the compressed tier when ``hbm`` < 1 (:func:`point_config`)."""
    from tiersim.validator import graph_host
    from tiersim.validator.graph_tiers import TierBuffers
    from tiersim.validator.sdpa import sdpa_backends

    dev = model.device
    cfg = model.config
    head_dim = head_dim_of(cfg)
    config = point_config(hbm, compressed, retier_every, head_dim, **(strategy or {}))
    max_steps = run_steps(steps, warmup)
    watch = Stopwatch(dev)
    if arena is not None:
        arena.reset()
    buffers = TierBuffers(config, cfg.num_hidden_layers, batch, cfg.num_key_value_heads, head_dim, context,
                          max_steps, dev, model.dtype, host=arena.take if arena is not None else None)
    generator = torch.Generator(device=dev)
    generator.manual_seed(seed)
    retier_ms: list[float] = []
    full = busy = runs = None

    def maybe_retier() -> None:
        k = buffers.n_seen - context
        if buffers.due(k):
            watch.sync()
            t0 = time.perf_counter()
            buffers.retier(k)
            graph_host.refresh(full, busy)
            watch.sync()
            retier_ms.append((time.perf_counter() - t0) * 1e3)

    try:
        with torch.inference_mode(), sdpa_backends(sdpa):
            load_synthetic(buffers, model, generator)
            full, busy = graph_host.make_step(model, buffers), graph_host.make_step(model, buffers, copies=False)
            ids = torch.randint(cfg.vocab_size, (batch, 1), generator=generator, device=dev)
            full.ids.copy_(ids)
            busy.ids.copy_(ids)
            capture_error = None
            if watch.cuda:
                try:
                    runs = {"full": graph_host.capture(full, warmup).replay,
                            "busy": graph_host.capture(busy, warmup).replay}
                except Exception as exc:  # noqa: BLE001 - a step that cannot be captured is timed eagerly, and says so
                    if is_oom(exc):
                        raise
                    if (stop := interrupted_by(exc)) is not None:
                        raise stop from exc
                    capture_error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
                    torch.cuda.synchronize(dev)
                    runs = {"full": full.run, "busy": busy.run}
            else:
                runs = {"full": full.run, "busy": busy.run}
                for _ in range(max(warmup, 1)):
                    full.run()
                    busy.run()
            watch.sync()
            if any(buffers.due(k) for k in range(1, buffers.n_seen - context + 1)):
                buffers.retier(buffers.n_seen - context)
                graph_host.refresh(full, busy)
            marks: dict[str, list] = {"full": [], "busy": []}
            for _ in range(steps):
                for name, replay in runs.items():
                    start = watch.mark()
                    replay()
                    marks[name].append((start, watch.mark()))
                    maybe_retier()
            copies = []
            if buffers.offloads:
                for _ in range(COPY_REPS):
                    start = watch.mark()
                    full.copy_all()
                    copies.append((start, watch.mark()))
            watch.sync()
        times = {name: [watch.elapsed_ms(a, b) for a, b in m] for name, m in marks.items()}
        copy_ms = statistics.median([watch.elapsed_ms(a, b) for a, b in copies]) if copies else None
        step, gpu = summarize(times["full"]), summarize(times["busy"])
        staged = buffers.staged_bytes()
        counts = buffers.counts()
        comp_token = bytes_per_token_layer(cfg.num_key_value_heads, head_dim, config.compressed_bits, config.quant_group)
        return graph_host.amend({
            "batch": batch, "context": context, "hbm": hbm,
            "step_ms": step["median"], "step_ms_mean": step["mean"], "step_ms_p90": step["p90"],
            "step_ms_p10": _p10(times["full"]),
            "gpu_busy_ms": gpu["median"], "gpu_busy_ms_p10": _p10(times["busy"]), "gpu_busy_ms_p90": gpu["p90"],
            "stall_ms": max(step["median"] - gpu["median"], 0.0),
            "h2d_bytes": staged,
            "d2h_bytes": buffers.bytes_d2h // max(buffers.n_seen - context, 1),
            "copy_ms": copy_ms,
            "prefetch_gbps": staged / copy_ms / 1e6 if staged and copy_ms else None,
            "h2d_gbps_in_step": staged / step["median"] / 1e6 if staged else None,
            "retiers": buffers.retiers, "retier_ms": statistics.median(retier_ms) if retier_ms else None,
            "tier_bytes": {"hbm": counts["hbm"] * buffers.token_bytes * cfg.num_hidden_layers,
                           "ddr": counts["ddr"] * buffers.token_bytes * cfg.num_hidden_layers,
                           "compressed": round(counts["compressed"] * batch * cfg.num_hidden_layers * comp_token),
                           "staging": 2 * buffers.cap_ddr * buffers.token_bytes},
            "compressed": config.compressed,
            "tiers": counts, "steps": steps, "warmup": warmup, "sdpa": sdpa,
            "executor": EXECUTORS[dev.type] if capture_error is None else "cuda-eager", "capture_error": capture_error,
        }, full, copy_ms)
    finally:
        # Drop the graphs and steps too, so their pools and the buffers are free before the next point: the timing
        # loop's ``replay`` is one of them (a graph's replay, or a step's run), and a step holds itself (its
        # cache argument), so only free()'s collection releases it, and only once nothing here refers to it.
        buffers = full = busy = runs = replay = None  # noqa: F841
        free(dev)


# -- the grid --------------------------------------------------------------------------------------
def run_graph(shape_name: str | None = None, batches=DEFAULT_BATCHES, contexts=DEFAULT_CONTEXTS, hbms=DEFAULT_HBM,
              device: str | None = "cuda", steps: int = 16, warmup: int = 3, out=None, budget_s: float | None = None,
              sdpa: str = "no-cudnn", profile=None, sweep_sizes=None, retier_every: int = 16,
              command: str | None = None, log=lambda _m: None, strategy: str = "prefetch",
              fetch_share: float | None = None, compressed: float = 0.0, strategy_check="") -> dict:
    """Measure the grid with the graph executor; write ``out`` (a calibration file) atomically when given.

    ``budget_s`` counts from the start (link sweep, model build and pinning included); points that would
    start after it are listed as skipped, so a run under a timeout still ends with its file. ``strategy``
    (``fetch_share`` for hybrid): how the DDR tier reaches attention (tiersim.validator.graph_host).
    ``compressed`` > 0 adds the compressed check after the grid: its first batch and context again, each HBM < 1
    ratio with that share of the context in the compressed tier (:func:`point_config`), against a fresh HBM 1.0
    baseline (prefetch only: the host strategies' steps hold lossless splits). ``strategy_check`` (names,
    comma-separated or a sequence) adds, right after the grid's first batch and context (cheap points, so a
    spent budget skips the grid's largest ones rather than these), its first HBM < 1 ratio again with each
    host strategy, against that block's HBM 1.0 baseline (HBM 1.0 runs the same step whatever the strategy);
    each point records its strategy and executor (prefetch runs only)."""
    from tiersim.validator import calibrate, graph_host

    chosen = graph_host.strategy_options(strategy, fetch_share)  # refused in one line before anything runs
    checks = check_strategies(strategy_check, chosen)
    if compressed and chosen is not None:
        raise TiersimError(f"--compressed {compressed:g}: the graph executor's {strategy} step holds lossless "
                           "splits only; use --strategy prefetch")

    if not 0.0 <= compressed <= 1.0:
        raise TiersimError(f"--compressed must be in [0, 1], got {compressed!r}")

    def checkpoint(doc: dict) -> None:  # the file so far, atomically over ``out`` (the run's end writes over it)
        fileformat.write_document(out, doc)

    def measure(shape, batches, contexts, hbms, dev):
        with frozen_heap():  # what is loaded by now: each point's collection then scans only what the run made
            return _measure(shape, batches, contexts, hbms, dev, steps, warmup, budget_s, sdpa, profile, sweep_sizes,
                            retier_every, command, log, chosen, compressed, checks,
                            checkpoint if out is not None else None)

    return calibrate.checked_run(measure, shape_name, batches, contexts, hbms, device, steps, warmup, "synthetic",
                                 budget_s, sdpa, out, profile, log)


def check_strategies(names, chosen) -> tuple:
    """``--strategy-check``'s strategies as TierConfig options, refused in one line when not a host strategy or
    beside a run that is not prefetch's (the check's points are measured against a prefetch grid)."""
    from tiersim.options import parse_list
    from tiersim.validator import graph_host

    if isinstance(names, str):  # the options' own list parser: '' is no check, ',,' a one-line slip
        names = parse_list(names, str, "--strategy-check") if names.strip() else []
    names = list(dict.fromkeys(names or ()))
    for name in names:
        if name not in graph_host.HOST_STRATEGIES:
            raise TiersimError(f"--strategy-check {name}: one of {', '.join(graph_host.HOST_STRATEGIES)} "
                               "(comma-separated)")
    if names and chosen is not None:
        raise TiersimError(f"--strategy-check {','.join(names)}: beside --strategy prefetch only (the check adds "
                           "host-strategy points to a prefetch grid)")
    return tuple(graph_host.strategy_options(name) for name in names)


def _measure(shape, batches, contexts, hbms, dev, steps, warmup, budget_s, sdpa, profile, sweep_sizes,
             retier_every, command, log, chosen=None, compressed=0.0, checks=(), checkpoint=None) -> dict:
    """The grid's walk and its file (``checkpoint(doc)``, when given, after each point: the file so far)."""
    from tiersim.validator import calibrate, compute, graph_host, grid, link, predict
    from tiersim.validator.shapes import build_model

    started = time.monotonic()  # the budget covers the sweep, the build and the pinning too: the file must be written
    info = calibrate.device_info(dev)
    executor = EXECUTORS[dev.type]
    log(f"device: {info['name']} (torch {info['torch']}, CUDA {info['cuda']}); executor {executor}")
    link_doc = link.summarize_link(link.sweep(dev, sweep_sizes or link.SIZES))
    log(f"link: h2d {link_doc['h2d_gbps']:.1f} GB/s, d2h {link_doc['d2h_gbps']:.1f} GB/s")
    tflops, copy_rate = compute.matmul_tflops(dev), compute.copy_gbps(dev)
    log(f"building {shape.name} with random weights on {dev}")
    model = build_model(shape, dev)
    params = sum(p.numel() for p in model.parameters())
    arena = None
    if dev.type == "cuda":
        need = max(ddr_host_bytes(shape, b, c, h, run_steps(steps, warmup), retier_every, model.dtype)
                   for b in batches for c in contexts for h in hbms)
        log(f"pinning {need / 1e9:.1f} GB of host memory for the DDR tier")
        pin_start = time.monotonic()
        try:
            arena = HostArena(need)
            log(f"  pinned in {time.monotonic() - pin_start:.1f} s")
        except RuntimeError as exc:  # the host cannot pin it at once: each point pins its own tensors
            log(f"  could not pin one arena ({(str(exc).splitlines() or [''])[0][:120]}); pinning per point")
    points, extras, baselines = [], [], []

    def run(batch, context, hbm, share=0.0, strategy=chosen):
        return measure_point(model, batch, context, hbm, steps, warmup, retier_every, sdpa=sdpa, arena=arena,
                             strategy=strategy, compressed=share)

    def block(batch, context):
        return ((0.0, chosen, *point) for point in grid.measure_grid([batch], [context], hbms, run, baselines, log,
                                                                      "graph", budget_s, started))

    blocks = [block(b, c) for b in batches for c in contexts]  # generators: nothing runs until walked

    offloaded = [h for h in hbms if h < 1.0]

    def strategy_check():
        b, c, h = batches[0], contexts[0], offloaded[0]
        # Walked right after the first block, when ``baselines`` holds its HBM 1.0 point at most (none if skipped).
        baseline = baselines[0] if baselines else None
        for opts in checks:
            name = opts["strategy"]
            try:
                m, why = grid.measure_one(b, c, h, lambda b, c, h, o=opts: run(b, c, h, strategy=o), log,
                                          f"graph, {name}", budget_s, started)
            except Exception as exc:  # noqa: BLE001 - an extra point must not cost the grid its file
                if (stop := interrupted_by(exc)) is not None:
                    raise stop from exc
                # The host strategies' CUDA paths are the least run code here, and the check comes early: its
                # failure is the point's error, and the grid goes on (a sticky CUDA error fails the next point
                # anyway, loudly).
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                m, why = None, f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
                log(f"  {why}")
            yield 0.0, opts, b, c, h, m, baseline, why

    if checks and not offloaded:
        log("--strategy-check: no check, --hbm lists no ratio below 1")
    walk = itertools.chain(blocks[0], strategy_check() if checks and offloaded else (), *blocks[1:])
    if compressed and not offloaded:  # said, not silently dropped (a script's HBM=1.0 override still runs the grid)
        log(f"--compressed {compressed:g}: no compressed check, --hbm lists no ratio below 1")
    if compressed and offloaded:  # the compressed check: the grid's first batch and context, against its own HBM 1.0
        check = grid.measure_grid(batches[:1], contexts[:1], offloaded, lambda b, c, h: run(b, c, h, compressed), [],
                                  log, f"graph, compressed {compressed:g}", budget_s, started)
        walk = itertools.chain(walk, ((compressed, chosen, *point) for point in check))

    def document() -> dict:
        """The calibration file of the points so far (the run's end, and each checkpoint)."""
        model_doc = predict.sim_model(shape, params)
        split = point_config(0.5, compressed, retier_every, shape.head_dim)
        policy = {"sink_tokens": split.sink_tokens, "recent_window": split.recent_window,
                  "retier_every": retier_every, "compressed_bits": split.compressed_bits,
                  "quant_group": split.quant_group}
        settings_strategy = chosen or {"strategy": "prefetch"}
        # Full and copy-free replays alternate, so the timed full steps span 2 * steps tokens after 2 * warmup.
        settings = {"steps": 2 * steps, "warmup": 2 * max(warmup, 1), "timed_steps": steps, "prefill": "synthetic",
                    "budget_s": budget_s, "sdpa": sdpa, "interleaved": True, "compressed": compressed, **policy,
                    **settings_strategy, "strategy_check": [o["strategy"] for o in checks]}
        fit = grid.layer_fit(model_doc, shape, baselines, settings["warmup"], settings["steps"], copy_rate)
        # The file is a CUDA-graph measurement only if every measured point of the run's strategy was replayed
        # from a graph (a strategy check's point whose capture failed says cuda-eager itself, and does not
        # relabel the grid).
        run_executor = next((e["executor"] for e in extras if "executor" in e
                             and e["strategy"] == settings_strategy["strategy"] and e["executor"] != executor),
                            executor)
        doc = grid.calibration_doc(command, run_executor, info, dev, shape, params, settings, link_doc, tflops,
                                   copy_rate, fit)
        per_point = [{k: e[k] for k in ("strategy", "fetch_share")} for e in extras]
        predict.add_predictions(doc, points, model_doc, {**policy, **(chosen or {})}, settings, profile, per_point)
        doc["points"] = [{**asdict(p), **extra} for p, extra in zip(points, extras)]
        calibrate.finish(doc)
        return doc

    def save_checkpoint() -> None:
        """The file so far, written over ``out`` after each point: if the process dies where no exception reaches
        Python (a hung CUDA call killed by the script's ``timeout -k``), the points measured before it are kept.
        The run's own end writes over it. A checkpoint that fails is said and skipped: it must not cost the run."""
        if checkpoint is None:
            return
        try:
            partial = document()
            partial["error"] = (f"unfinished: a checkpoint after {len(points)} points (the process ended before "
                                "the run did)")
            checkpoint(partial)
        except Exception as exc:  # noqa: BLE001 - the measurements matter more than their checkpoint
            log(f"  checkpoint not written: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}")

    stopped = None  # a grid point's own error ends the run, once the file keeps the points measured before it
    try:
        for share, opts, batch, context, hbm, m, baseline, why in walk:
            points.append(calibrate.ValidationPoint.measured(shape.name, batch, context, hbm, m, baseline, why))
            points[-1].compressed = point_config(hbm, share).compressed  # capped at 1 - hbm, as the point ran
            # Every point names the strategy it ran (or was to run: a failed or skipped check point too) and its share.
            extras.append({**graph_host.point_strategy(opts),
                           **({k: m[k] for k in ("step_ms_p10", "gpu_busy_ms", "gpu_busy_ms_p10", "gpu_busy_ms_p90",
                                                 "copy_ms", "h2d_gbps_in_step", "retier_ms", "tiers", "executor",
                                                 "capture_error", "strategy", "fetch_share", "host_ms")} if m else {})})
            if m and m["capture_error"]:
                log(f"  not captured ({m['capture_error']}): timed eagerly")
            if m:
                log(f"  step {m['step_ms']:.3f} ms (busy {m['gpu_busy_ms']:.3f}, stall {m['stall_ms']:.3f}), "
                    f"H2D {m['h2d_bytes'] / 1e6:.1f} MB/step"
                    + (f" at {m['prefetch_gbps']:.1f} GB/s alone" if m["prefetch_gbps"] else "")
                    + (f", host {m['host_ms']:.3f} ms" if m.get("host_ms") is not None else ""))
            save_checkpoint()
    except (Exception, calibrate.Terminated, KeyboardInterrupt) as exc:
        stopped = exc
        log(f"  stopped: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}; the file keeps the "
            f"{sum(p.measured_step_ms is not None for p in points)} points measured before it")
    doc = document()
    del model
    if stopped is None:
        free(dev)
        return doc
    doc["error"] = f"stopped after {len(points)} points: {type(stopped).__name__}: " \
                   f"{(str(stopped).splitlines() or [''])[0][:200]}"
    try:
        free(dev)
    except Exception:  # noqa: BLE001 - a sticky CUDA error fails this too; the file is still written
        pass
    raise calibrate.Unfinished(doc, stopped)


def run_validation_graph(shape_name=None, batches=DEFAULT_BATCHES, contexts=DEFAULT_CONTEXTS, hbms=DEFAULT_HBM,
                         device="cuda", steps: int = 16, warmup: int = 3, prefill: str = "synthetic", out=None,
                         sweep_sizes=None, command=None, log=lambda _m: None, budget_s=None, sdpa="no-cudnn",
                         profile=None, strategy: str = "prefetch", fetch_share: float | None = None,
                         compressed: float = 0.0, strategy_check="") -> dict:
    """``tiersim validate --executor graph``: :func:`run_graph` behind ``run_validation``'s signature."""
    if prefill != "synthetic":
        raise TiersimError(f"--prefill {prefill}: the graph executor fills its buffers with the synthetic prefill only")
    return run_graph(shape_name, batches, contexts, hbms, device=device, steps=steps, warmup=warmup, out=out,
                     budget_s=budget_s, sdpa=sdpa, profile=profile, sweep_sizes=sweep_sizes, command=command, log=log,
                     strategy=strategy, fetch_share=fetch_share, compressed=compressed, strategy_check=strategy_check)

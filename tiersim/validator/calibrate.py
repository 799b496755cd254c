"""One validation run: link sweep, decode grid, compute fit, simulator predictions, calibration JSON.

The JSON follows docs/file-formats.md (kind ``calibration``). ``link`` and ``compute`` are what the
simulator's ``apply_calibration`` reads; every measured point carries the calibrated simulator's
closed-form prediction and its error, so one file says both what the GPU did and how far the
model of it is off. Only torch, numpy and the numpy-only parts of the simulator are imported.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from tiersim import fileformat
from tiersim.errors import TiersimError
from tiersim.validator.options import DEFAULT_BATCHES, DEFAULT_CONTEXTS, DEFAULT_HBM
from tiersim.validator.predict import add_predictions, sim_model

DEFAULT_SHAPE = {"cuda": "r1-distill-qwen-7b", "cpu": "tiny"}
#: The CPU smoke mode proves the code path; a real model's shape there needs tens of GB and hours.
CPU_MAX_PARAMS = 200_000_000


class NoDeviceError(TiersimError):
    """CUDA was asked for (the default) and torch sees no CUDA device."""


class Terminated(BaseException):
    """SIGTERM (the GPU script's per-step ``timeout``) as an exception, so a run stops with its file written.

    A BaseException, as KeyboardInterrupt is: an ``except Exception`` that lets one bad point pass (the graph
    executor's strategy check) must not swallow it and run on past the step's time."""


class Unfinished(Exception):
    """A run stopped by an error (or :class:`Terminated`) after some points: ``doc`` is its file with the points
    measured before it (``doc["error"]`` says why it stopped). :func:`checked_run` writes it, then raises
    ``error`` again, so the run still fails loudly. Why: a GPU run is scarce, and an error at its grid's tenth
    point must not cost it the nine before."""

    def __init__(self, doc: dict, error: BaseException) -> None:
        super().__init__(str(error))
        self.doc, self.error = doc, error


def raise_on_sigterm() -> None:
    """Turn SIGTERM into :class:`Terminated` in this (main) thread, for the command-line runs."""
    import signal

    def stop(signum, _frame):
        raise Terminated(f"terminated by signal {signum} (a timeout?)")

    signal.signal(signal.SIGTERM, stop)


def resolve_device(device: str | None):
    """``cuda`` (the default) or ``cpu`` (smoke mode); a clear error when CUDA is missing."""
    import torch

    # Only None is the default: an empty --device (an unset shell variable, `--device "$DEV"`) is a mistake,
    # and taking it as cuda would run, or refuse for want of a GPU, a measurement nobody asked for.
    name = "cuda" if device is None else device.strip().lower()
    if not name:
        raise TiersimError(f"--device must be 'cuda', 'cuda:N' or 'cpu', got {device!r}")
    if name.startswith("cuda:") and not name[5:].isdigit():  # a typo, whatever the machine has
        raise TiersimError(f"--device must be 'cuda', 'cuda:N' or 'cpu', got {device!r}")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise NoDeviceError(
                f"no CUDA device: torch {torch.__version__} sees none; run on a GPU machine "
                "(scripts/gpu_validate.sh) or pass --device cpu for the smoke mode"
            )
        dev = torch.device(name)
        return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
    if name == "cpu":
        return torch.device("cpu")
    raise TiersimError(f"--device must be 'cuda', 'cuda:N' or 'cpu', got {device!r}")


def device_info(device) -> dict:
    import torch

    info = {"name": None, "driver": None, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - the validator needs it anyway
        pass
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        info["memory_gb"] = props.total_memory / 1e9
        info["driver"] = _nvidia_driver()
    else:
        info["name"] = f"cpu ({platform.processor() or platform.machine()})"
    return info


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip().splitlines()[0] or None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def base_gpu_preset(device_name: str | None) -> str:
    """The simulator preset whose unmeasured numbers (capacity, reserve) fit this device best: a lookup in
    the presets' device names (``presets.device_preset``)."""
    from tiersim.simulator.presets import device_preset

    return device_preset(device_name)


def check_grid(batches, contexts, hbms, steps: int, warmup: int, prefill: str, budget_s: float | None = None) -> None:
    """Refuse a bad grid before any GPU time is spent; messages name the option and the value."""
    from tiersim.validator.decode import PREFILLS

    for name, values, low in (("batch", batches, 1), ("context", contexts, 2)):
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise TiersimError(f"--{name}: values must be integers >= {low}, got {v!r}")
    for h in hbms:
        if not (0.0 < float(h) <= 1.0):
            raise TiersimError(f"--hbm: ratios must be in (0, 1], got {h!r}")
    if steps < 1:
        raise TiersimError(f"--steps must be >= 1, got {steps!r}")
    if budget_s is not None and not budget_s > 0:
        raise TiersimError(f"--budget-s must be > 0 seconds, got {budget_s!r}")
    if warmup < 1:
        raise TiersimError(f"--warmup must be >= 1 (the first decode step after prefill is cold), got {warmup!r}")
    if prefill not in PREFILLS:
        raise TiersimError(f"--prefill must be one of {', '.join(PREFILLS)}, got {prefill!r}")


def check_out(out) -> None:
    """Refuse an unwritable ``--out`` before the run, not after minutes of GPU time."""
    if out is None:
        return
    path = Path(out)
    if path.is_dir():
        raise TiersimError(f"--out: {path} is a directory; give a file name such as {path / 'h100.json'}")
    if path.suffix.lower() != ".json":
        raise TiersimError(f"--out: the calibration file must end in .json, got {str(path)!r}")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise TiersimError(f"--out: cannot create {path} (no writable folder {parent})")


# -- the run -----------------------------------------------------------------------------------
def run_validation(
    shape_name: str | None = None,
    batches=DEFAULT_BATCHES,
    contexts=DEFAULT_CONTEXTS,
    hbms=DEFAULT_HBM,
    device: str | None = "cuda",
    steps: int = 24,
    warmup: int = 4,
    prefill: str = "synthetic",
    out=None,
    sweep_sizes=None,
    command: str | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    budget_s: float | None = None,
    sdpa: str = "no-cudnn",
    profile=None,
) -> dict:
    """Measure everything, predict every point, write ``out`` atomically (when given); return the document.

    ``shape_name`` defaults to the 7B shape on CUDA and to ``tiny`` on the CPU (the smoke mode).
    ``budget_s`` bounds the decode grid: once it is spent the remaining points are listed as skipped,
    so a run on a borrowed GPU always ends with a file rather than being killed with nothing.
    """

    def measure(shape, batches, contexts, hbms, dev):
        return _measure(shape, batches, contexts, hbms, dev, steps, warmup, prefill, sweep_sizes, command, log,
                        budget_s, sdpa, profile)

    return checked_run(measure, shape_name, batches, contexts, hbms, device, steps, warmup, prefill, budget_s, sdpa,
                       out, profile, log)


def checked_run(measure, shape_name, batches, contexts, hbms, device, steps, warmup, prefill, budget_s, sdpa, out,
                profile, log) -> dict:
    """Either executor's run: every argument checked before any GPU time is spent, then
    ``measure(shape, batches, contexts, hbms, dev)`` on one CPU thread in smoke mode, the file written."""
    from tiersim.validator.sdpa import SDPA_CHOICES
    from tiersim.validator.shapes import get_shape, parameter_count

    batches, contexts = [int(b) for b in batches], [int(c) for c in contexts]
    hbms = [float(h) for h in hbms]
    dev = resolve_device(device)
    shape = get_shape(shape_name or DEFAULT_SHAPE[dev.type])
    if dev.type == "cpu" and parameter_count(shape) > CPU_MAX_PARAMS:
        raise TiersimError(
            f"--model-shape {shape.name} has {parameter_count(shape) / 1e9:.1f}B parameters: far too large for the "
            "CPU smoke mode, which only proves the code path; use --model-shape tiny (its default) on a CPU"
        )
    check_grid(batches, contexts, hbms, steps, warmup, prefill, budget_s)
    if sdpa not in SDPA_CHOICES:
        raise TiersimError(f"--sdpa must be one of {', '.join(SDPA_CHOICES)}, got {sdpa!r}")
    check_out(out)
    if profile is not None:
        from tiersim.simulator.profile import load_profile

        load_profile(profile)  # a missing or foreign file is refused before any GPU time is spent
    with single_threaded_cpu(dev):
        try:
            doc = measure(shape, batches, contexts, hbms, dev)
        except Unfinished as stop:
            kept = "no file was asked for (--out): nothing measured was kept"
            if out is not None:
                fileformat.write_document(out, stop.doc)
                kept = (f"wrote {out} with the {sum(p['measured_step_ms'] is not None for p in stop.doc['points'])} "
                        f"points measured before the run stopped")
                log(f"{kept} ({stop.doc['error']})")
            if isinstance(stop.error, KeyboardInterrupt):  # `tiersim validate`'s Ctrl-C / SIGTERM says what it kept
                raise KeyboardInterrupt(kept) from None
            raise stop.error from None
    if out is not None:
        fileformat.write_document(out, doc)
        log(f"wrote {out}")
    return doc


@contextlib.contextmanager
def single_threaded_cpu(dev):
    """CPU smoke mode runs torch on one thread (restored afterwards).

    Tiny tensors gain nothing from intra-op threads, and on a busy machine every parallel region
    can stall for milliseconds waiting for a descheduled worker: two orders of magnitude slower.
    """
    import torch

    if dev.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _measure(shape, batches, contexts, hbms, dev, steps, warmup, prefill, sweep_sizes, command, log,
             budget_s, sdpa="no-cudnn", profile=None) -> dict:

    from tiersim.hierarchy.config import TierConfig
    from tiersim.validator import compute, decode, grid, link
    from tiersim.validator.shapes import build_model

    info = device_info(dev)
    log(f"device: {info['name']} (torch {info['torch']}, CUDA {info['cuda']}, driver {info['driver']})")

    log("link sweep: pinned H2D / D2H / both, 4 KiB .. 64 MiB")
    link_doc = link.summarize_link(link.sweep(dev, sweep_sizes or link.SIZES))
    log(f"  h2d {link_doc['h2d_gbps']:.1f} GB/s, d2h {link_doc['d2h_gbps']:.1f} GB/s, "
        f"both {link_doc['bidir_total_gbps']:.1f} GB/s, latency {link_doc['copy_latency_us'] or 0:.2f} us")
    tflops, copy_rate = compute.matmul_tflops(dev), compute.copy_gbps(dev)
    log(f"compute: matmul {tflops:.1f} TFLOP/s, device copy {copy_rate:.0f} GB/s")

    log(f"building {shape.name} with random weights on {dev}")
    model = build_model(shape, dev)
    params = sum(p.numel() for p in model.parameters())
    defaults = TierConfig()
    policy = {"sink_tokens": defaults.sink_tokens, "recent_window": defaults.recent_window,
              "retier_every": defaults.retier_every}

    points, baselines = [], []

    def run(batch, context, hbm):
        return decode.run_point(model, batch, context, hbm, steps=steps, warmup=warmup, prefill=prefill, sdpa=sdpa)

    stopped: BaseException | None = None
    try:
        for batch, context, hbm, m, baseline, why in grid.measure_grid(batches, contexts, hbms, run, baselines, log,
                                                                       "decode", budget_s, time.monotonic()):
            points.append(ValidationPoint.measured(shape.name, batch, context, hbm, m, baseline, why))
            if m:
                stall = "not timed" if m["stall_ms"] is None else f"{m['stall_ms']:.3f} ms"  # CPU: no events
                log(f"  step {m['step_ms']:.3f} ms (baseline "
                    f"{'not run' if not baseline else format(baseline['step_ms'], '.3f')}), stall {stall},"
                    f" H2D {m['h2d_bytes'] / 1e6:.1f} MB/step")
    except (Exception, Terminated, KeyboardInterrupt) as exc:  # the points before it are kept (Unfinished)
        if not any(p.measured_step_ms is not None for p in points):
            raise
        stopped = exc
        log(f"  stopped: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}; the file keeps the "
            f"{sum(p.measured_step_ms is not None for p in points)} points measured before it")

    model_doc = sim_model(shape, params)
    probe = min(8, steps) if dev.type == "cuda" else 0
    settings = {"steps": steps, "warmup": warmup, "probe_steps": probe, "prefill": prefill, "budget_s": budget_s,
                "sdpa": sdpa,
                **policy}
    try:
        doc = grid.calibration_doc(command, "hf-eager", info, dev, shape, params, settings, link_doc, tflops,
                                   copy_rate, grid.layer_fit(model_doc, shape, baselines, warmup, steps, copy_rate))
        add_predictions(doc, points, model_doc, policy, settings, profile)
        doc["points"] = [asdict(p) for p in points]
        if table_note := doc.get("compute_model"):
            log(f"simulator: {table_note}")
        finish(doc)
    except Exception:
        if stopped is not None:  # too few points for a file: the stop is the error to report
            raise stopped from None
        raise
    if stopped is not None:
        doc["error"] = f"stopped after {len(points)} points: {type(stopped).__name__}: " \
                       f"{(str(stopped).splitlines() or [''])[0][:200]}"
        raise Unfinished(doc, stopped)
    return doc


@dataclass
class ValidationPoint:
    """One (shape, batch, context, hbm) point of the calibration file's ``points``: what the GPU did and
    what the calibrated simulator predicts; the file's keys are these fields (docs/file-formats.md)."""

    model_shape: str
    batch: int
    context: int
    hbm: float
    measured_step_ms: float | None = None  # median over the timed decode steps
    baseline_step_ms: float | None = None  # the same batch and context at hbm 1.0
    stall_ms: float | None = None
    h2d_bytes: int | None = None  # per timed step, whole batch, all layers
    d2h_bytes: int | None = None
    overhead_pct: float | None = None  # 100 * (measured / baseline - 1)
    simulated_step_ms: float | None = None  # filled by add_predictions
    simulated_stall_ms: float | None = None
    sim_error_pct: float | None = None  # 100 * (simulated / measured - 1)
    measured_step_ms_mean: float | None = None
    measured_step_ms_p90: float | None = None
    prefetch_gbps: float | None = None
    retiers: int | None = None
    tier_bytes: dict | None = None  # the cache's stats()["bytes"]
    error: str | None = None  # why the point has no measurement
    compressed: float = 0.0  # share of the context in the compressed tier (the graph executor's --compressed)

    @classmethod
    def measured(cls, shape: str, batch: int, context: int, hbm: float, m: dict | None, baseline: dict | None,
                 why: str | None) -> "ValidationPoint":
        """From a decode measurement ``m`` (None: not measured, for ``why``) and its hbm-1.0 baseline."""
        point = cls(shape, batch, context, hbm, error=None if m else why)
        if m:
            point.measured_step_ms, point.stall_ms = m["step_ms"], m["stall_ms"]
            point.h2d_bytes, point.d2h_bytes = m["h2d_bytes"], m["d2h_bytes"]
            point.measured_step_ms_mean, point.measured_step_ms_p90 = m["step_ms_mean"], m["step_ms_p90"]
            point.prefetch_gbps, point.retiers, point.tier_bytes = m["prefetch_gbps"], m["retiers"], m["tier_bytes"]
            point.compressed = m.get("compressed", 0.0)
        point.baseline_step_ms = baseline["step_ms"] if baseline else None
        if point.measured_step_ms is not None and point.baseline_step_ms:
            point.overhead_pct = 100.0 * (point.measured_step_ms - point.baseline_step_ms) / point.baseline_step_ms
        return point

    def predicted(self, step_ms: float, stall_ms: float) -> None:
        """Add the simulator's prediction for this measured point."""
        self.simulated_step_ms, self.simulated_stall_ms = step_ms, stall_ms
        self.sim_error_pct = 100.0 * (step_ms - self.measured_step_ms) / self.measured_step_ms


def finish(doc: dict) -> None:
    """The top-level lists and the summary against the issue's targets, in place (the overhead: lossless points)."""
    points = doc["points"]
    doc["sim_error_pct"] = [p["sim_error_pct"] for p in points if p["sim_error_pct"] is not None]
    doc["overhead_pct"] = [p["overhead_pct"] for p in points if p["overhead_pct"] is not None]
    errors = [abs(e) for e in doc["sim_error_pct"]]
    offloaded = [p for p in points if p["hbm"] < 1.0 and p["measured_step_ms"] is not None]
    prefetch = [p["prefetch_gbps"] for p in offloaded if p.get("prefetch_gbps")]
    peak = (doc.get("link") or {}).get("fit", {}).get("h2d", {}).get("peak_gbps")
    best_prefetch = max(prefetch) if prefetch else None
    doc["summary"] = {
        "median_abs_sim_error_pct": statistics.median(errors) if errors else None,
        "max_abs_sim_error_pct": max(errors) if errors else None,
        # prefetch's lossless points: a compressed check or a host strategy's point is another step's overhead
        "max_overhead_pct": max((p["overhead_pct"] for p in offloaded if not p.get("compressed")
                                 and p.get("strategy") in (None, "prefetch")), default=None),
        "prefetch_gbps_max": best_prefetch,
        "prefetch_share_of_peak_h2d": best_prefetch / peak if best_prefetch and peak else None,
    }

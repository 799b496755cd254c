"""What a simulation prices besides the tier split: the scenario, projected from a trace onto presets.

Inputs come from a trace (the policy's structure, churn, prompt length and DDR cover fractions;
the bundled SmolLM2 trace by default) and a reasoning-length distribution (MATH-500-like by
default) or a fixed context, projected onto a model and GPU preset. :func:`assemble` is the whole
assembly from the names a user types (presets, files, options) to a :class:`Scenario`: the CLI parses
options, calls it, and renders; the domain checks and the file loading live here, not in the CLI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from tiersim import fileformat
from tiersim.errors import TiersimError
from tiersim.hierarchy.config import TierConfig
from tiersim.simulator import analytic
from tiersim.simulator.analytic import Offload
from tiersim.simulator.presets import GPU, Model

PREFETCH_MODES = ("all", "cover99", "cover90")
MAX_BATCH = 1 << 16  # far beyond any batch that fits; keeps the workload arrays and time bounded
MAX_STEPS = 1_000_000
MAX_TOKENS = 10_000_000

#: What the simulator uses when no trace is available (the bundled one missing from an install).
#: Rounded from the bundled SmolLM2 capture; documented in docs/simulator.md.
SYNTHETIC_PROFILE = {
    "prompt_len": 128,
    "churn": (0.01, 0.0),  # 1% of the context swapped HBM <-> DDR at each re-tiering point
    "structure": TierConfig().structure(),  # the cache's defaults
    "cover": {"cover90": 0.5, "cover99": 0.8},  # share of the DDR tier holding 90% / 99% of its mass
    "mean_length": 3900.0,
}
SYNTHETIC_LABEL = "synthetic (bundled trace missing)"


@dataclass
class Scenario:
    """Everything a simulation needs besides the tier split."""

    model: Model
    gpu: GPU
    batch: int
    mean_length: float
    prompt_len: int
    churn: tuple[float, float]
    structure: TierConfig  # the trace's policy: its sinks, window, re-tier interval and bits (not its ratios)
    steps: int = 256
    sigma: float = 0.35
    seed: int = 0
    trace_label: str = "bundled"
    context: int | None = None  # fixed context: a lockstep batch starting at this many tokens
    cover: dict = field(default_factory=lambda: dict(SYNTHETIC_PROFILE["cover"]))
    prefetch: str = "all"
    #: Measured operator tables for this model and GPU (tiersim.simulator.profile), or None: the roofline.
    table: object = None
    #: Why the roofline is used when ``table`` is None (shown in the output).
    compute_note: str = "roofline (no --profile given)"
    #: Step-time model: "auto" (the fast path's recurrence unless copies compete on the link, then SimPy),
    #: "fast" or "simpy" (the reference). See tiersim.simulator.fastpath.
    engine: str = "auto"

    def prefetch_share(self) -> float:
        """Share of the DDR tier fetched per step under ``self.prefetch``."""
        if self.prefetch not in PREFETCH_MODES:
            raise TiersimError(f"--prefetch must be one of {', '.join(PREFETCH_MODES)}, got {self.prefetch!r}")
        return 1.0 if self.prefetch == "all" else float(self.cover[self.prefetch])

    def strategy(self) -> str:
        """The strategy this scenario's prefetch mode is: ``prefetch`` (``all``) or ``selective`` (a cover)."""
        return "prefetch" if self.prefetch == "all" else "selective"

    def policy(self, hbm: float, ddr: float, compressed: float, evict: float) -> Offload:
        """The split on this scenario's structure and prefetch mode (TierConfig checks the ratios)."""
        tiers = replace(self.structure, hbm=hbm, ddr=ddr, compressed=compressed, evict=evict)
        return Offload(tiers, prefetch=self.prefetch_share())


def scenario_from_trace(trace, model: Model, gpu: GPU, batch: int, mean_length: float | None,
                        steps: int = 256, seed: int = 0, label: str = "bundled", context: int | None = None,
                        prefetch: str = "all", projection: dict | None = None) -> Scenario:
    """A scenario projected from ``trace``: its policy structure, churn, DDR cover and prompt length
    (:func:`trace_projection`), or from an already computed ``projection`` of it.

    ``trace=None`` (and no projection) uses :data:`SYNTHETIC_PROFILE` (the label then says so).
    ``mean_length=None`` takes the trace's own generated lengths.
    """
    if not 1 <= batch <= MAX_BATCH:
        raise TiersimError(f"--batch must be between 1 and {MAX_BATCH}, got {batch}")
    if not 1 <= steps <= MAX_STEPS:
        raise TiersimError(f"--steps must be between 1 and {MAX_STEPS}, got {steps}")
    if context is not None and not 1 <= context <= MAX_TOKENS:
        raise TiersimError(f"--context must be between 1 and {MAX_TOKENS}, got {context}")
    if mean_length is not None and not (math.isfinite(mean_length) and 2 <= mean_length <= MAX_TOKENS):
        raise TiersimError(f"--lengths: mean length must be between 2 and {MAX_TOKENS} tokens, got {mean_length}")
    if prefetch not in PREFETCH_MODES:
        raise TiersimError(f"--prefetch must be one of {', '.join(PREFETCH_MODES)}, got {prefetch!r}")
    if projection is None:
        projection = SYNTHETIC_PROFILE if trace is None else trace_projection(trace)
        label = SYNTHETIC_LABEL if trace is None else label
    return Scenario(model, gpu, batch, float(mean_length or projection["mean_length"]), int(projection["prompt_len"]),
                    tuple(projection["churn"]), TierConfig.from_dict(projection["structure"]), steps=steps, seed=seed,
                    trace_label=label, context=context, cover=dict(projection["cover"]), prefetch=prefetch)


def trace_projection(trace) -> dict:
    """What the simulator takes from a trace, in :data:`SYNTHETIC_PROFILE`'s shape: the prompt length, the
    churn fit, the policy structure, the DDR cover shares and the mean generated length."""
    from tiersim.traces.synth import fit

    profile = fit(trace)
    structure = TierConfig.from_dict(trace.meta["policy"])  # the reader checked it; defaults fill what it omits
    a, b, _ = profile.churn["hbm_ddr"]
    cover = np.array(profile.cover, dtype=float)  # per layer: c90 mean, c90 std, c99 mean, c99 std
    has = cover[:, 2] > 0  # layers whose DDR tier was ever non-empty
    if has.any():
        shares = {"cover90": float(cover[has, 0].mean()), "cover99": float(cover[has, 2].mean())}
    else:
        shares = dict(SYNTHETIC_PROFILE["cover"])
    return {
        "prompt_len": max(int(round(profile.prompt_len)), 1),
        "churn": (float(a), float(b)),
        "structure": structure.structure(),
        "cover": shares,
        "mean_length": float(np.mean([s["new_tokens"] for s in trace.meta["sequences"]])),
    }


def projection_path(trace: Path) -> Path:
    """The sidecar beside a trace file that holds its projection (kind ``trace-projection``).

    The bundled trace ships with one: planning on it then reads a small JSON instead of importing pandas and
    fitting a Parquet file (over a second of a `tiersim capacity` run)."""
    return trace.with_name(trace.stem + ".projection.json")


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def bundled_projection() -> dict | None:
    """The bundled trace's projection from its sidecar, or None when the sidecar is missing, unreadable or
    was made from another file than the bundled trace (then the trace is read and fitted as any other)."""
    import tiersim.traces as traces  # looked up at call time: tests point it at a missing trace

    trace = traces.default_trace_path()
    sidecar = projection_path(trace)
    if not (trace.exists() and sidecar.exists()):
        return None
    try:
        doc, _ = fileformat.read(sidecar, [fileformat.TRACE_PROJECTION], label="bundled trace projection")
    except TiersimError:
        return None
    if doc.get("trace_sha256") != _sha256(trace):
        return None
    return doc["projection"]


def write_bundled_projection() -> Path:
    """Refit the bundled trace and rewrite its sidecar (scripts/refresh_bundled_projection.py)."""
    from tiersim.traces import default_trace_path, read

    trace = default_trace_path()
    path = projection_path(trace)
    fileformat.write_document(path, {**fileformat.header(fileformat.TRACE_PROJECTION), "trace_sha256": _sha256(trace),
                                     "projection": trace_projection(read(trace))})
    return path


def workload(scenario: Scenario, policy: Offload, batch: int, steps: int) -> analytic.Workload:
    """The batch's token counts per step: staggered reasoning lengths, or a lockstep fixed context."""
    if scenario.context is not None:
        # Every slot holds `context + s` tokens at step s; none finishes within the run.
        lengths = np.full(batch, steps + 2, dtype=np.int64)
        return analytic.build_workload(policy, batch, lengths, scenario.context - 1, steps,
                                       churn=scenario.churn, seed=scenario.seed, lockstep=True)
    rng = np.random.default_rng(scenario.seed)
    lengths = analytic.sample_lengths(batch, scenario.mean_length, scenario.sigma, rng)
    return analytic.build_workload(policy, batch, lengths, scenario.prompt_len, steps,
                                   churn=scenario.churn, seed=scenario.seed)




def load_trace(path: str | Path | None):
    """The trace to project from: ``path``, else the bundled SmolLM2 capture, else None (an install
    without the package data: callers fall back to :data:`SYNTHETIC_PROFILE` and say so)."""
    from tiersim.traces import default_trace_path, read

    if path:
        return read(path)
    bundled = default_trace_path()
    return read(bundled) if bundled.exists() else None


def assumed_link_note(hw, gpu: str) -> str | None:
    """The one-line note when a GPU's host link is assumed, not measured (issue 22: every host link is a cited
    measurement or says it is not); None when it is measured. Shared by simulate / capacity and serve."""
    if not hw.link_assumed:
        return None
    return (f"the {gpu} preset's host link ({hw.h2d_bw / 1e9:.0f} GB/s H2D, {hw.d2h_bw / 1e9:.0f} D2H) is an "
            f"assumption, not a measurement of this GPU ({hw.link_source.removeprefix('assumed: ')})")


def assemble(batch: int, model: str = "r1-distill-qwen-7b", model_config: str | Path | None = None,
             gpu: str = "h100-sxm", trace: str | Path | None = None, lengths: str | None = None,
             context: int | None = None, prefetch: str = "all", steps: int = 256, seed: int = 0,
             calibration: str | Path | None = None, profile: str | Path | None = None, host_floor: bool = True,
             host_overhead: str = "none", engine: str = "auto", warn=None, engine_overhead: str = "none") -> Scenario:
    """The scenario ``tiersim simulate`` / ``capacity`` price, from what the user named.

    Presets or a ``config.json``, a calibration and an operator profile (each refused when measured on
    another device than ``gpu``), the per-step host overhead, the trace's projection (the bundled one's
    sidecar when no ``trace`` is given: no pandas, no fit) and the lengths. Bad input raises
    :class:`TiersimError` with the option's name. ``warn(text)`` is told when the bundled trace is missing
    and the synthetic profile stands in (the CLI prints it on stderr).
    """
    from tiersim.simulator.calibration import apply_calibration, host_bound_note, load_calibration
    from tiersim.simulator.fastpath import ENGINES
    from tiersim.simulator.presets import HOST_OVERHEADS, get_gpu, get_model, model_from_config, with_host_overhead
    from tiersim.simulator.profile import check_device, load_profile, table_for
    from tiersim.traces.lengths import parse_lengths

    if batch < 1:
        raise TiersimError(f"--batch must be >= 1, got {batch}")
    if steps < 1:
        raise TiersimError(f"--steps must be >= 1, got {steps}")
    if context is not None and context < 1:
        raise TiersimError(f"--context must be >= 1, got {context}")
    if context is not None and lengths is not None:
        raise TiersimError(f"use either --context ({context}) or --lengths ({lengths}), not both")
    if prefetch not in PREFETCH_MODES:
        raise TiersimError(f"--prefetch must be one of {', '.join(PREFETCH_MODES)}, got {prefetch!r}")
    if host_overhead not in HOST_OVERHEADS:
        raise TiersimError(f"--host-overhead must be one of {', '.join(HOST_OVERHEADS)}, got {host_overhead!r}")
    if engine not in ENGINES:
        raise TiersimError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    lengths = lengths or "math500"
    mean_length = None if lengths.strip().lower() == "trace" else parse_lengths(lengths)
    mdl = model_from_config(model_config) if model_config else get_model(model)
    hw = get_gpu(gpu)
    if calibration:
        cal = load_calibration(calibration)
        check_device(cal, gpu, "--calibration")
        if warn is not None and (note := host_bound_note(cal, "--calibration")):
            warn(note)
        hw = apply_calibration(hw, cal)
    if warn is not None and (note := assumed_link_note(hw, gpu)):
        warn(note)
    if host_overhead != "none":
        hw = with_host_overhead(hw, host_overhead)
    if engine_overhead != "none" or host_overhead == "none":  # an engine preset (issue 22); named in the output
        from tiersim.simulator import engines

        if host_overhead != "none":
            raise TiersimError(f"use either --host-overhead {host_overhead} or --engine-overhead {engine_overhead}, "
                               "not both (--engine-overhead vllm-sync is --host-overhead sync)")
        hw = engines.apply(hw, engine_overhead, mdl.num_layers)
    table, note = None, "roofline (no --profile given)"
    if profile:
        doc = load_profile(profile)
        check_device(doc, gpu, "--profile")
        table, note = table_for(doc, mdl)
        if table is not None and not host_floor:
            table.drop_host()
    # The bundled trace's projection ships beside it: no pandas import, no fit, for the default run.
    projection = None if trace else bundled_projection()
    loaded = load_trace(trace) if projection is None else None
    if loaded is None and projection is None:
        if mean_length is None:
            raise TiersimError("--lengths trace: no trace to take lengths from (the bundled trace is missing)")
        if warn is not None:
            warn("the bundled trace is missing from this install; using the synthetic profile documented in "
                 "docs/simulator.md")
    label = str(trace) if trace else ("bundled" if loaded is not None or projection else SYNTHETIC_LABEL)
    scenario = scenario_from_trace(loaded, mdl, hw, batch, mean_length, steps=steps, seed=seed, label=label,
                                   context=context, prefetch=prefetch, projection=projection)
    return replace(scenario, table=table, compute_note=note, engine=engine)

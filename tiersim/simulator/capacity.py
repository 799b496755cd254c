"""Planning: one config through the engine (`simulate`), and the grid behind `tiersim capacity`.

Inputs come from a trace (the policy's structure, churn, prompt length and DDR cover fractions;
the bundled SmolLM2 trace by default) and a reasoning-length distribution (MATH-500-like by
default) or a fixed context, projected onto a model and GPU preset. Overhead is measured against
the same batch with everything in HBM, which may not fit: rows say so instead of hiding it.
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
from tiersim.simulator.analytic import GB, Offload
from tiersim.simulator.fastpath import simulate
from tiersim.simulator.presets import GPU, Model
from tiersim.simulator.rows import CapacityRow

GRID_HBM = (1.0, 0.75, 0.5, 0.25)
GRID_EVICT = (0.0, 0.03, 0.1)
SWEEP_BATCHES = (1, 8, 16, 32, 64, 128, 256)
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


def fits(mem: analytic.Memory, gpu: GPU) -> bool:
    """The one definition of "fits": peak HBM within the GPU's HBM and the DDR tier within the host
    memory lent to this GPU, both over the simulated steps of the staggered batch."""
    return bool(fit_mask(mem, gpu))


def fit_mask(mem: analytic.Memory, gpu: GPU) -> np.ndarray:
    """:func:`fits` elementwise, for a :class:`~analytic.Memory` whose fields are arrays over batch sizes."""
    return np.logical_and(np.asarray(mem.peak) <= gpu.hbm_bytes, np.asarray(mem.ddr) <= gpu.host_bytes)


#: Memory the search reads, as columns of analytic.COUNT_KEYS.
_PEAK_COLUMNS = [analytic.COUNT_KEYS.index(k) for k in ("full_context", "hbm", "compressed", "ddr")]


def largest_batch(scenario: Scenario, policy: Offload, steps: int | None = None) -> int:
    """The one definition of "largest batch": the largest B whose workload (the one `run` simulates:
    seed, lengths, steps) :func:`fits` while B + 1 does not (0 when one sequence does not fit; capped at MAX_BATCH).

    A larger batch adds slots to the same ones (lengths and phases are drawn slot by slot from the
    seed), so its token counts only grow with B and the first B that does not fit ends the search.
    One pass adds the slots in order, keeping the per-step totals, and checks every B on the way: the
    cost is one workload of the answer's size (the per-step peaks of every prefix come from a running
    sum), not a bisection of workloads. In a lockstep batch (``--context``) every slot holds the same,
    so the peaks are B times one slot's and every B is checked at once.
    """
    steps = steps or scenario.steps
    model, gpu = scenario.model, scenario.gpu
    if scenario.context is not None:
        one = workload(scenario, policy, 1, steps)
        batches = np.arange(1, MAX_BATCH + 1, dtype=float)
        peaks = [batches * float(getattr(one, k).max()) for k in ("full_context", "hbm", "compressed", "ddr")]
        ok = fit_mask(analytic.memory_at_peaks(model, gpu, policy, batches, *peaks), gpu)
        return MAX_BATCH if ok.all() else int(np.argmin(ok))
    lengths = analytic.sample_lengths(MAX_BATCH, scenario.mean_length, scenario.sigma,
                                      np.random.default_rng(scenario.seed))
    phase = analytic.slot_phases(lengths, scenario.seed, lockstep=False)
    table = analytic.position_counts(policy, int(lengths.max()), scenario.prompt_len, scenario.churn)
    table = table[_PEAK_COLUMNS]
    used = np.flatnonzero(table.any(axis=1))  # a tier the policy never fills stays at 0
    table = np.ascontiguousarray(table[used])
    totals = np.zeros((len(used), steps))
    lo, rows = 0, 16  # checked in chunks that grow: a small answer costs a small pass
    while lo < MAX_BATCH:
        hi = min(lo + rows, MAX_BATCH)
        peaks = np.zeros((len(_PEAK_COLUMNS), hi - lo))
        for i, (p, n) in enumerate(zip(phase[lo:hi].tolist(), lengths[lo:hi].tolist())):
            analytic.add_slot(totals, table, p, n)
            peaks[used, i] = totals.max(axis=1)  # batch lo + i + 1's peak per column
        ok = fit_mask(analytic.memory_at_peaks(model, gpu, policy, np.arange(lo + 1, hi + 1, dtype=float),
                                               *peaks), gpu)
        if not ok.all():
            return lo + int(np.argmin(ok))
        lo, rows = hi, 2 * rows
    return MAX_BATCH


def run(scenario: Scenario, policy: Offload, batch: int | None = None, steps: int | None = None,
        largest: bool = True):
    """One config: (summary row without overhead, per-step timeline dict).

    ``largest=False`` skips the largest-batch search (``max_batch`` is then None).
    """
    batch = batch or scenario.batch
    steps = steps or scenario.steps
    work = workload(scenario, policy, batch, steps)
    model, gpu = scenario.model, scenario.gpu
    costs = analytic.layer_costs(model, gpu, policy, work, scenario.table, scenario.compute_note)
    result = simulate(costs, model.num_layers, gpu, scenario.engine)
    mem = analytic.memory(model, gpu, policy, work)
    step = result.step_time
    row = CapacityRow.simulated(policy, batch, steps, work, mem, gpu, result, costs.compute_model, fits(mem, gpu),
                                largest_batch(scenario, policy, steps) if largest else None).as_dict()
    weights = mem.weights / GB
    reserved = (mem.activations + mem.reserved) / GB
    per_token = model.kv_bytes_per_token / GB
    comp_ratio = analytic.COMPRESSED_BITS[policy.tiers.compressed_bits] / (8 * model.kv_dtype_bytes)
    kv_hbm = work.hbm * per_token + work.compressed * per_token * comp_ratio
    staging = mem.staging / GB
    n = len(step)
    timeline = {
        "step": work.steps,
        "context_tokens_mean": work.full_context / batch,
        "weights_gb": np.full(n, weights),
        "kv_hbm_gb": kv_hbm,
        "staging_gb": np.full(n, staging),
        "activations_gb": np.full(n, reserved),
        "free_gb": gpu.hbm_bytes / GB - weights - kv_hbm - staging - reserved,
        "hbm_capacity_gb": np.full(n, gpu.hbm_bytes / GB),
        "h2d_gb": result.h2d_bytes / GB,
        "d2h_gb": result.d2h_bytes / GB,
        "compute_ms": result.compute * 1e3,
        "stall_ms": result.stall * 1e3,
        "step_ms": step * 1e3,
    }
    return row, timeline


def closed_form_row(scenario: Scenario, policy: Offload, batch: int) -> dict:
    """The sweep's cell: `run`'s memory and times from ``analytic.closed_form`` instead of the engine."""
    work = workload(scenario, policy, batch, scenario.steps)
    model, gpu = scenario.model, scenario.gpu
    costs = analytic.layer_costs(model, gpu, policy, work, scenario.table, scenario.compute_note)
    step, stall = analytic.closed_form(costs, model.num_layers)
    mem = analytic.memory(model, gpu, policy, work)
    return {
        **policy.tiers.ratios(),
        "batch": batch, "steps": scenario.steps, "method": "closed form",
        "context_tokens_mean": round(work.context_mean, 1),
        "context_tokens_peak": round(float(work.full_context.max()) / batch, 1),
        "hbm_saved_gb": mem.saved / GB, "peak_hbm_gb": mem.peak / GB, "fits": fits(mem, gpu),
        "step_ms": float(step.mean() * 1e3), "stall_ms": float(stall.mean() * 1e3),
    }


def with_overhead(row: dict, baseline: dict) -> dict:
    row = dict(row)
    # Rounded far below any reported digit, so float noise between event orders is not "-0.0%".
    row["overhead_pct"] = round((row["step_ms"] / baseline["step_ms"] - 1.0) * 100.0, 9) + 0.0
    row["baseline_fits"] = baseline["fits"]
    return row


def grid_policies(scenario: Scenario, hbm_ratios=GRID_HBM, evicts=GRID_EVICT) -> list[Offload]:
    """The capacity grid: each HBM ratio (capped at 1 - evict) × each eviction ratio, the rest in DDR."""
    seen, out = set(), []
    for evict in evicts:
        for h in hbm_ratios:
            hbm = round(min(h, 1.0 - evict), 6)
            ddr = max(round(1.0 - hbm - evict, 6), 0.0) + 0.0
            if (hbm, evict) not in seen:
                seen.add((hbm, evict))
                out.append(scenario.policy(hbm, ddr, 0.0, evict))
    return out


def baseline_policy(scenario: Scenario) -> Offload:
    """Everything in HBM: the reference every overhead is measured against."""
    return scenario.policy(1.0, 0.0, 0.0, 0.0)


def run_row(job: tuple) -> dict:
    """One simulation of the capacity study, ``(scenario, policy, batch, steps)`` -> its summary row.

    The unit ``tiersim capacity --ray`` makes a Ray task of: self-contained and deterministic (seeded),
    so where it runs changes no digit.
    """
    scenario, policy, batch, steps = job
    return run(scenario, policy, batch=batch, steps=steps)[0]


def capacity_jobs(scenario: Scenario) -> list[tuple]:
    """Every SimPy run :func:`grid_result` needs, each once: the baseline and the grid at the scenario's batch.
    (The batch sweep is closed-form rows, milliseconds each: not worth a task.)"""
    base_policy = baseline_policy(scenario)
    jobs = [(scenario, base_policy, scenario.batch, scenario.steps)]
    jobs += [(scenario, p, scenario.batch, scenario.steps) for p in grid_policies(scenario) if p != base_policy]
    return jobs


def capacity_ticks(scenario: Scenario) -> int:
    """How many times :func:`grid_result` ticks its progress: once per SimPy run, once per sweep batch."""
    return len(capacity_jobs(scenario)) + len(sweep_batches(scenario.batch))


def grid_result(scenario: Scenario, max_overhead: float = 10.0, progress=None, map_runs=None) -> dict:
    """The capacity document for one batch (:func:`range_result` is the one for a range): the grid at
    the scenario's batch, the best config, the largest batches and a batch sweep.

    ``map_runs(run_row, jobs, tick)`` runs the simulations (default: one after another here; the CLI's
    ``--ray`` passes one that makes each a Ray task) and returns their rows in order; ``progress``
    ticks once per simulation.
    """
    tick = progress or (lambda: None)
    jobs = capacity_jobs(scenario)
    if map_runs is None:
        results = []
        for job in jobs:
            results.append(run_row(job))
            tick()
    else:
        results = map_runs(run_row, jobs, tick)
    row_of = {(policy, batch, steps): row for (_, policy, batch, steps), row in zip(jobs, results)}
    base_policy = baseline_policy(scenario)
    baseline = row_of[(base_policy, scenario.batch, scenario.steps)]
    policies = grid_policies(scenario)
    rows = [with_overhead(row_of[(policy, scenario.batch, scenario.steps)], baseline) for policy in policies]
    best = best_row(rows, max_overhead)
    best_lossless = best_row([r for r in rows if r["evict"] == 0 and r["compressed"] == 0], max_overhead)
    sweep = []
    # The sweep runs as many steps as the grid, in the closed form (the engine agrees to 1% without
    # contention; a sweep of SimPy runs would cost seconds), and takes the grid's own rows at the
    # grid's batch, so the two tables agree cell for cell there.
    for batch in sweep_batches(scenario.batch):
        base = baseline if batch == scenario.batch else closed_form_row(scenario, base_policy, batch)
        for policy in policies:
            if policy.tiers.evict != 0.0:
                continue
            if batch == scenario.batch:
                row = next(r for r, p in zip(rows, policies) if p == policy)
            else:
                row = with_overhead(base if policy == base_policy else closed_form_row(scenario, policy, batch), base)
            sweep.append({k: row[k] for k in ("batch", "steps", "method", "hbm", "ddr", "evict", "hbm_saved_gb",
                                              "peak_hbm_gb", "overhead_pct", "stall_ms", "step_ms", "fits",
                                              "context_tokens_mean", "context_tokens_peak")})
        tick()
    return {
        **fileformat.stamp(fileformat.CAPACITY),
        "model": scenario.model.name,
        "gpu": scenario.gpu.name,
        "batch": scenario.batch,
        "trace": scenario.trace_label,
        "mean_length": scenario.mean_length,
        "context": scenario.context,
        "prompt_len": scenario.prompt_len,
        "prefetch": scenario.prefetch,
        "max_overhead_pct": max_overhead,
        "rows": rows,
        "max_batch_full_cache": baseline["max_batch"],
        "baseline": baseline,
        "best": best,
        "best_lossless": best_lossless,
        "batch_sweep": sweep,
    }


def range_result(scenario: Scenario, max_overhead: float, answer: dict) -> dict:
    """The capacity document for a batch range: the planner's points are its rows (each with its
    strategy); no simulated grid or sweep (the points cover every batch of the range)."""
    rows = answer["points"]
    exact = [r for r in rows if not r["approximate"]]
    return {
        **fileformat.stamp(fileformat.CAPACITY),
        "model": scenario.model.name, "gpu": scenario.gpu.name, "batch": scenario.batch,
        "batches": answer["batches"], "trace": scenario.trace_label, "mean_length": scenario.mean_length,
        "context": scenario.context, "prompt_len": scenario.prompt_len, "prefetch": scenario.prefetch,
        "max_overhead_pct": max_overhead, "rows": rows,
        "max_batch_full_cache": answer["max_batch_full_cache"], "baseline": answer["full_cache"],
        "best": best_row(exact, max_overhead),
        "best_lossless": best_row([r for r in exact if r["evict"] == 0 and r["compressed"] == 0], max_overhead),
        "batch_sweep": [],
    }


def best_row(rows: list[dict], max_overhead: float) -> dict | None:
    """The row that saves the most HBM among those that fit within the overhead budget."""
    eligible = [r for r in rows if r["fits"] and r["overhead_pct"] <= max_overhead and r["hbm_saved_gb"] > 0]
    return max(eligible, key=lambda r: r["hbm_saved_gb"]) if eligible else None


def sweep_batches(batch: int) -> list[int]:
    return sorted(set(SWEEP_BATCHES) | {batch})


def load_trace(path: str | Path | None):
    """The trace to project from: ``path``, else the bundled SmolLM2 capture, else None (an install
    without the package data: callers fall back to :data:`SYNTHETIC_PROFILE` and say so)."""
    from tiersim.traces import default_trace_path, read

    if path:
        return read(path)
    bundled = default_trace_path()
    return read(bundled) if bundled.exists() else None

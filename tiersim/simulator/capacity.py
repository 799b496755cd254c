"""Planning: one config through the engine (`simulate`), and the grid behind `tiersim capacity`.

Inputs come from a trace (the policy's structure, churn, prompt length and DDR cover fractions;
the bundled SmolLM2 trace by default) and a reasoning-length distribution (MATH-500-like by
default) or a fixed context, projected onto a model and GPU preset. Overhead is measured against
the same batch with everything in HBM, which may not fit: rows say so instead of hiding it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tiersim import fileformat
from tiersim.errors import TiersimError
from tiersim.hierarchy.config import TierConfig
from tiersim.simulator import analytic
from tiersim.simulator.analytic import GB, Policy
from tiersim.simulator.engine import simulate
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

    def prefetch_share(self) -> float:
        """Share of the DDR tier fetched per step under ``self.prefetch``."""
        if self.prefetch not in PREFETCH_MODES:
            raise TiersimError(f"--prefetch must be one of {', '.join(PREFETCH_MODES)}, got {self.prefetch!r}")
        return 1.0 if self.prefetch == "all" else float(self.cover[self.prefetch])

    def policy(self, hbm: float, ddr: float, compressed: float, evict: float) -> Policy:
        for name, value in (("hbm", hbm), ("ddr", ddr), ("compressed", compressed), ("evict", evict)):
            if not 0.0 <= value <= 1.0:
                raise TiersimError(f"--{name} must be in [0, 1], got {value}")
        total = hbm + ddr + compressed + evict
        if abs(total - 1.0) > 1e-6:
            raise TiersimError(
                f"tier ratios must sum to 1 (hbm={hbm} + ddr={ddr} + compressed={compressed} + evict={evict} = {total:g})"
            )
        s = self.structure
        return Policy(hbm, ddr, compressed, evict, sink_tokens=s.sink_tokens, recent_window=s.recent_window,
                      retier_every=s.retier_every, compressed_bits=s.compressed_bits, prefetch=self.prefetch_share())


def scenario_from_trace(trace, model: Model, gpu: GPU, batch: int, mean_length: float | None,
                        steps: int = 256, seed: int = 0, label: str = "bundled", context: int | None = None,
                        prefetch: str = "all") -> Scenario:
    """Fit churn and DDR cover on ``trace`` and take its policy structure and prompt length.

    ``trace=None`` uses :data:`SYNTHETIC_PROFILE` (the label then says so). ``mean_length=None``
    takes the trace's own generated lengths.
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
    if trace is None:
        prof = SYNTHETIC_PROFILE
        return Scenario(model, gpu, batch, float(mean_length or prof["mean_length"]), prof["prompt_len"],
                        prof["churn"], TierConfig(), steps=steps, seed=seed, trace_label=SYNTHETIC_LABEL,
                        context=context, cover=dict(prof["cover"]), prefetch=prefetch)
    from tiersim.traces.synth import fit

    profile = fit(trace)
    structure = TierConfig.from_dict(trace.meta["policy"])  # the reader checked it; defaults fill what it omits
    if mean_length is None:  # the trace's own lengths
        mean_length = float(np.mean([s["new_tokens"] for s in trace.meta["sequences"]]))
    a, b, _ = profile.churn["hbm_ddr"]
    cover = np.array(profile.cover, dtype=float)  # per layer: c90 mean, c90 std, c99 mean, c99 std
    has = cover[:, 2] > 0  # layers whose DDR tier was ever non-empty
    if has.any():
        shares = {"cover90": float(cover[has, 0].mean()), "cover99": float(cover[has, 2].mean())}
    else:
        shares = dict(SYNTHETIC_PROFILE["cover"])
    return Scenario(model, gpu, batch, mean_length, max(int(round(profile.prompt_len)), 1), (a, b), structure,
                    steps=steps, seed=seed, trace_label=label, context=context, cover=shares, prefetch=prefetch)


def workload(scenario: Scenario, policy: Policy, batch: int, steps: int) -> analytic.Workload:
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
    return bool(mem.peak <= gpu.hbm_bytes and mem.ddr <= gpu.host_bytes)


def fits_at(scenario: Scenario, policy: Policy, batch: int, steps: int | None = None) -> bool:
    """Whether ``batch`` slots fit: the same workload `run` simulates (seed, lengths, steps)."""
    work = workload(scenario, policy, batch, steps or scenario.steps)
    return fits(analytic.memory(scenario.model, scenario.gpu, policy, work), scenario.gpu)


def largest_batch(scenario: Scenario, policy: Policy, steps: int | None = None,
                  context_hint: float | None = None) -> int:
    """The one definition of "largest batch": the largest B for which :func:`fits_at` holds while
    B + 1 does not (0 when one sequence does not fit; capped at MAX_BATCH).

    A larger batch adds slots to the same ones (lengths and phases are drawn slot by slot from the
    seed), so its token counts only grow and a search is exact. It starts from the static estimate
    (every sequence at ``context_hint`` tokens, by default the peak mean context of the scenario's
    batch), steps out exponentially from there, then bisects.
    """
    steps = steps or scenario.steps
    ok = lambda b: fits_at(scenario, policy, b, steps)  # noqa: E731
    if not ok(1):
        return 0
    if context_hint is None:
        probe = workload(scenario, policy, scenario.batch, steps)
        context_hint = float(probe.full_context.max()) / scenario.batch
    guess = min(max(int(analytic.max_batch(scenario.model, scenario.gpu, policy, context_hint)), 1), MAX_BATCH)
    # The peak context per sequence of a staggered batch shrinks towards the mean as the batch grows:
    # one more estimate at the first guess's size lands within a few sequences.
    near = workload(scenario, policy, guess, steps)
    guess = analytic.max_batch(scenario.model, scenario.gpu, policy, float(near.full_context.max()) / guess)
    guess = min(max(int(guess), 1), MAX_BATCH)
    step = max(1, guess // 500)
    if ok(guess):
        lo, hi = guess, None
        while lo < MAX_BATCH:
            nxt = min(MAX_BATCH, lo + step)
            if not ok(nxt):
                hi = nxt
                break
            lo, step = nxt, step * 2
        if hi is None:
            return MAX_BATCH
    else:
        lo, hi = 1, guess
        while (nxt := hi - step) > 1:
            if ok(nxt):
                lo = nxt
                break
            hi, step = nxt, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def run(scenario: Scenario, policy: Policy, batch: int | None = None, steps: int | None = None,
        largest: bool = True):
    """One config: (summary row without overhead, per-step timeline dict).

    ``largest=False`` skips the largest-batch search (``max_batch`` is then None).
    """
    batch = batch or scenario.batch
    steps = steps or scenario.steps
    work = workload(scenario, policy, batch, steps)
    model, gpu = scenario.model, scenario.gpu
    costs = analytic.layer_costs(model, gpu, policy, work, scenario.table, scenario.compute_note)
    result = simulate(costs, model.num_layers, gpu)
    mem = analytic.memory(model, gpu, policy, work)
    max_batch = largest_batch(scenario, policy, steps, float(work.full_context.max()) / batch) if largest else None
    row = CapacityRow.simulated(policy, batch, steps, work, mem, gpu, result, costs.compute_model, fits(mem, gpu),
                                max_batch).as_dict()
    step = result.step_time
    weights = mem.weights / GB
    reserved = (mem.activations + mem.reserved) / GB
    per_token = model.kv_bytes_per_token / GB
    comp_ratio = analytic.COMPRESSED_BITS[policy.compressed_bits] / (8 * model.kv_dtype_bytes)
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


def closed_form_row(scenario: Scenario, policy: Policy, batch: int) -> dict:
    """The sweep's cell: `run`'s memory and times from ``analytic.closed_form`` instead of the engine."""
    work = workload(scenario, policy, batch, scenario.steps)
    model, gpu = scenario.model, scenario.gpu
    costs = analytic.layer_costs(model, gpu, policy, work, scenario.table, scenario.compute_note)
    step, stall = analytic.closed_form(costs, model.num_layers)
    mem = analytic.memory(model, gpu, policy, work)
    return {
        "hbm": policy.hbm, "ddr": policy.ddr, "compressed": policy.compressed, "evict": policy.evict,
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


def grid_policies(scenario: Scenario, hbm_ratios=GRID_HBM, evicts=GRID_EVICT) -> list[Policy]:
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


def baseline_policy(scenario: Scenario) -> Policy:
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
    """Every SimPy run :func:`capacity` needs, each once: the baseline and the grid at the scenario's batch.
    (The batch sweep is closed-form rows, milliseconds each: not worth a task.)"""
    base_policy = baseline_policy(scenario)
    jobs = [(scenario, base_policy, scenario.batch, scenario.steps)]
    jobs += [(scenario, p, scenario.batch, scenario.steps) for p in grid_policies(scenario) if p != base_policy]
    return jobs


def capacity_ticks(scenario: Scenario) -> int:
    """How many times :func:`capacity` ticks its progress: once per SimPy run, once per sweep batch."""
    return len(capacity_jobs(scenario)) + len(sweep_batches(scenario.batch))


def capacity(scenario: Scenario, max_overhead: float = 10.0, progress=None, map_runs=None) -> dict:
    """The grid at the scenario's batch, the best config, the largest batches and a batch sweep.

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
            if policy.evict != 0.0:
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

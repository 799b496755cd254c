"""Planning: one config through the engine (`run`), "fits", "largest batch", and the grid behind
`tiersim capacity` with its batch sweep.

Overhead is measured against the same batch with everything in HBM, which may not fit: rows say so
instead of hiding it. The scenario (what is priced besides the split) is :mod:`tiersim.simulator.scenario`;
its names are re-exported here, where callers have always found them.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from tiersim import fileformat
from tiersim.simulator import analytic
from tiersim.simulator.analytic import GB, Offload
from tiersim.simulator.presets import GPU
from tiersim.simulator.rows import Row, overhead_pct
from tiersim.simulator.scenario import (  # noqa: F401  (re-exported: the names' old home)
    MAX_BATCH, MAX_STEPS, MAX_TOKENS, PREFETCH_MODES, SYNTHETIC_LABEL, SYNTHETIC_PROFILE, Scenario, assemble,
    bundled_projection, load_trace, projection_path, scenario_from_trace, trace_projection, workload,
    write_bundled_projection,
)
from tiersim.simulator.step import solve

GRID_HBM = (1.0, 0.75, 0.5, 0.25)
GRID_EVICT = (0.0, 0.03, 0.1)
SWEEP_BATCHES = (1, 8, 16, 32, 64, 128, 256)


def fits(mem: analytic.Memory, gpu: GPU) -> bool:
    """The one definition of "fits": peak HBM within the GPU's HBM and the DDR tier within the host
    memory lent to this GPU, both over the simulated steps of the staggered batch."""
    return bool(fit_mask(mem, gpu))


def fit_mask(mem: analytic.Memory, gpu: GPU) -> np.ndarray:
    """:func:`fits` elementwise, for a :class:`~analytic.Memory` whose fields are arrays over batch sizes."""
    return np.logical_and(*mem.fit_flags(gpu))


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


def priced(scenario: Scenario, policy: Offload, batch: int, steps: int, strategy: str | None = None,
           share: float | None = None):
    """(workload, the strategy's StepCosts, its memory at peak) for one config: what every solver times.

    ``strategy`` defaults to the scenario's (``prefetch``, or ``selective`` under ``--prefetch cover99|90``);
    ``share``: a splitting strategy's fixed split (``strategies.step_costs``), as a measurement ran it."""
    from tiersim.simulator.strategies import step_costs

    work = workload(scenario, policy, batch, steps)
    model, gpu = scenario.model, scenario.gpu
    name = strategy or scenario.strategy()
    # The share a fetch-some strategy takes (selective): the split's own under --prefetch cover99|90, else the
    # trace's 99% cover. Strategies that fetch everything ignore it.
    cover = policy.prefetch if policy.prefetch < 1.0 else float(scenario.cover["cover99"])
    costs = step_costs(name, model, gpu, policy, work, cover=cover, table=scenario.table, share=share,
                       note=scenario.compute_note)
    mem = analytic.memory(model, gpu, replace(policy, prefetch=costs.staged), work)
    return work, costs, mem


def run(scenario: Scenario, policy: Offload, batch: int | None = None, steps: int | None = None,
        largest: bool = True, strategy: str | None = None, share: float | None = None):
    """One config through the scenario's solver: (summary row without overhead, per-step timeline dict).

    ``largest=False`` skips the largest-batch search (``max_batch`` is then None); ``strategy`` is any
    registered strategy (default: the scenario's own), ``share`` its fixed split (default: its best).
    """
    batch = batch or scenario.batch
    steps = steps or scenario.steps
    model, gpu = scenario.model, scenario.gpu
    work, costs, mem = priced(scenario, policy, batch, steps, strategy, share)
    result = solve(costs, model.num_layers, gpu, scenario.engine)
    step = result.step_time
    row = Row.of(policy, costs, result, work, mem, gpu,
                 largest_batch(scenario, policy, steps) if largest else None).as_dict()
    weights = mem.weights / GB
    reserved = (mem.activations + mem.reserved) / GB
    per_token = model.kv_bytes_per_token / GB
    kv_hbm = work.hbm * per_token + work.compressed * per_token * analytic.compressed_ratio(model, policy.tiers)
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


def closed_form_row(scenario: Scenario, policy: Offload, batch: int, strategy: str | None = None) -> dict:
    """The sweep's cell: `run`'s row from the closed form instead of the scenario's solver (no largest batch)."""
    work, costs, mem = priced(scenario, policy, batch, scenario.steps, strategy)
    result = solve(costs, scenario.model.num_layers, scenario.gpu, "closed form")
    return Row.of(policy, costs, result, work, mem, scenario.gpu).as_dict()


def with_overhead(row: dict, baseline: dict) -> dict:
    """``row`` set against its all-in-HBM ``baseline``: ``overhead_pct`` and ``baseline_fits``."""
    return {**row, "overhead_pct": overhead_pct(row["step_ms"], baseline["step_ms"]), "baseline_fits": baseline["fits"]}


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
        "gpu_link": link_mark(scenario.gpu),
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
        "model": scenario.model.name, "gpu": scenario.gpu.name, "gpu_link": link_mark(scenario.gpu),
        "batch": scenario.batch,
        "batches": answer["batches"], "trace": scenario.trace_label, "mean_length": scenario.mean_length,
        "context": scenario.context, "prompt_len": scenario.prompt_len, "prefetch": scenario.prefetch,
        "max_overhead_pct": max_overhead, "rows": rows,
        "max_batch_full_cache": answer["max_batch_full_cache"], "baseline": answer["full_cache"],
        "best": best_row(exact, max_overhead),
        "best_lossless": best_row([r for r in exact if r["evict"] == 0 and r["compressed"] == 0], max_overhead),
        "batch_sweep": [],
    }


def link_mark(gpu) -> dict:
    """Where the GPU's host-link figures come from, in the file (issue 22: an assumed link says so)."""
    return {"assumed": gpu.link_assumed, "source": gpu.link_source}


def best_row(rows: list[dict], max_overhead: float) -> dict | None:
    """The row that saves the most HBM among those that fit within the overhead budget."""
    eligible = [r for r in rows if r["fits"] and r["overhead_pct"] <= max_overhead and r["hbm_saved_gb"] > 0]
    return max(eligible, key=lambda r: r["hbm_saved_gb"]) if eligible else None


def sweep_batches(batch: int) -> list[int]:
    return sorted(set(SWEEP_BATCHES) | {batch})

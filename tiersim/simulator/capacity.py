"""Planning: one config through the engine (`simulate`), and the grid behind `tiersim capacity`.

Inputs come from a trace (the policy's churn and the prompt length; the bundled SmolLM2 trace by
default) and a reasoning-length distribution (MATH-500-like by default), projected onto a model
and GPU preset. Overhead is measured against the same batch with everything in HBM, which may
not fit: rows say so instead of hiding it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiersim import __version__
from tiersim.errors import TiersimError
from tiersim.simulator import analytic
from tiersim.simulator.analytic import GB, Policy
from tiersim.simulator.engine import simulate
from tiersim.simulator.presets import GPU, Model

GRID_HBM = (1.0, 0.75, 0.5, 0.25)
GRID_EVICT = (0.0, 0.03, 0.1)
SWEEP_BATCHES = (1, 8, 16, 32, 64, 128, 256)


@dataclass
class Scenario:
    """Everything a simulation needs besides the tier split."""

    model: Model
    gpu: GPU
    batch: int
    mean_length: float
    prompt_len: int
    churn: tuple[float, float]
    structure: dict  # sinks, window, re-tier interval, compressed bits (from the trace's policy)
    steps: int = 256
    sigma: float = 0.35
    seed: int = 0
    trace_label: str = "bundled"

    def policy(self, hbm: float, ddr: float, compressed: float, evict: float) -> Policy:
        for name, value in (("hbm", hbm), ("ddr", ddr), ("compressed", compressed), ("evict", evict)):
            if not 0.0 <= value <= 1.0:
                raise TiersimError(f"--{name} must be in [0, 1], got {value}")
        total = hbm + ddr + compressed + evict
        if abs(total - 1.0) > 1e-6:
            raise TiersimError(
                f"tier ratios must sum to 1 (hbm={hbm} + ddr={ddr} + compressed={compressed} + evict={evict} = {total:g})"
            )
        return Policy(hbm, ddr, compressed, evict, **self.structure)


def scenario_from_trace(trace, model: Model, gpu: GPU, batch: int, mean_length: float | None,
                        steps: int = 256, seed: int = 0, label: str = "bundled") -> Scenario:
    """Fit churn on ``trace`` and take its policy structure and prompt length."""
    from tiersim.traces.synth import fit

    if batch < 1:
        raise TiersimError(f"--batch must be >= 1, got {batch}")
    if steps < 1:
        raise TiersimError(f"--steps must be >= 1, got {steps}")
    profile = fit(trace)
    policy = trace.meta["policy"]
    structure = {k: int(policy[k]) for k in ("sink_tokens", "recent_window", "retier_every", "compressed_bits")}
    sequences = trace.meta["sequences"]
    if mean_length is None:  # the trace's own lengths
        mean_length = float(np.mean([s["new_tokens"] for s in sequences]))
    a, b, _ = profile.churn["hbm_ddr"]
    return Scenario(model, gpu, batch, mean_length, max(int(round(profile.prompt_len)), 1), (a, b), structure,
                    steps=steps, seed=seed, trace_label=label)


def run(scenario: Scenario, policy: Policy, batch: int | None = None, steps: int | None = None):
    """One config: (summary row without overhead, per-step timeline dict)."""
    batch = batch or scenario.batch
    rng = np.random.default_rng(scenario.seed)
    lengths = analytic.sample_lengths(batch, scenario.mean_length, scenario.sigma, rng)
    work = analytic.build_workload(policy, batch, lengths, scenario.prompt_len, steps or scenario.steps,
                                   churn=scenario.churn, seed=scenario.seed)
    model, gpu = scenario.model, scenario.gpu
    costs = analytic.layer_costs(model, gpu, policy, work)
    result = simulate(costs, model.num_layers, gpu)
    mem = analytic.memory(model, gpu, policy, work)
    step = result.step_time
    row = {
        "hbm": policy.hbm, "ddr": policy.ddr, "compressed": policy.compressed, "evict": policy.evict,
        "batch": batch,
        "context_tokens_mean": round(work.context_mean, 1),
        "kv_full_gb": mem.kv_full / GB,
        "kv_hbm_gb": mem.kv_hbm / GB,
        "compressed_gb": mem.compressed / GB,
        "staging_gb": mem.staging / GB,
        "hbm_saved_gb": mem.saved / GB,
        "peak_hbm_gb": mem.peak / GB,
        "hbm_capacity_gb": gpu.hbm_bytes / GB,
        "fits": bool(mem.peak <= gpu.hbm_bytes),
        "step_ms": float(step.mean() * 1e3),
        "step_p50_ms": float(np.percentile(step, 50) * 1e3),
        "step_p99_ms": float(np.percentile(step, 99) * 1e3),
        "stall_ms": float(result.stall.mean() * 1e3),
        "compute_ms": float(result.compute.mean() * 1e3),
        "h2d_gb_per_step": float(result.h2d_bytes.mean() / GB),
        "d2h_gb_per_step": float(result.d2h_bytes.mean() / GB),
        "tokens_per_s": float(batch / step.mean()),
        "max_batch": analytic.max_batch(model, gpu, policy, work.full_context.max() / batch),
        "events": result.events,
    }
    weights = mem.weights / GB
    reserved = (mem.activations + mem.reserved) / GB
    per_token = model.kv_bytes_per_token / GB
    comp_ratio = analytic.COMPRESSED_BITS[policy.compressed_bits] / (8 * model.kv_dtype_bytes)
    kv_hbm = work.hbm * per_token + work.compressed * per_token * comp_ratio
    staging = mem.staging / GB
    timeline = {
        "step": work.steps,
        "context_tokens_mean": work.full_context / batch,
        "weights_gb": np.full(len(step), weights),
        "kv_hbm_gb": kv_hbm,
        "staging_gb": np.full(len(step), staging),
        "activations_gb": np.full(len(step), reserved),
        "free_gb": gpu.hbm_bytes / GB - weights - kv_hbm - staging - reserved,
        "hbm_capacity_gb": np.full(len(step), gpu.hbm_bytes / GB),
        "h2d_gb": result.h2d_bytes / GB,
        "d2h_gb": result.d2h_bytes / GB,
        "compute_ms": result.compute * 1e3,
        "stall_ms": result.stall * 1e3,
        "step_ms": step * 1e3,
    }
    return row, timeline


def with_overhead(row: dict, baseline: dict) -> dict:
    row = dict(row)
    row["overhead_pct"] = (row["step_ms"] / baseline["step_ms"] - 1.0) * 100.0
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


def capacity(scenario: Scenario, max_overhead: float = 10.0, progress=None) -> dict:
    """The grid at the scenario's batch, the best config, the largest batches and a batch sweep."""
    baseline_policy = scenario.policy(1.0, 0.0, 0.0, 0.0)
    policies = grid_policies(scenario)
    tick = progress or (lambda: None)
    baseline, _ = run(scenario, baseline_policy)
    tick()
    rows = []
    for policy in policies:
        row, _ = (baseline, None) if policy == baseline_policy else run(scenario, policy)
        rows.append(with_overhead(row, baseline))
        tick()
    eligible = [r for r in rows if r["fits"] and r["overhead_pct"] <= max_overhead and r["hbm_saved_gb"] > 0]
    best = max(eligible, key=lambda r: r["hbm_saved_gb"]) if eligible else None
    sweep = []
    sweep_steps = max(32, scenario.steps // 4)
    for batch in sorted(set(SWEEP_BATCHES) | {scenario.batch}):
        base, _ = run(scenario, baseline_policy, batch=batch, steps=sweep_steps)
        for policy in policies:
            if policy.evict != 0.0:
                continue
            row = base if policy == baseline_policy else run(scenario, policy, batch=batch, steps=sweep_steps)[0]
            row = with_overhead(row, base)
            sweep.append({k: row[k] for k in ("batch", "hbm", "ddr", "evict", "hbm_saved_gb", "peak_hbm_gb",
                                              "overhead_pct", "stall_ms", "step_ms", "fits")})
        tick()
    return {
        "kind": "capacity",
        "schema_version": 1,
        "tiersim_version": __version__,
        "model": scenario.model.name,
        "gpu": scenario.gpu.name,
        "batch": scenario.batch,
        "trace": scenario.trace_label,
        "mean_length": scenario.mean_length,
        "prompt_len": scenario.prompt_len,
        "max_overhead_pct": max_overhead,
        "rows": rows,
        "max_batch_full_cache": baseline["max_batch"],
        "baseline": baseline,
        "best": best,
        "batch_sweep": sweep,
    }


def load_trace(path: str | Path | None):
    """The trace to project from: ``path`` or the bundled SmolLM2 capture."""
    from tiersim.traces import default_trace_path, read

    return read(path if path else default_trace_path())

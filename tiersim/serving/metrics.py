"""What a serving run measured: per-request latencies, their percentiles, goodput at the SLOs, and the file.

TTFT is arrival to the end of the step that sampled the first token; TPOT the time per output token after it,
``(finish - first token) / (output - 1)``; E2E arrival to finish; queueing delay arrival to the first step that
prefilled any of the prompt. Goodput counts the requests per second that met both SLOs (DistServe's
definition): those requests over the run's makespan (:func:`goodput`), so it never exceeds what the engine
drained. Little's law is checked on the engine's own count of requests in the system (integrated over time by
the processes), against the per-request rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tiersim.simulator.presets import GB

PERCENTILES = (50, 90, 99)
#: Per-request columns of the output file, in order.
REQUEST_COLUMNS = ("request", "arrival_s", "prompt_tokens", "output_tokens", "queue_s", "ttft_s", "tpot_s", "e2e_s",
                   "finish_s", "preemptions", "spills", "spilled_peak_tokens", "recomputed_tokens", "meets_slo")


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 2.0
    tpot_s: float = 0.050


def percentiles(values: np.ndarray) -> dict[str, float]:
    """p50/p90/p99 and the mean over the values known (a stopped run leaves the rest NaN)."""
    values = values[np.isfinite(values)]
    if not len(values):
        return {f"p{p}": float("nan") for p in PERCENTILES} | {"mean": float("nan")}
    return {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES} | {"mean": float(np.mean(values))}


def request_rows(engine, slo: SLO) -> dict[str, np.ndarray]:
    """Columns of one row per request (:data:`REQUEST_COLUMNS`)."""
    rs = engine.requests
    col = lambda attr: np.array([getattr(r, attr) for r in rs])  # noqa: E731
    arrival, first, finish, output = col("arrival"), col("first_token"), col("finish"), col("output")
    ttft = first - arrival
    # One output token has no inter-token gap: its TPOT is undefined (NaN, left out of the percentiles), not 0 s,
    # which pulled the TPOT percentiles down and let the request pass the TPOT SLO on nothing.
    tpot = np.where(output > 1, (finish - first) / np.maximum(output - 1, 1), np.nan)
    tpot_ok = (tpot <= slo.tpot_s) | ((output <= 1) & np.isfinite(finish))
    return {"request": col("index"), "arrival_s": arrival, "prompt_tokens": col("prompt"), "output_tokens": output,
            "queue_s": col("scheduled") - arrival, "ttft_s": ttft, "tpot_s": tpot, "e2e_s": finish - arrival,
            "finish_s": finish, "preemptions": col("preemptions"), "spills": col("spills"),
            "spilled_peak_tokens": col("spilled_peak"), "recomputed_tokens": col("recomputed"),
            "meets_slo": (ttft <= slo.ttft_s) & tpot_ok}


def summary(engine, slo: SLO, rows: dict[str, np.ndarray] | None = None) -> dict:
    """The run's figures: latency percentiles (ms), goodput, throughput, memory events, Little's law."""
    rows = request_rows(engine, slo) if rows is None else rows
    n = len(rows["request"])
    makespan = float(engine.env.now)
    span = float(rows["arrival_s"][-1] - rows["arrival_s"][0]) if n > 1 else 0.0
    tp = engine.pricer.tp
    tokens = int(sum(r.generated for r in engine.requests))  # all asked for, unless the run stopped early
    seconds = {key: percentiles(rows[f"{key}_s"]) for key in ("ttft", "tpot", "e2e", "queue")}
    ms = {key: {k: v * 1e3 for k, v in p.items()} for key, p in seconds.items()}
    stopped = bool(getattr(engine, "stopped", False))
    in_system = engine.area / makespan if makespan > 0 else 0.0
    return {
        "requests": n,
        "offered_qps": (n - 1) / span if span > 0 else None,  # one request (or all at once): no rate
        "makespan_s": makespan,
        "ttft_ms": ms["ttft"], "tpot_ms": ms["tpot"], "e2e_ms": ms["e2e"], "queue_ms": ms["queue"],
        "within_slo": bool(not stopped and seconds["ttft"]["p99"] <= slo.ttft_s
                           and (not np.isfinite(rows["tpot_s"]).any() or seconds["tpot"]["p99"] <= slo.tpot_s)),
        "stopped_early": stopped,
        "slo": {"ttft_ms": slo.ttft_s * 1e3, "tpot_ms": slo.tpot_s * 1e3, "percentile": 99},
        "goodput_qps": goodput(rows, makespan),
        "slo_attainment": float(rows["meets_slo"].mean()),
        "throughput_qps": n / makespan if makespan > 0 else 0.0,
        "tokens_per_s_per_gpu": tokens / makespan / tp if makespan > 0 else 0.0,
        "output_tokens": tokens,
        "preemptions": int(engine.preemptions),
        "recomputed_tokens": int(rows["recomputed_tokens"].sum()),
        "spilled_gb": engine.spilled_tokens_total * engine.pricer.kv_per_token * tp / GB,
        "link_gb": {d: v * tp / GB for d, v in engine.moved_bytes.items()},
        "steps": int(engine.steps), "prefill_steps": int(engine.prefill_steps),
        "mean_batch": mean_batch(engine),
        "kv_budget_gb_per_gpu": engine.budget.kv_gb,
        "littles_law": {"mean_in_system": in_system, "lambda_times_e2e": n / makespan * float(np.mean(rows["e2e_s"]))
                        if makespan > 0 else 0.0},
    }


def goodput(rows: dict[str, np.ndarray], makespan: float) -> float:
    """Requests per second that met both SLOs: those requests over the run's makespan (first arrival's clock to the
    last finish). Not the offered rate x the share that met them, which grows with the offered rate however little
    the engine drains (1e9/s offered read as 6.65e8/s of goodput); this one never exceeds the completion rate."""
    return float(rows["meets_slo"].sum() / makespan) if makespan > 0 else 0.0


def timeline(engine) -> dict[str, np.ndarray]:
    """The engine's timeline as columns (``engine.TIMELINE_COLUMNS``)."""
    from tiersim.serving.engine import TIMELINE_COLUMNS

    data = np.array(engine.timeline, dtype=float).reshape(-1, len(TIMELINE_COLUMNS))
    return {name: data[:, i] for i, name in enumerate(TIMELINE_COLUMNS)}


def mean_batch(engine) -> float:
    """Decode rows per step, averaged over steps (a run of K steps counts K times)."""
    t = timeline(engine)
    return float((t["batch"] * t["steps"]).sum() / max(t["steps"].sum(), 1))


def thin(columns: dict[str, np.ndarray], rows: int = 2000) -> dict[str, list]:
    """At most ``rows`` evenly spaced rows of a timeline, as lists (for a file's metadata and a figure)."""
    n = len(next(iter(columns.values()))) if columns else 0
    pick = np.unique(np.linspace(0, n - 1, min(n, rows)).astype(int)) if n else np.zeros(0, dtype=int)
    return {k: v[pick].tolist() for k, v in columns.items()}

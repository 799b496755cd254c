"""The planner's question: which (tier split, strategy, batch) gives the most tokens/s per GPU within
a TPOT budget and a quality budget, and how that compares with the full cache at the largest batch
that fits. Every point is the closed form of ``strategies`` on the same staggered workload the
engine simulates (it matches the engine to 1%, and is fast enough to sweep hundreds of points);
"fits" and "largest batch" are ``capacity.fits`` / ``capacity.largest_batch``, nothing else.
"""

from __future__ import annotations

from tiersim.errors import TiersimError
from tiersim.hierarchy.strategies import NO_OFFLOAD  # nothing in DDR: no strategy applies
from tiersim.simulator import capacity
from tiersim.simulator.analytic import GB, Offload
from tiersim.simulator.rows import Row, overhead_pct
from tiersim.simulator.step import solve
from tiersim.simulator.strategies import STRATEGIES


def parse_batches(text: str | int) -> list[int]:
    """``64`` -> [64]; ``16..1024`` -> 16, 32, 64, ..., 1024 (powers of two between the ends)."""
    raw = str(text).strip()
    try:
        if ".." in raw:
            lo_s, hi_s = raw.split("..", 1)
            lo, hi = int(lo_s), int(hi_s)
        else:
            lo = hi = int(raw)
    except ValueError:
        raise TiersimError(f"--batch must be a number or a range like 16..1024, got {raw!r}") from None
    if not 1 <= lo <= hi <= capacity.MAX_BATCH:
        raise TiersimError(f"--batch must be between 1 and {capacity.MAX_BATCH} (a range low..high with low <= high), "
                           f"got {raw}")
    out = {lo, hi}
    p = 1
    while p < hi:
        if p > lo:
            out.add(p)
        p *= 2
    return sorted(out)


def parse_strategies(text: str) -> list[str]:
    names = list(STRATEGIES) if text.strip() == "all" else [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in STRATEGIES]
    if bad or not names:
        raise TiersimError(f"--strategy must be 'all' or a comma list of {', '.join(STRATEGIES)}, got {text!r}")
    return names


def evaluate(scenario: capacity.Scenario, policy: Offload, batch: int, strategies=STRATEGIES,
             tpot_slo_ms: float | None = None) -> list[dict]:
    """One point per strategy (one, strategy ``none``, when nothing is in DDR) at ``batch``: each strategy's
    StepCosts timed by the closed form, as the planner's view of the one result row."""
    names = [NO_OFFLOAD] if policy.tiers.ddr <= 0 else list(strategies)
    rows = []
    for name in names:
        work, costs, mem = capacity.priced(scenario, policy, batch, scenario.steps,
                                           "prefetch" if name == NO_OFFLOAD else name)
        result = solve(costs, scenario.model.num_layers, scenario.gpu, "closed form")
        row = Row.of(policy, costs, result, work, mem, scenario.gpu)
        rows.append(row.as_point(tpot_slo_ms, strategy=name))
    return rows


def _eligible(row: dict, max_evict: float) -> bool:
    return row["fits"] and row["within_slo"] and not row["approximate"] and row["evict"] <= max_evict + 1e-9


def full_cache_best(scenario: capacity.Scenario, tpot_slo_ms: float | None) -> tuple[int, dict | None]:
    """(largest batch that fits with the full cache, the full cache at the largest batch that fits
    and meets the SLO, or None). Step time grows with the batch, so the SLO bound is a bisection."""
    full = capacity.baseline_policy(scenario)
    largest = capacity.largest_batch(scenario, full)
    if largest == 0:
        return 0, None
    at = lambda b: evaluate(scenario, full, b, tpot_slo_ms=tpot_slo_ms)[0]  # noqa: E731
    row = at(largest)
    if row["within_slo"]:
        return largest, row
    first = at(1)
    if not first["within_slo"]:
        return largest, None
    lo, hi = 1, largest
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if at(mid)["within_slo"] else (lo, mid)
    return largest, at(lo)


def plan(scenario: capacity.Scenario, batches: list[int], tpot_slo_ms: float | None = None,
         max_evict: float = 0.0, strategies=STRATEGIES) -> dict:
    """Every (split, strategy, batch) point, the full-cache comparison and the recommendation."""
    evicts = sorted({e for e in capacity.GRID_EVICT if e <= max_evict + 1e-9} | ({max_evict} if max_evict > 0 else set()))
    policies = capacity.grid_policies(scenario, evicts=tuple(evicts))
    points = []
    for batch in batches:
        rows = [r for p in policies for r in evaluate(scenario, p, batch, strategies, tpot_slo_ms)]
        base = next(r for r in rows if r["hbm"] >= 1.0 and r["strategy"] == NO_OFFLOAD)
        for r in rows:
            r["overhead_pct"] = overhead_pct(r["tpot_ms"], base["tpot_ms"])
            r["baseline_fits"] = base["fits"]
        points.extend(rows)
    largest, full = full_cache_best(scenario, tpot_slo_ms)
    eligible = [r for r in points if _eligible(r, max_evict)]
    best = max(eligible, key=lambda r: r["tokens_per_s"]) if eligible else None
    per_strategy = {}
    for name in [NO_OFFLOAD, *strategies]:
        mine = [r for r in points if r["strategy"] == name and r["fits"] and r["evict"] <= max_evict + 1e-9]
        ok = [r for r in mine if r["within_slo"]]
        if ok or mine:  # the fastest within the SLO, else the quickest that fits (to show how far off)
            per_strategy[name] = max(ok, key=lambda r: r["tokens_per_s"]) if ok else min(mine, key=lambda r: r["tpot_ms"])
    return {
        "batches": batches, "tpot_slo_ms": tpot_slo_ms, "max_evict": max_evict, "strategies": list(strategies),
        "method": "closed form", "steps": scenario.steps,
        "max_batch_full_cache": largest, "full_cache": full, "best": best,
        "best_per_strategy": per_strategy, "points": points,
        "recommendation": recommend(scenario, batches, tpot_slo_ms, largest, full, best, points, max_evict),
    }


def _option(r: dict) -> str:
    return f"evict {r['evict']:.2f}" if r["strategy"] == NO_OFFLOAD else f"{r['strategy']}, {_split_words(r)}"


def _split_words(r: dict) -> str:
    words = f"HBM {r['hbm']:.2f} / DDR {r['ddr']:.2f}"
    if r["evict"] > 0:
        words += f" / evict {r['evict']:.2f}"
    return words


def recommend(scenario, batches, slo, largest, full, best, points, max_evict: float = 0.0) -> str:
    """The answer in one sentence (the first line of the table output, ``recommendation`` in JSON)."""
    cap = scenario.gpu.hbm_bytes / GB
    slo_words = f" within {slo:g} ms TPOT" if slo is not None else ""
    if largest == 0:
        head = f"Not even one sequence fits with the full cache in {cap:.0f} GB"
    elif full is None:
        head = f"The full cache fits up to batch {largest:,} but not{slo_words} at any batch"
    else:
        head = (f"Full cache fits up to batch {largest:,} ({full['tokens_per_s']:,.0f} tok/s at batch "
                f"{full['batch']:,}, {full['tpot_ms']:.1f} ms TPOT)")
    single = len(batches) == 1
    if single:
        b = batches[0]
        at_b = next((r for r in points if r["batch"] == b and r["hbm"] >= 1.0 and r["strategy"] == NO_OFFLOAD), None)
        if at_b and at_b["fits"] and at_b["within_slo"] and (best is None or best is at_b or best["strategy"] == NO_OFFLOAD):
            tail = (f"no tiering needed up to batch {largest:,}" if largest > b else "this is the largest batch that fits")
            return (f"The full cache fits at batch {b:,} ({at_b['peak_hbm_gb']:.1f} of {cap:.0f} GB, "
                    f"{at_b['tpot_ms']:.1f} ms TPOT{', within the SLO' if slo is not None else ''}): keep it; {tail}.")
    if best is None:
        where = f"batch {batches[0]:,}" if single else f"batches {batches[0]:,}..{batches[-1]:,}"
        fitting = [r for r in points if r["fits"] and not r["approximate"] and r["evict"] <= max_evict + 1e-9]
        quick = min(fitting, key=lambda r: r["tpot_ms"]) if fitting else None
        why = (f"; the quickest that fits is {_option(quick)} at batch {quick['batch']:,} "
               f"({quick['tpot_ms']:.1f} ms)" if quick else "")
        advice = f"; run the full cache at batch {full['batch']:,} instead" if full else ""
        return f"{head}. No exact config at {where} fits{slo_words}{why}{advice}."
    if full is not None and full["tokens_per_s"] >= best["tokens_per_s"]:
        tiered = [r for r in points if _eligible(r, max_evict) and r["hbm"] < 1.0]
        top = max(tiered, key=lambda r: r["tokens_per_s"]) if tiered else None
        other = (f"the best alternative{slo_words} ({_option(top)} at batch {top['batch']:,}) gives "
                 f"{top['tokens_per_s']:,.0f} tok/s" if top else f"no exact alternative fits{slo_words}")
        return f"{head}: keep the full cache at batch {full['batch']:,}; {other}."
    if best["strategy"] == NO_OFFLOAD:
        what = f"evicting {best['evict']:.0%} of the KV" if best["evict"] > 0 else "the full cache"
    else:
        what = f"{best['strategy']} with {_split_words(best)}"
    return (f"{head}; {what} at batch {best['batch']:,} gives {best['tokens_per_s']:,.0f} tok/s{slo_words} "
            f"({best['tpot_ms']:.1f} ms), freeing {best['hbm_saved_gb']:.1f} GB of HBM.")

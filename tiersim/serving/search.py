"""The highest request rate a configuration sustains within its SLOs: bisection on lambda, each point a run.

Every point replays the same requests (same seed: same lengths, same gap shape) at another rate
(``workload.at_rate``), so a point differs from the next only by load; the search assumes the p99 latencies
grow with load, which holds away from a few percent of noise at the edge. It stops when the bracket is within
``tolerance`` (relative). A point stops as soon as its p99 TTFT is sure to miss (more than 1% of the requests
got their first token late): past the knee a run would otherwise simulate a queue growing for hours, and the
search needs only the verdict (``stopped_early``; its latencies are lower bounds). The answer's first line says
it in words, as the batch planner's does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from tiersim.serving import run as serving_run
from tiersim.serving.memory import Unservable
from tiersim.serving.workload import Requests, at_rate

TOLERANCE = 0.05
MAX_POINTS = 24


@dataclass(frozen=True)
class Bracket:
    lo: float
    hi: float

    def __post_init__(self):
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and 0 < self.lo < self.hi):
            raise ValueError(f"--qps range must be LO..HI with 0 < LO < HI, got {self.lo:g}..{self.hi:g}")


def point(spec: serving_run.ServeSpec, requests: Requests, qps: float, burstiness: float, seed: int) -> dict:
    """One run at ``qps``: the figures a latency-vs-load curve and the search need."""
    s = serving_run.simulate(spec, at_rate(requests, qps, burstiness, seed), early_stop=True).summary
    return {"qps": qps, "ttft_p99_ms": s["ttft_ms"]["p99"], "tpot_p99_ms": s["tpot_ms"]["p99"],
            "ttft_p50_ms": s["ttft_ms"]["p50"], "tpot_p50_ms": s["tpot_ms"]["p50"], "e2e_p99_ms": s["e2e_ms"]["p99"],
            "goodput_qps": s["goodput_qps"], "tokens_per_s_per_gpu": s["tokens_per_s_per_gpu"],
            "preemptions": s["preemptions"], "spilled_gb": s["spilled_gb"], "within_slo": s["within_slo"],
            "mean_batch": s["mean_batch"], "stopped_early": s["stopped_early"]}


def max_qps(spec: serving_run.ServeSpec, requests: Requests, bracket: Bracket, burstiness: float = 1.0,
            seed: int = 0, tolerance: float = TOLERANCE, tick: Callable[[str], None] | None = None) -> dict:
    """``{"max_qps", "points", "bounded"}``: the highest rate in ``bracket`` within the SLOs (0 if even ``lo``
    misses them; ``bounded`` False when ``hi`` still meets them, i.e. the answer is at least ``hi``)."""
    points = []

    def at(qps: float) -> bool:
        p = point(spec, requests, qps, burstiness, seed)
        points.append(p)
        if tick:
            tick(f"{spec.engine.on_full} {qps:.3g}/s {'ok' if p['within_slo'] else 'over'}")
        return p["within_slo"]

    lo, hi = bracket.lo, bracket.hi
    try:
        first = at(lo)
    except Unservable as exc:  # a request this policy can never hold: no rate is within the SLOs
        return {"max_qps": 0.0, "points": points, "bounded": True, "unservable": str(exc)}
    if not first:
        return {"max_qps": 0.0, "points": points, "bounded": True}
    if at(hi):
        return {"max_qps": hi, "points": points, "bounded": False}
    while hi / lo > 1 + tolerance and len(points) < MAX_POINTS:
        mid = math.sqrt(lo * hi)  # geometric: rates span orders of magnitude
        lo, hi = (mid, hi) if at(mid) else (lo, mid)
    return {"max_qps": lo, "points": sorted(points, key=lambda p: p["qps"]), "bounded": True}


def points_needed(bracket: Bracket, tolerance: float = TOLERANCE) -> int:
    """Runs one search takes at most (for a progress bar): the two ends and the bisection."""
    return 2 + max(0, math.ceil(math.log2(math.log(bracket.hi / bracket.lo) / math.log(1 + tolerance))))


def recommend(spec: serving_run.ServeSpec, answers: dict[str, dict]) -> str:
    """The answer in one sentence: the best policy's rate, and every other policy's beside it (or why it has none)."""
    slo = spec.slo
    where = f"{spec.model.name} on {spec.tp} x {spec.gpu.name}" if spec.tp > 1 else f"{spec.model.name} on {spec.gpu.name}"
    limits = f"p99 TTFT {slo.ttft_s * 1e3:g} ms and p99 TPOT {slo.tpot_s * 1e3:g} ms"
    served = {n: a for n, a in answers.items() if "unservable" not in a}
    refused = [n for n in answers if n not in served]
    if not served:
        raise Unservable(answers[refused[0]]["unservable"])
    words = {name: rate_words(a) for name, a in served.items()}
    top = max(a["max_qps"] for a in served.values())
    best = [n for n, a in served.items() if a["max_qps"] == top]
    cannot = f"; {', '.join(refused)} cannot hold the longest request" if refused else ""
    if top <= 0:
        rates = [p["qps"] for a in served.values() for p in a["points"]]
        lowest = f" (the lowest, {min(rates):.3g} requests/s, included)" if rates else ""
        return (f"No rate met the SLOs: {where} misses {limits} at every rate searched{lowest}, under every "
                f"--on-full policy tried ({', '.join(served)}){cannot}.")
    others = ", ".join(f"{n} {words[n]}" for n in served if n not in best)
    return (f"{where} serves {words[best[0]]} requests/s within {limits} with --on-full {' = '.join(best)}"
            + (f" ({others}{cannot})." if others else f"{' (' + cannot[2:] + ')' if cannot else ''}."))


def rate_words(answer: dict) -> str:
    """A search's answer as a table or a sentence shows it: the rate, ">= HI" when HI still met the SLOs."""
    q = answer["max_qps"]
    text = f"{q:.3g}" if q > 0 else "0"
    return text if answer["bounded"] else f">= {text}"

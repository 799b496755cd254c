"""Measured versus simulated, per point: the gate every change to the compute model must pass.

``tiersim simulate --against FILE`` reads measured decode steps from a validator calibration file
(kind ``calibration``: its ``points``) or an operator profile (kind ``operator-profile``: its
DynamicCache and TieredCache decode runs), simulates each point with the scenario's model, GPU,
calibration and profile (a lockstep batch at the point's context, over as many steps as were
timed), and reports the error per point with its median and worst. Points of another model than
the scenario's are left out and counted.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

from tiersim import fileformat
from tiersim.errors import TiersimError

def load_measurements(path: str | Path) -> tuple[dict, list[dict]]:
    """(document, points): each point ``{model, batch, context, hbm, measured_ms, steps, label}``."""
    path = Path(path)
    doc, _ = fileformat.read(path, [fileformat.CALIBRATION, fileformat.OPERATOR_PROFILE], label="--against")
    try:
        points = _points(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TiersimError(f"--against: {path}: a measured point is malformed ({type(exc).__name__}: {exc})") from None
    if not points:
        raise TiersimError(f"--against: {path} holds no measured decode steps")
    return doc, points


def _points(doc: dict) -> list[dict]:
    """The measured decode steps of a calibration or operator-profile document."""
    kind = doc["kind"]
    points = []
    if kind == "calibration":
        settings = doc.get("settings") or {}
        model = (doc.get("model_shape") or {}).get("name")
        for p in doc.get("points") or []:
            if p.get("measured_step_ms"):
                points.append({"model": p.get("model_shape", model), "batch": int(p["batch"]),
                               "context": int(p["context"]) + int(settings.get("warmup", 0)), "hbm": float(p["hbm"]),
                               "measured_ms": float(p["measured_step_ms"]), "steps": int(settings.get("steps", 24)),
                               "label": "tiered"})
    else:
        warmup = int((doc.get("settings") or {}).get("decode_warmup", 3))
        for model, entry in (doc.get("models") or {}).items():
            runs = list(entry.get("decode") or [])
            runs += [r for r in entry.get("decode_compare") or [] if r.get("cache") == "tiered"]
            for r in runs:
                if r.get("step_ms"):
                    points.append({"model": model, "batch": int(r["batch"]),
                                   "context": int(r["context"]) + warmup, "hbm": float(r["hbm"]),
                                   "measured_ms": float(r["step_ms"]), "steps": int(r.get("steps", 10)),
                                   "label": f"{r['cache']} {r.get('sdpa', 'default')}"})
    return points


def compare(scenario, points: list[dict]) -> dict:
    """Simulate every point of ``scenario.model``; rows with the error, and its median and worst."""
    from tiersim.simulator.capacity import run

    rows, skipped = [], 0
    for p in points:
        if p["model"] != scenario.model.name:
            skipped += 1
            continue
        sc = replace(scenario, batch=p["batch"], context=p["context"], steps=max(p["steps"], 1))
        row, _ = run(sc, sc.policy(p["hbm"], round(1.0 - p["hbm"], 6), 0.0, 0.0), largest=False)
        error = 100.0 * (row["step_ms"] / p["measured_ms"] - 1.0)
        rows.append({**p, "simulated_ms": row["step_ms"], "error_pct": error, "compute_model": row["compute_model"]})
    if not rows:
        raise TiersimError(f"--against: no measured point is of model {scenario.model.name} "
                           f"(the file has {', '.join(sorted({p['model'] for p in points}))}); choose it with --model")
    errors = [abs(r["error_pct"]) for r in rows]
    worst = max(rows, key=lambda r: abs(r["error_pct"]))
    return {"rows": rows, "skipped_other_models": skipped, "median_abs_error_pct": statistics.median(errors),
            "worst_error_pct": worst["error_pct"], "compute_model": rows[-1]["compute_model"]}

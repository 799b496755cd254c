"""Pre-registered predictions for the GPU validation grid, and their comparison with the run's results.

Why: the graph executor has never run on a GPU. If its results were first compared with a simulator tuned after
seeing them, agreement would say little. Predictions written and committed *before* the run make it a held-out
test: the file records what the uncalibrated simulator (presets only, no calibration, no profile) says each grid
point will measure, with the commit and the command that made it. After the run, :func:`compare` sets the
measured points beside those frozen predictions. Predictions regenerated after a physics change are the new
physics' predictions, not pre-registered ones. The file keeps the commit of its first registration and
:func:`compare` says whether its predictions predate the results.

The grid itself is not defined here. ``scripts/preregister_gpu_grid.py`` reads it from the GPU script
(``scripts/gpu_validate.sh``) and hands :func:`grid_points` the lists. The validator's layer (5) is above this one,
so two of its rules are restated here: the points' order and extra checks (:func:`grid_points`), and the timed steps
the file records (:func:`file_settings`). ``tests/test_preregister.py`` holds both to a CPU run of the graph grid.
Each point is priced by ``against.simulate_point``, the function ``simulate --against`` prices a measured point
with, so a prediction here is what ``--against`` would print without a calibration.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from tiersim import fileformat
from tiersim.errors import TiersimError

ENGINE = "fast"  # the recurrence: deterministic (bit-for-bit regeneration) and what the simpy-less GPU machine runs
HYBRID_SHARE = 0.5  # the strategy check's hybrid fetch share (tiersim.validator.graph_host.HYBRID_SHARE; tested)
#: Fields that change on every regeneration: left out when two files' predictions are compared.
STAMP_FIELDS = ("registered", "generated")
FIGURE_NAMES = ("median_abs_error_pct", "overhead_head", "prefetch_share_of_peak_h2d", "link_bound")


def file_settings(steps: int, warmup: int) -> dict:
    """The ``settings.steps`` / ``settings.warmup`` the graph grid's file records for ``--steps`` / ``--warmup``.
    Its full and copy-free replays alternate, so the timed full steps span twice as many tokens
    (``graph_run._measure``'s ``document``). ``--against`` reads these: the context is the point's plus the warm-up,
    over that many steps."""
    return {"steps": 2 * steps, "warmup": 2 * max(warmup, 1)}


def grid_points(grid: dict) -> list[dict]:
    """The points the graph grid's file holds, in its order (``graph_run._measure``'s walk). First block: the first
    batch and context at HBM 1.0, then every other ratio. Then the strategy check: the first HBM < 1 ratio again
    with each host strategy. Then the other blocks. Last the compressed check: the first batch and context at each
    ratio < 1, with ``compressed`` of the context (at most what leaves HBM) in the compressed tier. Each point is
    ``{batch, context, hbm, compressed, strategy, fetch_share}``."""
    batches, contexts, hbms = grid["batch"], grid["context"], grid["hbm"]
    offloaded = [h for h in hbms if h < 1.0]

    def point(b, c, h, strategy="prefetch", comp=0.0):
        share = {"prefetch": 1.0, "host-attention": 0.0}.get(strategy, HYBRID_SHARE)
        return {"batch": b, "context": c, "hbm": h, "compressed": round(min(comp, 1.0 - h), 6) if h < 1.0 else 0.0,
                "strategy": strategy, "fetch_share": share}

    def block(b, c):
        return [point(b, c, h) for h in [1.0] + [h for h in hbms if h != 1.0] if h in hbms]

    blocks = [block(b, c) for b in batches for c in contexts]
    checks = [point(batches[0], contexts[0], offloaded[0], s) for s in grid["strategy_check"]] if offloaded else []
    comp = [point(batches[0], contexts[0], h, comp=grid["compressed"]) for h in offloaded] if grid["compressed"] else []
    return [*blocks[0], *checks, *(p for blk in blocks[1:] for p in blk), *comp]


def _skeleton(grid: dict, points: list[dict]) -> dict:
    """A calibration document of the grid's points as the GPU run's file will hold them, every step a placeholder
    1 ms, so that ``against._points`` turns each into the simulated point ``--against`` would (context plus
    warm-up, the timed steps, a host strategy's share). The placeholder is never read back: only the simulation is."""
    return {**fileformat.stamp(fileformat.CALIBRATION), "settings": {**file_settings(grid["steps"], grid["warmup"]),
                                                                     "strategy": "prefetch"},
            "model_shape": {"name": grid["shape"]},
            "points": [{**p, "measured_step_ms": 1.0} for p in points]}


def _r(value: float | None, digits: int = 6) -> float | None:
    """Rounded for the file: a regeneration on another machine must give the same text (the last bits of a float
    sum can differ with the BLAS)."""
    return None if value is None else float(f"{value:.{digits}g}")


def predict(grid: dict, gpu: str) -> dict:
    """The uncalibrated simulator's prediction of every point of ``grid`` on preset ``gpu``: ``{points, figures,
    compute_model, gpu_preset}``. Per point: step, stall and compute time (ms), H2D and D2H bytes per step, the
    copies' rate alone (``prefetch_gbps``, as the grid measures it: the step's H2D bytes over the time they take
    with nothing else on the link) and over the whole step (``h2d_gbps_in_step``), and the overhead against the
    HBM 1.0 prediction at the same batch and context."""
    from tiersim.simulator import against, link
    from tiersim.simulator.scenario import assemble

    scenario = assemble(1, model=grid["shape"], gpu=gpu, engine=ENGINE)
    raw = grid_points(grid)
    sims = against._points(_skeleton(grid, raw), against._Fields(Path("<pre-registration>")))
    hw, layers = scenario.gpu, scenario.model.num_layers
    rows = []
    for p, sim in zip(raw, sims):
        row = against.simulate_point(scenario, sim)
        h2d = row["h2d_gb_per_step"] * 1e9
        alone = layers * link.call_latency(hw) + h2d / link.rate(hw, "h2d") if h2d > 0 else None
        rows.append({**p, "step_ms": _r(row["step_ms"]), "stall_ms": _r(row["stall_ms"]),
                     "compute_ms": _r(row["compute_ms"]), "h2d_bytes": round(h2d), "d2h_bytes":
                     round(row["d2h_gb_per_step"] * 1e9),
                     "prefetch_gbps": _r(h2d / alone / 1e9) if alone else None,
                     "h2d_gbps_in_step": _r(h2d / row["step_ms"] / 1e6) if h2d > 0 else None})
    base = {(r["batch"], r["context"]): r["step_ms"] for r in rows if r["hbm"] == 1.0 and r["strategy"] == "prefetch"}
    for r in rows:
        b = base.get((r["batch"], r["context"]))
        r["baseline_step_ms"] = b
        r["overhead_pct"] = _r(100.0 * (r["step_ms"] / b - 1.0)) if b else None
    return {"gpu_preset": gpu, "compute_model": row["compute_model"], "points": rows,
            "figures": figures(rows, link.rate(hw, "h2d") / 1e9)}


def _head(points: list[dict]) -> dict | None:
    """The point issue 23's overhead figure is quoted at: HBM 0.5 (else the largest ratio < 1) at the smallest
    batch and context of the lossless prefetch points (``tiersim.validator.quote``'s choice)."""
    lossless = [p for p in points if p.get("strategy", "prefetch") == "prefetch" and not p.get("compressed")]
    if not lossless:
        return None
    b, c = min(p["batch"] for p in lossless), min(p["context"] for p in lossless)
    offloaded = sorted({p["hbm"] for p in lossless if p["hbm"] < 1.0 and (p["batch"], p["context"]) == (b, c)})
    h = 0.5 if 0.5 in offloaded else (offloaded[-1] if offloaded else None)
    return next((p for p in lossless if (p["batch"], p["context"], p["hbm"]) == (b, c, h)), None)


def _link_bound(points: list[dict]) -> list[dict]:
    """The link-bound points: the largest context at the smallest HBM ratio (< 1), every batch (quote's choice)."""
    lossless = [p for p in points if p.get("strategy", "prefetch") == "prefetch" and not p.get("compressed")]
    if not lossless:
        return []
    low, top = min(p["hbm"] for p in lossless), max(p["context"] for p in lossless)
    return sorted((p for p in lossless if p["hbm"] == low and p["context"] == top and low < 1.0),
                  key=lambda p: p["batch"])


def figures(points: list[dict], peak_h2d_gbps: float) -> dict:
    """Issue 23's four quoted figures as the uncalibrated simulator predicts them. The first, the calibrated
    simulator's median |error|, is no prediction: a simulator predicts its own error as zero. What the run will
    measure in its place is the median |error| of these pre-registered predictions (:func:`compare`)."""
    head = _head(points)
    rates = [p["prefetch_gbps"] for p in points if p.get("prefetch_gbps")]
    return {
        "median_abs_error_pct": {"predicted": None, "why": "a simulator predicts its own error as 0; the run measures "
                                 "the median |error| of these predictions (simulate --against R --preregistered F)"},
        "overhead_head": None if head is None else {k: head[k] for k in (
            "batch", "context", "hbm", "step_ms", "baseline_step_ms", "overhead_pct", "stall_ms")},
        "prefetch_share_of_peak_h2d": {"prefetch_gbps_max": max(rates) if rates else None,
                                       "peak_h2d_gbps": _r(peak_h2d_gbps),
                                       "share": _r(max(rates) / peak_h2d_gbps) if rates else None},
        "link_bound": [{k: p[k] for k in ("batch", "context", "hbm", "step_ms", "stall_ms", "h2d_bytes")}
                       for p in _link_bound(points)],
    }


def document(grid: dict, gpu: str, stamp: dict, command: str) -> dict:
    """The ``gpu-preregistration`` file for preset ``gpu``; ``stamp``: ``{commit, created}`` of this writing."""
    from tiersim.simulator.presets import get_gpu

    pred = predict(grid, gpu)
    hw = get_gpu(gpu)
    return {**fileformat.stamp(fileformat.PREREGISTRATION), "registered": stamp, "generated": stamp,
            "command": command, "gpu_preset": gpu, "device_names": list(hw.device_names), "model": grid["shape"],
            "simulator": {"engine": ENGINE, "calibration": None, "profile": None,
                          "compute_model": pred["compute_model"], "link_source": hw.link_source},
            "grid": grid, "settings": file_settings(grid["steps"], grid["warmup"]),
            "points": pred["points"], "figures": pred["figures"]}


def predictions(doc: dict) -> dict:
    """``doc`` without the fields every writing changes (its stamps): two files that agree here predict the same."""
    return {k: v for k, v in doc.items() if k not in STAMP_FIELDS}


def write(path: Path, doc: dict, replace: bool = False) -> str:
    """Write ``doc`` atomically unless ``path`` already holds the same predictions (then it is left as it is, so
    its registration stamp stands): "written", "unchanged" or, with ``replace``, "replaced". The replacement keeps
    the old file's ``registered`` stamp, so a reader sees when the predictions were first made. Different
    predictions without ``replace`` are refused in one line: a physics change moved them, and new predictions
    are not pre-registered for any run made before them."""
    status = "written"
    if path.exists():
        old = load(path)
        if predictions(old) == predictions(doc):
            return "unchanged"
        if not replace:
            raise TiersimError(f"{path}: the simulator's predictions differ from the registered ones (commit "
                               f"{old['registered'].get('commit')}): regenerate deliberately with --replace; new "
                               "predictions are not pre-registered for a GPU run made before them")
        doc = {**doc, "registered": old["registered"]}
        status = "replaced"
    fileformat.write_document(path, doc)
    return status


def load(path: str | Path) -> dict:
    """A ``gpu-preregistration`` file, checked: every failure one line naming the file."""
    doc, _ = fileformat.read(path, [fileformat.PREREGISTRATION], label="--preregistered")
    for key in ("registered", "generated", "grid", "settings", "figures"):
        if not isinstance(doc.get(key), dict):
            raise TiersimError(f"--preregistered: {path}: {key} must be an object")
    if not isinstance(doc.get("gpu_preset"), str):
        raise TiersimError(f"--preregistered: {path}: gpu_preset must be a preset's name")
    if not isinstance(doc.get("points"), list) or not doc["points"]:
        raise TiersimError(f"--preregistered: {path} holds no predicted points")
    for i, p in enumerate(doc["points"]):
        if not isinstance(p, dict) or not all(_number(p.get(k)) for k in ("batch", "context", "hbm", "compressed",
                                                                            "step_ms")) \
                or not isinstance(p.get("strategy", "prefetch"), str):
            raise TiersimError(f"--preregistered: {path}: point {i + 1} needs numbers batch, context, hbm, "
                               "compressed and step_ms, and a strategy's name")
        for k in ("stall_ms", "overhead_pct", "prefetch_gbps"):
            if p.get(k) is not None and not _number(p[k]):
                raise TiersimError(f"--preregistered: {path}: point {i + 1}'s {k} must be a number, got {p[k]!r}")
    for name, key in (("overhead_head", "overhead_pct"), ("prefetch_share_of_peak_h2d", "share")):
        value = _figure(doc, name, key)
        if value is not None and not _number(value):
            raise TiersimError(f"--preregistered: {path}: figures.{name}.{key} must be a number, got {value!r}")
    return doc


def in_folder(folder: str | Path, results_path: str | Path) -> Path:
    """The predictions in ``folder`` for the GPU preset the results were measured on (``predicted-<preset>.json``,
    as ``scripts/preregister_gpu_grid.py`` names them), whether or not that file exists: the GPU script passes
    ``docs/validation`` and lets the file the run's GPU needs be found."""
    from tiersim.simulator.against import load_measurements

    return Path(folder) / f"predicted-{load_measurements(results_path)[0].get('gpu_preset')}.json"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _figure(doc: dict, name: str, key: str):
    """``doc.figures[name][key]``, None where any level is absent or not an object."""
    entry = doc["figures"].get(name)
    return entry.get(key) if isinstance(entry, dict) else None


def _key(batch, context, hbm, compressed, strategy) -> tuple:
    return int(batch), int(context), round(float(hbm), 6), round(float(compressed or 0.0), 6), strategy or "prefetch"


def compare(prereg: dict, results_path: str | Path) -> dict:
    """The GPU run's measured points (a graph-grid calibration file, read by ``against.load_measurements``) beside
    the pre-registered predictions of the same points: per point the step's error (predicted / measured - 1), the
    measured and predicted stall, H2D rate and overhead; the median |error|; the four figures side by side; and
    whether the predictions predate the results (``preregistered``)."""
    from tiersim.simulator.against import load_measurements

    doc, _measured = load_measurements(results_path)
    if doc.get("kind") != fileformat.CALIBRATION.name:
        raise TiersimError(f"--preregistered: {results_path} is an operator profile; compare a graph grid's file")
    if doc.get("gpu_preset") != prereg["gpu_preset"]:
        raise TiersimError(f"--preregistered: {results_path} was measured on preset {doc.get('gpu_preset')!r}, the "
                           f"predictions are for {prereg['gpu_preset']!r}: use predicted-{doc.get('gpu_preset')}.json")
    predicted = {_key(p["batch"], p["context"], p["hbm"], p["compressed"], p.get("strategy")): p
                 for p in prereg["points"]}
    rows, unmatched = [], 0
    for m in doc.get("points") or []:
        if not m.get("measured_step_ms"):
            continue
        p = predicted.get(_key(m["batch"], m["context"], m["hbm"], m.get("compressed"), m.get("strategy")))
        if p is None:
            unmatched += 1
            continue
        rows.append({"batch": m["batch"], "context": m["context"], "hbm": m["hbm"],
                     "compressed": m.get("compressed") or 0.0, "strategy": m.get("strategy") or "prefetch",
                     "fetch_share": m.get("fetch_share"), "measured_ms": m["measured_step_ms"],
                     "predicted_ms": p["step_ms"], "error_pct": 100.0 * (p["step_ms"] / m["measured_step_ms"] - 1.0),
                     "measured_stall_ms": m.get("stall_ms"), "predicted_stall_ms": p.get("stall_ms"),
                     "measured_overhead_pct": m.get("overhead_pct"), "predicted_overhead_pct": p.get("overhead_pct"),
                     "measured_prefetch_gbps": m.get("prefetch_gbps"), "predicted_prefetch_gbps": p.get("prefetch_gbps")})
    if not rows:
        raise TiersimError(f"--preregistered: no measured point of {results_path} is one of the pre-registered grid's")
    settings = doc.get("settings") or {}
    same = all(settings.get(k) == prereg["settings"].get(k) for k in ("steps", "warmup"))
    created, registered = str(doc.get("created") or ""), str(prereg["generated"].get("created") or "")
    measured_head = _head([{**r, "measured_step_ms": r["measured_ms"]} for r in rows])
    summary = doc.get("summary") or {}
    return {
        "rows": rows, "unmatched": unmatched, "median_abs_error_pct": statistics.median(abs(r["error_pct"]) for r in rows),
        "worst_error_pct": max((r["error_pct"] for r in rows), key=abs),
        "same_settings": same, "results_created": created or None,
        "preregistered": bool(created and registered and registered < created),
        "registered": prereg["registered"], "generated": prereg["generated"],
        "figures": {
            "overhead_head": {"measured": None if measured_head is None else measured_head["measured_overhead_pct"],
                              "predicted": _figure(prereg, "overhead_head", "overhead_pct")},
            "prefetch_share_of_peak_h2d": {"measured": summary.get("prefetch_share_of_peak_h2d"),
                                           "predicted": _figure(prereg, "prefetch_share_of_peak_h2d", "share")},
            "link_bound": [{"batch": r["batch"], "measured_stall_ms": r["measured_stall_ms"],
                            "predicted_stall_ms": r["predicted_stall_ms"]}
                           for r in _link_bound([{**r, "measured_step_ms": r["measured_ms"]} for r in rows])],
        },
    }


def _f(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def compare_lines(result: dict, results_path, prereg_path) -> list[str]:
    """:func:`compare`'s result as the table ``--preregistered`` prints, the median |error| last."""
    reg, gen = result["registered"], result["generated"]
    when = (f"pre-registered: predictions made at {gen.get('commit')} ({gen.get('created')}), before the results "
            f"({result['results_created']})" if result["preregistered"] else
            f"NOT pre-registered: predictions made at {gen.get('commit')} ({gen.get('created')}), not before the "
            f"results ({result['results_created']}); the first registration: {reg.get('commit')} ({reg.get('created')})")
    lines = [f"measured ({results_path}) vs pre-registered uncalibrated predictions ({prereg_path})", when]
    if not result["same_settings"]:
        lines.append("note: the run timed other steps or warm-up than the predictions assumed (settings differ)")
    lines.append(f"{'batch':>5} {'context':>7} {'split':>22} {'measured ms':>11} {'predicted ms':>12} {'error':>7} "
                 f"{'stall ms':>9} {'pred stall':>10} {'GB/s':>6} {'pred GB/s':>9}")
    for r in result["rows"]:
        split = f"{r['hbm']:.2f}" + (f" +c{r['compressed']:.2f}" if r["compressed"] else "") + \
            ("" if r["strategy"] == "prefetch" else f" {r['strategy']}")
        lines.append(f"{r['batch']:>5} {r['context']:>7} {split:>22} {r['measured_ms']:>11.3f} {r['predicted_ms']:>12.3f} "
                     f"{r['error_pct']:>+6.1f}% {_f(r['measured_stall_ms'], '9.3f')} "
                     f"{_f(r['predicted_stall_ms'], '10.3f')} {_f(r['measured_prefetch_gbps'], '6.1f')} "
                     f"{_f(r['predicted_prefetch_gbps'], '9.1f')}")
    fig = result["figures"]
    lines.append(f"overhead at the head point: measured {_f(fig['overhead_head']['measured'], '+.2f')}%, predicted "
                 f"{_f(fig['overhead_head']['predicted'], '+.2f')}%")
    share = fig["prefetch_share_of_peak_h2d"]
    lines.append(f"prefetch share of peak H2D: measured {_f(share['measured'], '.2f')}, predicted "
                 f"{_f(share['predicted'], '.2f')}")
    for p in fig["link_bound"]:
        lines.append(f"link-bound batch {p['batch']}: stall measured {_f(p['measured_stall_ms'], '.3f')} ms, "
                     f"predicted {_f(p['predicted_stall_ms'], '.3f')} ms")
    if result["unmatched"]:
        lines.append(f"note: {result['unmatched']} measured points are not in the pre-registered grid")
    lines.append(f"median |error| (pre-registered, uncalibrated) {result['median_abs_error_pct']:.1f}% "
                 f"(worst {result['worst_error_pct']:+.1f}%, {len(result['rows'])} points)")
    return lines


def markdown(doc: dict) -> str:
    """The short table committed beside the JSON (the JSON is the record; this is for reading)."""
    reg = doc["registered"]
    g, fig = doc["grid"], doc["figures"]
    lines = [f"# Pre-registered predictions: {doc['model']} on {doc['gpu_preset']}", "",
             f"Written by `{doc['command']}` (first registered at commit {reg.get('commit')}, {reg.get('created')}; "
             f"the JSON beside this file is the record). The uncalibrated simulator (presets only, engine "
             f"{doc['simulator']['engine']}, compute model {doc['simulator']['compute_model']}) on the GPU script's "
             f"grid: batch {g['batch']}, context {g['context']}, HBM {g['hbm']}, strategy check "
             f"{', '.join(g['strategy_check']) or 'none'}, compressed check {g['compressed']:g}; "
             f"{doc['settings']['steps']} timed steps after {doc['settings']['warmup']} (as the grid's file records "
             "them).", "",
             "| batch | context | split | step ms | stall ms | H2D MB/step | copies GB/s | in-step GB/s | overhead |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in doc["points"]:
        split = f"{p['hbm']:.2f}" + (f" +c{p['compressed']:.2f}" if p["compressed"] else "") + \
            ("" if p["strategy"] == "prefetch" else f" {p['strategy']}")
        lines.append(f"| {p['batch']} | {p['context']} | {split} | {p['step_ms']:.3f} | {p['stall_ms']:.3f} | "
                     f"{p['h2d_bytes'] / 1e6:.1f} | {_f(p['prefetch_gbps'], '.1f')} | {_f(p['h2d_gbps_in_step'], '.1f')} | "
                     f"{_f(p['overhead_pct'], '+.2f')}% |")
    head, share = fig["overhead_head"], fig["prefetch_share_of_peak_h2d"]
    lines += ["", "Issue 23's figures as predicted:", "",
              "* median |error| of the calibrated simulator: not a prediction (a simulator predicts its own error as "
              "0); the run measures these predictions' median |error| instead.",
              f"* overhead at HBM {head['hbm']:g} / batch {head['batch']} / {head['context']}: "
              f"{head['overhead_pct']:+.2f}% (step {head['step_ms']:.3f} ms vs {head['baseline_step_ms']:.3f} ms, "
              f"stall {head['stall_ms']:.3f} ms; target <= 3%, the paper 5-7%)" if head else "* overhead: no point",
              f"* prefetch rate vs peak H2D: best {_f(share['prefetch_gbps_max'], '.1f')} GB/s of "
              f"{share['peak_h2d_gbps']:.1f} GB/s = {_f(None if share['share'] is None else 100 * share['share'], '.0f')}% "
              "(target >= 85%)"]
    for p in fig["link_bound"]:
        lines.append(f"* link-bound batch {p['batch']} x {p['context']} at HBM {p['hbm']:g}: stall {p['stall_ms']:.3f} "
                     f"ms of a {p['step_ms']:.3f} ms step ({p['h2d_bytes'] / 1e9:.2f} GB H2D per step)")
    return "\n".join(lines) + "\n"

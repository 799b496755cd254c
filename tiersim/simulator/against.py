"""Measured versus simulated, per point: the gate every change to the compute model must pass.

``tiersim simulate --against FILE`` reads measured decode steps from a validator calibration file
(kind ``calibration``: its ``points``) or an operator profile (kind ``operator-profile``: its
DynamicCache and TieredCache decode runs), simulates each point with the scenario's model, GPU,
calibration and profile (a lockstep batch at the point's context, over as many steps as were
timed), and reports the error per point with its median and worst. Points of another model than
the scenario's are left out and counted.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from pathlib import Path

from tiersim import fileformat
from tiersim.errors import TiersimError

MAX_STEPS = 100_000  # the validator's own bound on --steps and --warmup
MAX_MS = 1e7  # ms per step: nearly three hours, beyond any decode step measured
#: ms per step: a microsecond, below one kernel launch, so below any decode step measured. A time of 1e-30 ms
#: (a unit slip, a damaged file) printed an error of +6e32% as a result.
MIN_MS = 1e-3

def load_measurements(path: str | Path) -> tuple[dict, list[dict]]:
    """(document, points): each point ``{model, batch, context, hbm, measured_ms, steps, label}``."""
    path = Path(path)
    from tiersim.simulator.calibration import check_objects

    doc, _ = fileformat.read(path, [fileformat.CALIBRATION, fileformat.OPERATOR_PROFILE], label="--against")
    check_objects(doc, f"--against: {path}", ("device", "settings", "model_shape", "models"))
    try:
        points = _points(doc, _Fields(path))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TiersimError(f"--against: {path}: a measured point is malformed ({type(exc).__name__}: {exc})") from None
    if not points:
        raise TiersimError(f"--against: {path} holds no measured decode steps")
    return doc, points


class _Fields:
    """Checks a file's fields before they become simulated work or a printed error: the same bounds as the
    options that set them (a NaN time, batch 0 or 1e9 steps in a file is one line naming it, not a traceback,
    a +nan% error or a machine out of memory)."""

    def __init__(self, path: Path):
        self.path = path

    def _bad(self, name: str, value, want: str):
        raise TiersimError(f"--against: {self.path}: {name} must be {want}, got {value!r}")

    def whole(self, name: str, value, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value != int(value) or not lo <= value <= hi:
            self._bad(name, value, f"a whole number in {lo:,}..{hi:,}")
        return int(value)

    def name(self, name: str, value) -> str | None:
        """A model's name: text, or absent (a point of no stated model, left out as of another model)."""
        if value is not None and not isinstance(value, str):
            self._bad(name, value, "a model's name")
        return value

    def number(self, name: str, value, lo: float, hi: float, above: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not (lo < value if above else lo <= value) or not value <= hi:
            self._bad(name, value, f"a number in {'(' if above else '['}{lo:g}, {hi:g}]")
        return float(value)


def split_label(row: dict) -> str:
    """A row's split as the tables print it: the HBM share, the compressed share of a compressed check
    ('0.50 +c0.25') and the strategy of a host-strategy point, with hybrid's fetched share ('0.50 host-attention',
    '0.50 hybrid fetch 0.5'), so none reads as the lossless prefetch point of the same HBM share (the words are the
    validator's own table's: ``strategies.point_words``)."""
    from tiersim.hierarchy.strategies import point_words

    comp = row.get("compressed") or 0.0
    words = point_words(row.get("strategy"), row.get("fetch_share"))
    return f"{row['hbm']:.2f}" + (f" +c{comp:.2f}" if comp else "") + (f" {words}" if words else "")


def _strategy(name, index: int) -> str | None:
    """A calibration point's strategy (None: the scenario's own, prefetch); one that is not registered is refused."""
    from tiersim.hierarchy.strategies import NAMES

    if name is None or name in NAMES:
        return name
    raise TiersimError(f"--against: point {index + 1}'s strategy {name!r} is not one of {', '.join(NAMES)}")


def _points(doc: dict, check: _Fields) -> list[dict]:
    """The measured decode steps of a calibration or operator-profile document, each field checked."""
    from tiersim.hierarchy.strategies import own_share
    from tiersim.simulator.scenario import MAX_BATCH, MAX_TOKENS
    from tiersim.simulator.strategies import measured_share

    def point(model, batch, context, warmup, hbm, measured, steps, label, where, compressed=0.0) -> dict:
        """``where``: (a point's field prefix, the warmup's name, the measured time's key, the steps' name)."""
        warmup = check.whole(where[1], warmup, 0, MAX_STEPS)
        hbm = check.number(f"{where[0]}hbm", hbm, 0.0, 1.0)
        return {"model": check.name(f"{where[0]}model", model),
                "batch": check.whole(f"{where[0]}batch", batch, 1, MAX_BATCH),
                "context": check.whole(f"{where[0]}context", context, 0, MAX_TOKENS) + warmup,
                "hbm": hbm, "compressed": check.number(f"{where[0]}compressed", compressed, 0.0, 1.0 - hbm),
                "measured_ms": check.number(f"{where[0]}{where[2]}", measured, MIN_MS, MAX_MS),
                "steps": check.whole(where[3], steps, 1, MAX_STEPS), "label": label}

    kind = doc["kind"]
    points = []
    if kind == "calibration":
        settings = doc.get("settings") or {}
        model = (doc.get("model_shape") or {}).get("name")
        for i, p in enumerate(doc.get("points") or []):
            if p.get("measured_step_ms") is not None and p.get("measured_step_ms") != 0:  # 0/None: not measured
                points.append(point(p.get("model_shape", model), p["batch"], p["context"], settings.get("warmup", 0),
                                    p["hbm"], p["measured_step_ms"], settings.get("steps", 24), "tiered",
                                    (f"point {i + 1}'s ", "settings.warmup", "measured_step_ms", "settings.steps"),
                                    p.get("compressed", 0.0)))
                # The graph executor's host strategies: simulated as measured, not as prefetch.
                strategy = _strategy(p.get("strategy") or settings.get("strategy"), i)
                if strategy not in (None, "prefetch"):  # the others' share is implied (host attention fetches none)
                    fetched = own_share(strategy, p.get("fetch_share", settings.get("fetch_share")))
                    if fetched is not None:
                        fetched = check.number(f"point {i + 1}'s fetch_share", fetched, 0.0, 1.0)
                    points[-1].update(strategy=strategy, fetch_share=fetched, share=measured_share(strategy, fetched))
    else:
        warmup = (doc.get("settings") or {}).get("decode_warmup", 3)
        for model, entry in (doc.get("models") or {}).items():
            runs = list(entry.get("decode") or [])
            runs += [r for r in entry.get("decode_compare") or [] if r.get("cache") == "tiered"]
            for i, r in enumerate(runs):
                if r.get("step_ms") is not None and r.get("step_ms") != 0:
                    points.append(point(model, r["batch"], r["context"], warmup, r["hbm"], r["step_ms"],
                                        r.get("steps", 10), f"{r['cache']} {r.get('sdpa', 'default')}",
                                        (f"{model} run {i + 1}'s ", "settings.decode_warmup", "step_ms",
                                         f"{model} run {i + 1}'s steps")))
    return points


def simulate_point(scenario, p: dict) -> dict:
    """The simulator's row (``capacity.run``'s) for one measured point of :func:`load_measurements`: a lockstep batch
    at the point's context over as many steps as were timed, its split and strategy as measured. One function, so
    the pre-registered predictions (``tiersim.simulator.preregister``) are what ``--against`` simulates."""
    from tiersim.simulator.capacity import run

    sc = replace(scenario, batch=p["batch"], context=p["context"], steps=max(p["steps"], 1))
    comp = p["compressed"]
    row, _ = run(sc, sc.policy(p["hbm"], round(1.0 - p["hbm"] - comp, 6), comp, 0.0), largest=False,
                 strategy=p.get("strategy"), share=p.get("share"))
    return row


def compare(scenario, points: list[dict], doc: dict | None = None) -> dict:
    """Simulate every point of ``scenario.model``; rows with the error, and its median and worst.

    With the measured ``doc``: its ``executor``, ``host_bound`` (not the CUDA-graph executor: the measured
    steps include host work the simulator's GPU model does not) and, then, a one-line ``note``.
    """
    from tiersim.simulator.calibration import executor_of, host_bound_note

    rows, skipped = [], 0
    for p in points:
        if p["model"] != scenario.model.name:
            skipped += 1
            continue
        row = simulate_point(scenario, p)
        error = 100.0 * (row["step_ms"] / p["measured_ms"] - 1.0)
        rows.append({**p, "simulated_ms": row["step_ms"], "error_pct": error, "compute_model": row["compute_model"]})
    if not rows:
        from tiersim.simulator.presets import MODELS

        names = sorted({str(p["model"]) for p in points})
        hint = ("choose it with --model" if any(n in MODELS for n in names) else
                "no model preset has that shape: `python -m tiersim.simulator.against FILE` prices the file's own")
        raise TiersimError(f"--against: no measured point is of model {scenario.model.name} "
                           f"(the file has {', '.join(names)}); {hint}")
    errors = [abs(r["error_pct"]) for r in rows]
    worst = max(rows, key=lambda r: abs(r["error_pct"]))
    result = {"rows": rows, "skipped_other_models": skipped, "median_abs_error_pct": statistics.median(errors),
              "worst_error_pct": worst["error_pct"], "compute_model": rows[-1]["compute_model"]}
    if doc is not None:
        note = host_bound_note(doc, "--against")
        result.update({"executor": executor_of(doc), "host_bound": note is not None, "note": note})
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m tiersim.simulator.against FILE``: measured vs simulated without typer, rich or (when absent)
    simpy, for the GPU machine; the model and GPU preset default to the file's, ``--calibration`` to FILE when
    it is a calibration. The median |error| is the last line."""
    import argparse
    import importlib.util
    import sys

    from tiersim.simulator.presets import device_preset
    from tiersim.simulator.scenario import assemble

    p = argparse.ArgumentParser(prog="python -m tiersim.simulator.against", description=main.__doc__.splitlines()[0])
    p.add_argument("file", help="a calibration or operator-profile JSON")
    p.add_argument("--model", default=None, help="model preset (default: the file's shape)")
    p.add_argument("--gpu", default=None, help="GPU preset (default: the file's)")
    p.add_argument("--calibration", default=None, help="calibration JSON (default: FILE when it is one)")
    p.add_argument("--profile", default=None, help="operator profile JSON for the compute model")
    p.add_argument("--preregistered", default=None, help="predictions written before the run "
                   "(docs/validation/predicted-<gpu>.json, or a folder: the file there for FILE's GPU preset, "
                   "none being no error): FILE's points beside them instead of a new simulation")
    args = p.parse_args(argv)
    if args.preregistered is not None:
        return _preregistered(args)
    try:
        doc, points = load_measurements(args.file)
        model = args.model or (doc.get("model_shape") or {}).get("name") or points[0]["model"]
        # The file's preset, else the measured device's (presets.device_preset): a file without one was priced on
        # an H100 whatever it measured.
        gpu = args.gpu or doc.get("gpu_preset") or device_preset((doc.get("device") or {}).get("name"))
        calibration = args.calibration or (args.file if doc.get("kind") == "calibration" else None)
        smoke = str((doc.get("device") or {}).get("name") or "").startswith("cpu")
        if smoke and calibration == args.file:
            calibration = None  # a CPU smoke run calibrates no GPU preset: the path is exercised, not the numbers
        engine = "auto" if importlib.util.find_spec("simpy") else "fast"
        from tiersim.simulator.presets import MODELS

        if args.model is None and model not in MODELS and doc.get("model_shape"):
            # A shape with no preset (the CPU smoke run's ``tiny``): the file's own shape, priced as measured.
            from tiersim.shapes import ModelShape
            from tiersim.simulator.presets import Model

            shape = ModelShape.from_record(doc["model_shape"], where=f"--against: {args.file}: model_shape")
            scenario = assemble(1, gpu=gpu, calibration=calibration, engine=engine)
            scenario = replace(scenario, model=Model.from_shape(shape))
        else:
            scenario = assemble(1, model=model, gpu=gpu, calibration=calibration, profile=args.profile,
                                engine=engine)
        result = compare(scenario, points, doc)
    except TiersimError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"{model} on {gpu}: measured ({args.file}, executor {result['executor']}) vs simulated "
          f"(engine {engine}, compute model {result['compute_model']})")
    splits = [split_label(r) for r in result["rows"]]
    w = max([11, *map(len, splits)])  # a host strategy's point names it: '0.50 host-attention'
    print(f"{'run':>18} {'batch':>5} {'context':>7} {'hbm':>{w}} {'measured ms':>11} {'simulated ms':>12} {'error':>7}")
    for r, split in zip(result["rows"], splits):
        print(f"{r['label']:>18} {r['batch']:>5} {r['context']:>7} {split:>{w}} {r['measured_ms']:>11.3f} "
              f"{r['simulated_ms']:>12.3f} {r['error_pct']:>+6.1f}%")
    if result["note"]:
        print(f"note: {result['note']}")
    print(f"median |error| {result['median_abs_error_pct']:.1f}% (worst {result['worst_error_pct']:+.1f}%, "
          f"{len(result['rows'])} points)")
    return 0


def _preregistered(args) -> int:
    """``--preregistered P``: the measured points beside the predictions registered before the run
    (:mod:`tiersim.simulator.preregister`); nothing is simulated, so today's physics cannot move them."""
    import sys

    from tiersim.simulator import preregister

    if args.model or args.gpu or args.calibration or args.profile:
        print("error: --preregistered compares with the file's own predictions: drop --model, --gpu, --calibration "
              "and --profile", file=sys.stderr)
        return 2
    try:
        prereg_path = Path(args.preregistered)
        if prereg_path.is_dir():  # the GPU script's form: the predictions for the preset FILE was measured on
            prereg_path = preregister.in_folder(prereg_path, args.file)
            if not prereg_path.is_file():  # none registered for this GPU: no test to run, and no failure
                print(f"no pre-registered predictions for preset {prereg_path.stem.removeprefix('predicted-')} in "
                      f"{args.preregistered} ({prereg_path.name}): nothing to compare")
                return 0
        result = preregister.compare(preregister.load(prereg_path), args.file)
    except TiersimError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print("\n".join(preregister.compare_lines(result, args.file, prereg_path)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

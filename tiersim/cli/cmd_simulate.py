"""`tiersim simulate` (one config) and `tiersim capacity` (the planning grid)."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import typer

from tiersim.atomic import dumps
from tiersim.cli import capacity_view as view
from tiersim.cli import options
from tiersim.cli.app import (
    RAY_ADDRESS_HELP, add_columns, app, compact_table, console, deliver, err_console, wrote,
)
from tiersim.cli.cmd_serve import Serving, batch_only, capacity_qps, serving_only
from tiersim.cli.groups import ComputeModel, Target, Workload
from tiersim.cli.progress import meter
from tiersim.cli import reports
from tiersim.errors import ConfigError, TiersimError
from tiersim.hierarchy import strategies

FORMATS = ("table", "json")
DEFAULT_BATCH = 64  # simulate's batch, and capacity's when no range is given


def _scenario(target: Target, workload: Workload, compute: ComputeModel, batch: int):
    """The options' scenario (tiersim.simulator.scenario.assemble does the domain work and its checks)."""
    from tiersim.simulator.scenario import assemble

    scenario = assemble(batch, model=target.model, model_config=target.model_config, gpu=target.gpu,
                    trace=workload.trace, lengths=workload.lengths, context=workload.context,
                    prefetch=workload.prefetch, steps=workload.steps, seed=workload.seed,
                    calibration=compute.calibration, profile=compute.profile, host_floor=compute.host_floor,
                    host_overhead=compute.host_overhead, engine_overhead=compute.engine_overhead, engine=compute.engine,
                    warn=lambda text: err_console.print(f"[yellow]note:[/] {text}", highlight=False))
    _check_context(scenario)
    return scenario


def _check_context(scenario) -> None:
    """One line when a sequence the options ask for is longer than the model's context: a lockstep batch ends at
    --context + --steps tokens, a staggered one's mean sequence is the prompt and a mean-length output. Here, not
    in ``assemble``: the fidelity sources are priced at the contexts they were measured at."""
    from tiersim.shapes import check_context

    shape = scenario.model.shape
    if scenario.context is not None:
        check_context(shape, scenario.context + scenario.steps,
                      f"--context {scenario.context:,} + --steps {scenario.steps:,}")
    else:
        check_context(shape, scenario.prompt_len + scenario.mean_length,
                      f"a {scenario.prompt_len:,}-token prompt + --lengths mean {scenario.mean_length:,.0f}")


def _split(scenario, hbm, ddr, compressed, evict):
    """The split asked for. TierConfig checks it; its message names the field (``TierConfig.hbm``),
    here the option the user typed (``--hbm``)."""
    try:
        return scenario.policy(hbm, ddr, compressed, evict)
    except ConfigError as exc:
        option = re.sub(r"TierConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(exc))
        raise ConfigError(option) from None


def _against(scenario, path: Path, max_error: float | None, fmt: str) -> None:
    """Measured vs simulated per point, the median and worst error; exit 1 past ``max_error``."""
    from tiersim.simulator.against import compare, load_measurements, split_label

    doc, points = load_measurements(path)
    result = compare(scenario, points, doc)
    if result["note"]:
        err_console.print(f"[yellow]note:[/] {result['note']}", highlight=False)
    if fmt == "json":
        print(dumps(result))
    else:
        table = compact_table(f"{scenario.model.name} on {scenario.gpu.name}: measured ({path.name}) vs simulated")
        add_columns(table, ("run", "batch", "context", "hbm", "measured ms", "simulated ms", "error"),
                optional=("context", "batch"))
        for r in result["rows"]:
            table.add_row(r["label"], str(r["batch"]), f"{r['context']:,}", split_label(r), f"{r['measured_ms']:.2f}",
                          f"{r['simulated_ms']:.2f}", f"{r['error_pct']:+.1f}%")
        console.print(table)
        console.print(f"median |error| {result['median_abs_error_pct']:.1f}%, worst {result['worst_error_pct']:+.1f}% "
                      f"over {len(result['rows'])} points ({result['skipped_other_models']} of other models left out); "
                      f"compute model: {result['compute_model']}", highlight=False, markup=False)
    if max_error is not None and result["median_abs_error_pct"] > max_error:
        err_console.print(f"gate failed: median |error| {result['median_abs_error_pct']:.1f}% > --max-error {max_error:g}%",
                          highlight=False, markup=False)
        raise SystemExit(1)


def _preregistered(against: Path | None, path: Path, max_error: float | None, fmt: str) -> None:
    """``--against R --preregistered P``: R's points beside the predictions P froze before the run (nothing is
    simulated: the scenario's options do not apply); exit 1 past ``max_error``."""
    from tiersim.simulator import preregister

    if against is None:
        raise TiersimError(f"--preregistered {path} needs --against RESULTS (the GPU run's graph-grid file)")
    if path.is_dir():
        path = preregister.in_folder(path, against)
        if not path.is_file():
            raise TiersimError(f"--preregistered: no {path.name} in {path.parent}: no predictions are registered "
                               f"for the GPU preset {against} was measured on")
    result = preregister.compare(preregister.load(path), against)
    if fmt == "json":
        print(dumps(result))
    else:
        for line in preregister.compare_lines(result, against, path):
            console.print(line, highlight=False, markup=False)
    if max_error is not None and result["median_abs_error_pct"] > max_error:
        err_console.print(f"gate failed: median |error| {result['median_abs_error_pct']:.1f}% > --max-error {max_error:g}%",
                          highlight=False, markup=False)
        raise SystemExit(1)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise TiersimError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")


HTML = (".html", ".htm")


@app.command()
@options.command(outputs={"out": (".parquet",), "report": HTML}, example=["--steps", "2", "--batch", "2"])
def simulate(
    target: Target = Target(),
    batch: int = options.opt(DEFAULT_BATCH, help="sequences decoded together", min=1, max=1 << 16),
    hbm: float = options.opt(0.5, help="share of each sequence's KV kept in HBM", min=0, max=1),
    ddr: float = options.opt(0.5, help="share offloaded to host DDR (exact, fetched back as --strategy says)",
                             min=0, max=1),
    compressed: float = options.opt(0.0, help="share held quantized on the device", min=0, max=1),
    evict: float = options.opt(0.0, help="share evicted for good (not exact)", min=0, max=1),
    workload: Workload = Workload(),
    compute: ComputeModel = ComputeModel(),
    against: Path = typer.Option(None, "--against", help="measured decode steps (a calibration or operator-profile "
                                 "JSON): simulate each point, print measured vs simulated with median and worst error"),
    preregistered: Path = options.opt(None, "--preregistered", help="with --against: set its points beside these "
                                      "predictions, written before the run (docs/validation/predicted-<gpu>.json, "
                                      "or the folder holding the one for the results' GPU preset), instead of "
                                      "simulating them", input="folder"),
    max_error: float = options.opt(None, "--max-error", help="with --against: exit 1 when the median |error| "
                                   "exceeds this many percent (the gate)", min=0),
    fmt: str = options.opt("table", "--format", help="table or json", choices=FORMATS),
    out: Path = typer.Option(None, help="write the per-step timeline (Parquet, kind 'simulation')"),
    report: Path = typer.Option(None, help="also write an HTML report"),
) -> None:
    """Simulate one tier config: HBM use, PCIe traffic, stalls and throughput."""
    import time

    started = time.perf_counter()
    from tiersim.simulator.capacity import baseline_policy, run, with_overhead
    from tiersim.simulator.results import simulation_meta, timeline_frame, write_timeline

    _check_format(fmt)
    if max_error is not None and (against is None or not max_error >= 0):
        raise TiersimError(f"--max-error needs --against and a value >= 0, got {max_error}")
    if preregistered is not None:
        given = [name for name, value, default in (
            ("the model and GPU", target, Target()), ("the workload", workload, Workload()),
            ("the compute model", compute, ComputeModel()), ("--batch", batch, DEFAULT_BATCH), ("--hbm", hbm, 0.5),
            ("--ddr", ddr, 0.5), ("--compressed", compressed, 0.0), ("--evict", evict, 0.0), ("--out", out, None),
            ("--report", report, None)) if value != default]
        if given:
            raise TiersimError(f"--preregistered compares with the file's own predictions and simulates nothing: drop "
                               f"{', '.join(given)}")
        _preregistered(against, preregistered, max_error, fmt)
        return
    scenario = _scenario(target, workload, compute, batch)
    if against is not None:
        _against(scenario, against, max_error, fmt)
        return
    policy = _split(scenario, hbm, ddr, compressed, evict)
    baseline, _ = run(scenario, baseline_policy(scenario))
    row, timeline = run(scenario, policy)
    row = with_overhead(row, baseline)
    meta = simulation_meta(scenario, policy.tiers.ratios(), row)

    def write_out():
        write_timeline(out, timeline, meta)
        wrote(out)

    def write_report():
        if out and out.exists():
            reports.write_report([out], report)
        else:  # the table `--out` would write, not written
            reports.write_report([(timeline_frame(timeline), meta)], report, "simulate")

    if fmt == "json":  # the document first: a file that cannot be written never costs the result
        deliver({**meta, "baseline": baseline, "rows": [row]}, [(out, write_out), (report, write_report)])
        return
    table = view.rows_table([row], f"{scenario.model.name} on {scenario.gpu.name}, batch {batch}, "
                                    f"{view.workload_words(scenario)} ({scenario.trace_label} trace)")
    console.print(table)
    if not baseline["fits"]:
        console.print(f"[yellow]note:[/] the all-in-HBM baseline needs {baseline['peak_hbm_gb']:.1f} GB "
                      f"and does not fit in {scenario.gpu.hbm_bytes / 1e9:.0f} GB; overhead is against it anyway.")
    console.print(f"compute model: {row['compute_model']}", highlight=False, markup=False)
    simulated = (row["step_ms"] + baseline["step_ms"]) * scenario.steps / 1e3
    wall = time.perf_counter() - started
    factor = simulated / wall
    console.print(f"real-time factor: {factor:,.0f}x" if factor >= 10 else f"real-time factor: {factor:.2g}x",
                  f"({simulated:.3g} simulated GPU s, this config and its all-in-HBM baseline, in {wall:.2f} wall s)",
                  highlight=False, markup=False)
    deliver(None, [(out, write_out), (report, write_report)])


@app.command()
@options.command(outputs={"out": (".json",), "report": HTML}, example=["--batch", "2", "--steps", "2"])
def capacity(
    batch: str = typer.Option(str(DEFAULT_BATCH), help="sequences decoded together: a number, or a range like 16..1024 "
                                          "(powers of two between the ends)"),
    target: Target = Target(),
    workload: Workload = Workload(),
    tpot_slo: float = options.tpot_slo(None, "latency budget: mean time per output token, ms (with --qps: the "
                                       "p99 SLO, default 50)"),
    max_evict: float = options.opt(0.0, "--max-evict", help="quality budget: largest share of the KV evicted",
                                   min=0, max=0.999),
    strategy: str = typer.Option("all", help="offload strategies compared: all, or a comma list of "
                                             + strategies.help_text()),
    max_overhead: float = options.opt(10.0, "--max-overhead", help="overhead budget of the grid's 'best', percent",
                                      min=0),
    compute: ComputeModel = ComputeModel(),
    fmt: str = options.opt("table", "--format", help="table or json", choices=FORMATS),
    out: Path = typer.Option(None, help="also write the JSON result here"),
    report: Path = typer.Option(None, help="also write an HTML report"),
    ray: bool = typer.Option(False, "--ray", help="run each simulation as a task on Ray (needs pip install "
                                                  "'tiersim\\[cluster]'; see docs/cluster.md)"),
    ray_address: str = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
    qps: str = typer.Option(None, "--qps", help="plan for a request workload instead: the highest requests/s in "
                            "this range (LO..HI, or HI) within --ttft-slo and --tpot-slo (p99, ms) per --on-full "
                            "policy (tiersim serve's engine; docs/serving.md)"),
    serving: Serving = Serving(),
) -> None:
    """Plan HBM: the most tokens/s within a TPOT budget, which split and strategy gets there, and the
    full cache at its largest batch; with one batch, also the simulated grid and a batch sweep. With --qps:
    the highest request rate within p99 TTFT / TPOT SLOs per --on-full policy."""
    if qps is not None:  # the serving simulator's search (tiersim.cli.cmd_serve); the batch planner's options refused
        batch_only({"--batch": batch != str(DEFAULT_BATCH), "--max-evict": max_evict != 0.0,
                    "--max-overhead": max_overhead != 10.0, "--ray": ray, "--ray-address": ray_address is not None},
                   workload, compute)
        return capacity_qps(qps, target, serving, strategy, workload.lengths, workload.seed, tpot_slo, fmt, out, report,
                            compute.engine_overhead)
    serving_only(serving)
    from tiersim.fileformat import write_document
    from tiersim.simulator import planner
    from tiersim.simulator.capacity import capacity_ticks, grid_result, range_result

    _check_format(fmt)
    if not max_overhead >= 0:  # NaN too
        raise TiersimError(f"--max-overhead must be >= 0, got {max_overhead}")
    if not 0.0 <= max_evict < 1.0:
        raise TiersimError(f"--max-evict must be in [0, 1), got {max_evict}")
    batches = planner.parse_batches(batch)
    strategies = planner.parse_strategies(strategy)
    ray = ray or ray_address is not None
    if ray and len(batches) > 1:
        raise TiersimError("--ray runs the SimPy grid of one batch; a batch range is closed form and runs here "
                           "in about a second: drop --ray")
    if ray:
        from tiersim.cluster import import_ray

        import_ray()  # without Ray, say what to install before any work
    scenario = _scenario(target, workload, compute, batches[0])
    single = len(batches) == 1
    total = 1 + (capacity_ticks(scenario) if single else 0)
    with contextlib.ExitStack() as stack:
        map_runs = None
        if ray:  # the grid's SimPy runs become Ray tasks; the planner's closed form stays here
            from tiersim.cluster import connect, map_tasks

            cluster = stack.enter_context(connect(ray_address))
            map_runs = lambda fn, jobs, tick: map_tasks(cluster, fn, jobs, on_done=tick)  # noqa: E731
        progress = stack.enter_context(meter("simulating on Ray" if ray else "simulating", total, eta=False,
                                             transient=not ray))
        answer = planner.plan(scenario, batches, tpot_slo, max_evict, strategies)
        progress.advance()
        if single:
            result = grid_result(scenario, max_overhead, progress=progress.advance, map_runs=map_runs)
        else:
            result = range_result(scenario, max_overhead, answer)
    result = {"recommendation": answer["recommendation"], **result,
              "planner": {k: v for k, v in answer.items() if k != "points"}, "points": answer["points"]}
    writes = [(out, lambda: (write_document(out, result), wrote(out))),
              (report, lambda: reports.write_report([result], report, "capacity"))]
    if fmt == "json":  # the document first: a file that cannot be written never costs the result
        deliver(result, writes)
        return
    view.print_capacity(result, scenario)
    deliver(None, writes)


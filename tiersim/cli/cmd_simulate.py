"""`tiersim simulate` (one config) and `tiersim capacity` (the planning grid)."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import typer
from rich.table import Table

from tiersim.cli import options
from tiersim.cli.app import (
    RAY_ADDRESS_HELP, add_columns, app, check_output_path, compact_table, console, deliver, err_console, wrote,
)
from tiersim.cli.groups import ComputeModel, Target, Workload
from tiersim.cli.progress import meter
from tiersim.errors import ConfigError, TiersimError
from tiersim.hierarchy import strategies

FORMATS = ("table", "json")
DEFAULT_BATCH = 64  # simulate's batch, and capacity's when no range is given


def _scenario(target: Target, workload: Workload, compute: ComputeModel, batch: int):
    """The options' scenario (tiersim.simulator.scenario.assemble does the domain work and its checks)."""
    from tiersim.simulator.scenario import assemble

    return assemble(batch, model=target.model, model_config=target.model_config, gpu=target.gpu,
                    trace=workload.trace, lengths=workload.lengths, context=workload.context,
                    prefetch=workload.prefetch, steps=workload.steps, seed=workload.seed,
                    calibration=compute.calibration, profile=compute.profile, host_floor=compute.host_floor,
                    host_overhead=compute.host_overhead, engine=compute.engine,
                    warn=lambda text: err_console.print(f"[yellow]note:[/] {text}", highlight=False))


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
    from tiersim.simulator.against import compare, load_measurements

    _, points = load_measurements(path)
    result = compare(scenario, points)
    if fmt == "json":
        print(json.dumps(result, default=float))
    else:
        table = compact_table(f"{scenario.model.name} on {scenario.gpu.name}: measured ({path.name}) vs simulated")
        add_columns(table, ("run", "batch", "context", "hbm", "measured ms", "simulated ms", "error"),
                optional=("context", "batch"))
        for r in result["rows"]:
            table.add_row(r["label"], str(r["batch"]), f"{r['context']:,}", f"{r['hbm']:.2f}", f"{r['measured_ms']:.2f}",
                          f"{r['simulated_ms']:.2f}", f"{r['error_pct']:+.1f}%")
        console.print(table)
        console.print(f"median |error| {result['median_abs_error_pct']:.1f}%, worst {result['worst_error_pct']:+.1f}% "
                      f"over {len(result['rows'])} points ({result['skipped_other_models']} of other models left out); "
                      f"compute model: {result['compute_model']}", highlight=False, markup=False)
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
    from tiersim.simulator.results import simulation_meta, write_timeline

    _check_format(fmt)
    check_output_path(out, "--out", (".parquet",))
    check_output_path(report, "--report", (".html", ".htm"))
    if max_error is not None and (against is None or not max_error >= 0):
        raise TiersimError(f"--max-error needs --against and a value >= 0, got {max_error}")
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
            _write_report([out], report)
        else:  # the report reads the same file `--out` would write
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                timeline_path = Path(tmp) / "simulation.parquet"
                write_timeline(timeline_path, timeline, meta)
                _write_report([timeline_path], report, _this_run("simulate"))

    if fmt == "json":  # the document first: a file that cannot be written never costs the result
        deliver({**meta, "baseline": baseline, "rows": [row]}, [(out, write_out), (report, write_report)])
        return
    table = _rows_table([row], f"{scenario.model.name} on {scenario.gpu.name}, batch {batch}, "
                               f"{_workload_words(scenario)} ({scenario.trace_label} trace)")
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
    tpot_slo: float = options.opt(None, "--tpot-slo", help="latency budget: mean time per output token, ms",
                                  min=0),
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
) -> None:
    """Plan HBM: the most tokens/s within a TPOT budget, which split and strategy gets there, and the
    full cache at its largest batch; with one batch, also the simulated grid and a batch sweep."""
    from tiersim.fileformat import write_document
    from tiersim.simulator import planner
    from tiersim.simulator.capacity import capacity_ticks, grid_result, range_result

    _check_format(fmt)
    if not max_overhead >= 0:  # NaN too
        raise TiersimError(f"--max-overhead must be >= 0, got {max_overhead}")
    check_output_path(out, "--out", (".json",))
    check_output_path(report, "--report", (".html", ".htm"))
    if tpot_slo is not None and not tpot_slo > 0:
        raise TiersimError(f"--tpot-slo must be > 0 ms, got {tpot_slo}")
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
              (report, lambda: _write_report([result], report, _this_run("capacity")))]
    if fmt == "json":  # the document first: a file that cannot be written never costs the result
        deliver(result, writes)
        return
    _print_capacity(result, scenario)
    deliver(None, writes)


def _rows_table(rows: list[dict], title: str) -> Table:
    table = compact_table(title)
    # The staging buffers and every other field are in --format json / --out.
    add_columns(table, ("hbm/ddr/cmp/evict", "KV GB", "saved", "peak GB", "fits", "step ms", "stall ms",
                        "overhead", "tok/s", "max B"), optional=("KV GB", "max B", "peak GB", "stall ms"))
    for r in rows:
        table.add_row(
            "/".join(f"{r[k]:.2f}" for k in ("hbm", "ddr", "compressed", "evict")),
            f"{r['kv_full_gb']:.1f}→{r['kv_hbm_gb']:.1f}", f"{r['hbm_saved_gb']:.1f}",
            f"{r['peak_hbm_gb']:.1f}", _fits_cell(r), f"{r['step_ms']:.1f}",
            f"{r['stall_ms']:.1f}", f"{r['overhead_pct']:+.1f}%", f"{r['tokens_per_s']:,.0f}",
            "" if r.get("max_batch") is None else str(r["max_batch"]),
        )
    return table


def _context_words(row: dict) -> str:
    return (f"{row['steps']} steps; context per sequence mean {row['context_tokens_mean']:,.0f} / "
            f"peak {row['context_tokens_peak']:,.0f} tokens")


def _strategy_label(r: dict) -> str:
    """The registry's label, ``*`` when approximate, and the split where the registry shows it."""
    if r["strategy"] == strategies.NO_OFFLOAD:
        return "full cache" if r["evict"] == 0 else "evict only"
    spec = strategies.get(r["strategy"])
    name = spec.label + ("*" if r["approximate"] else "")
    if spec.share_words is not None:
        name += f" ({r['share']:.0%}{' ' + spec.share_words if spec.share_words else ''})"
    return name


def _strategy_table(answer: dict, title: str) -> Table:
    """Per strategy its best point (most tok/s within the SLO, else the quickest that fits)."""
    table = compact_table(title)
    add_columns(table, ("strategy", "batch", "HBM/DDR/ev", "TPOT ms", "tok/s", "freed GB", "peak GB", "SLO",
                        "ctx mean/peak"), optional=("ctx mean/peak", "peak GB", "freed GB"))
    table.columns[2].justify = "left"
    rows = []
    if answer["full_cache"]:
        rows.append(("full @ largest", answer["full_cache"]))
    rows += [(_strategy_label(r), r) for r in answer["best_per_strategy"].values()]
    slo = answer["tpot_slo_ms"]
    for label, r in rows:
        ok = "-" if slo is None else ("[green]yes[/]" if r["within_slo"] else "[red]no[/]")
        table.add_row(label, f"{r['batch']:,}", f"{r['hbm']:.2f}/{r['ddr']:.2f}/{r['evict']:.2f}",
                      f"{r['tpot_ms']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['hbm_saved_gb']:.1f}",
                      f"{r['peak_hbm_gb']:.1f}", ok, f"{r['context_tokens_mean']:,.0f}/{r['context_tokens_peak']:,.0f}")
    return table


def _batch_table(answer: dict) -> Table:
    """Per batch and strategy: the most tok/s (TPOT ms) among the splits that fit and meet the SLO."""
    NO_OFFLOAD = strategies.NO_OFFLOAD
    names = [NO_OFFLOAD, *answer["strategies"]]
    table = compact_table(f"Per batch: best tok/s / TPOT ms that fits{_slo_words(answer)} (red: over the SLO); "
                          f"{answer['steps']} steps each, closed form")
    add_columns(table, ["batch", *("full/ev" if name == NO_OFFLOAD else strategies.get(name).short for name in names),
                        "ctx mean/peak"], left=0)
    max_evict = answer["max_evict"]
    for batch in answer["batches"]:
        mine = [r for r in answer["points"] if r["batch"] == batch and r["evict"] <= max_evict + 1e-9]
        cells = []
        for name in names:
            fit = [r for r in mine if r["strategy"] == name and r["fits"]]
            ok = [r for r in fit if r["within_slo"]]
            if ok:
                r = max(ok, key=lambda x: x["tokens_per_s"])
                cells.append(f"{r['tokens_per_s']:,.0f}/{r['tpot_ms']:.0f}")
            elif fit:
                r = min(fit, key=lambda x: x["tpot_ms"])
                cells.append(f"[red]{r['tokens_per_s']:,.0f}/{r['tpot_ms']:.0f}[/]")
            else:
                cells.append("[dim]no fit[/]")
        table.add_row(f"{batch:,}", *cells, f"{mine[0]['context_tokens_mean']:,.0f}/{mine[0]['context_tokens_peak']:,.0f}")
    return table


def _slo_words(answer: dict) -> str:
    return f" within {answer['tpot_slo_ms']:g} ms" if answer["tpot_slo_ms"] is not None else ""


def _print_capacity(result: dict, scenario) -> None:
    answer = {**result["planner"], "points": result["points"]}
    console.print(f"[bold]{result['recommendation']}[/]", highlight=False, soft_wrap=True)  # one line: | head -1
    console.print(f"{result['model']} on {result['gpu']}, {_workload_words(scenario)}\n({result['trace']} trace; "
                  "ctx: tokens held per sequence, mean / peak over the simulated steps)", highlight=False)
    console.print(_strategy_table(answer, f"Best point per strategy{_slo_words(answer)} "
                                          f"(closed form, {answer['steps']} steps each)"))
    if len(answer["batches"]) > 1:
        console.print(_batch_table(answer))
    else:
        rows = result["rows"]
        engine = rows[0].get("method", "SimPy") if rows else "SimPy"  # the engine the rows say they used
        console.print(_rows_table(rows, f"Prefetch grid at batch {result['batch']} ({engine}; {_context_words(rows[0])})"))
        console.print(_sweep_table(result["batch_sweep"]))
    console.print(f"compute model: {(result.get('baseline') or {}).get('compute_model', 'roofline')}", highlight=False,
                  markup=False)
    base = result["baseline"]
    approx = [s for s in answer["strategies"] if s in strategies.APPROXIMATE]
    if approx:
        console.print("* approximate, never recommended: selective fetches the DDR tokens that held 99% of its\n"
                      "  attention in the trace (an oracle); int8 transfer quantizes the DDR tier.", highlight=False)
    if base and not base["fits"]:
        console.print(f"[yellow]note:[/] the all-in-HBM baseline needs {base['peak_hbm_gb']:.1f} GB at batch "
                      f"{base['batch']} and [red]does NOT fit[/] in {base['hbm_capacity_gb']:.0f} GB; overheads are "
                      "against it anyway.", highlight=False)
    workload = "lockstep batch" if scenario.context is not None else "staggered batch"
    console.print(f"Largest batch with the full cache: {result['max_batch_full_cache']:,} (peak HBM over "
                  f"{answer['steps']} steps of the {workload}).", highlight=False)
    budget = result["max_overhead_pct"]
    if len(answer["batches"]) == 1:
        for label, best in (("Most HBM freed", result["best"]), ("Most freed, lossless", result.get("best_lossless"))):
            if best:
                console.print(f"{label} within {budget:g}% overhead: {best['hbm']:.2f}/{best['ddr']:.2f}/"
                              f"{best['evict']:.2f} saves {best['hbm_saved_gb']:.1f} GB at {best['overhead_pct']:+.1f}% "
                              f"(largest batch {best['max_batch']}).", highlight=False)
            else:
                console.print(f"{label}: no prefetch config saves HBM within {budget:g}% overhead at this batch.",
                              highlight=False)


def _fits_cell(row: dict) -> str:
    if row["fits"]:
        return "[green]yes[/]"
    return "[red]host[/]" if row.get("hbm_fits", False) else "[red]no[/]"


def _sweep_table(sweep: list[dict]) -> Table:
    """Overhead and savings of the lossless configs per batch size: where the link starts to bind."""
    hbms = sorted({r["hbm"] for r in sweep}, reverse=True)
    steps = sweep[0]["steps"] if sweep else 0
    engines = sorted({r.get("method", "closed form") for r in sweep} - {"closed form"})
    at_batch = f"; the grid's {', '.join(engines)} rows at its batch" if engines else ""
    table = compact_table(f"Prefetch batch sweep, no eviction: overhead / HBM saved GB (✗: does not fit; {steps} "
                          f"steps each; closed form{at_batch})")
    add_columns(table, ["batch", *(f"hbm {h:.2f}" for h in hbms), "ctx mean/peak"], left=0)
    for batch in sorted({r["batch"] for r in sweep}):
        cells = []
        mine = [x for x in sweep if x["batch"] == batch]
        for h in hbms:
            r = next(x for x in mine if x["hbm"] == h)
            cell = f"{r['overhead_pct']:+.0f}% / {r['hbm_saved_gb']:.1f}"
            cells.append(cell if r["fits"] else f"[red]{cell} ✗[/]")
        table.add_row(str(batch), *cells, f"{mine[0]['context_tokens_mean']:,.0f}/{mine[0]['context_tokens_peak']:,.0f}")
    return table


def _workload_words(scenario) -> str:
    words = (f"lockstep from {scenario.context:,} context tokens" if scenario.context is not None
             else f"~{scenario.mean_length:,.0f} generated tokens per sequence (staggered: each slot mid-sequence)")
    if scenario.prefetch != "all":
        words += f", {scenario.prefetch} prefetch ({scenario.prefetch_share():.0%} of DDR, not exact)"
    return words


def _this_run(command: str) -> str:
    """How a report names an input this very run computed: its command line, not ``<in memory>``."""
    import shlex
    import sys

    args = sys.argv[1:] if sys.argv[1:2] == [command] else [command]
    return "this run: " + shlex.join(["tiersim", *args])


def _write_report(inputs: list, path: Path, source: str | None = None) -> None:
    """Write the report; ``source``: the name of inputs this run computed (see :func:`_this_run`)."""
    try:
        from tiersim.report import write_report
        from tiersim.report.loaders import load_input
    except ImportError:
        raise TiersimError("--report needs tiersim.report, which this installation lacks") from None
    loaded = [load_input(item) for item in inputs]
    for item in loaded if source else ():
        item.source = source
    write_report(loaded, path)
    wrote(path)

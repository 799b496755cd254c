"""`tiersim simulate` (one config) and `tiersim capacity` (the planning grid)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from tiersim.cli.app import app, console, err_console
from tiersim.cli.progress import meter
from tiersim.errors import TiersimError

FORMATS = ("table", "json")


def _scenario(trace, model, model_config, gpu, batch, lengths, context, prefetch, steps, seed, calibration,
              profile=None, host_floor=True):
    from tiersim.simulator.calibration import apply_calibration, load_calibration
    from tiersim.simulator.profile import check_device, load_profile, table_for
    from tiersim.simulator.capacity import PREFETCH_MODES, SYNTHETIC_LABEL, load_trace, scenario_from_trace
    from tiersim.simulator.presets import get_gpu, get_model, model_from_config
    from tiersim.traces.synth import parse_lengths

    if batch < 1:
        raise TiersimError(f"--batch must be >= 1, got {batch}")
    if steps < 1:
        raise TiersimError(f"--steps must be >= 1, got {steps}")
    if context is not None and context < 1:
        raise TiersimError(f"--context must be >= 1, got {context}")
    if context is not None and lengths is not None:
        raise TiersimError(f"use either --context ({context}) or --lengths ({lengths}), not both")
    if prefetch not in PREFETCH_MODES:
        raise TiersimError(f"--prefetch must be one of {', '.join(PREFETCH_MODES)}, got {prefetch!r}")
    lengths = lengths or "math500"
    mean_length = None if lengths.strip().lower() == "trace" else parse_lengths(lengths)
    mdl = model_from_config(model_config) if model_config else get_model(model)
    hw = get_gpu(gpu)
    if calibration:
        cal = load_calibration(calibration)
        check_device(cal, gpu, "--calibration")
        hw = apply_calibration(hw, cal)
    table, note = None, "roofline (no --profile given)"
    if profile:
        doc = load_profile(profile)
        check_device(doc, gpu, "--profile")
        table, note = table_for(doc, mdl)
        if table is not None and not host_floor:
            table.drop_host()
    loaded = load_trace(trace)
    if loaded is None:
        if mean_length is None:
            raise TiersimError("--lengths trace: no trace to take lengths from (the bundled trace is missing)")
        err_console.print("[yellow]note:[/] the bundled trace is missing from this install; using the synthetic "
                          "profile documented in docs/simulator.md", highlight=False)
    label = str(trace) if trace else ("bundled" if loaded is not None else SYNTHETIC_LABEL)
    scenario = scenario_from_trace(loaded, mdl, hw, batch, mean_length, steps=steps, seed=seed, label=label,
                                   context=context, prefetch=prefetch)
    scenario.table, scenario.compute_note = table, note
    return scenario


def _against(scenario, path: Path, max_error: float | None, fmt: str) -> None:
    """Measured vs simulated per point, the median and worst error; exit 1 past ``max_error``."""
    from tiersim.simulator.against import compare, load_measurements

    _, points = load_measurements(path)
    result = compare(scenario, points)
    if fmt == "json":
        print(json.dumps(result, default=float))
    else:
        table = Table(title=f"{scenario.model.name} on {scenario.gpu.name}: measured ({path.name}) vs simulated",
                      title_justify="left")
        for col in ("run", "batch", "context", "hbm", "measured ms", "simulated ms", "error"):
            table.add_column(col, justify="left" if col == "run" else "right")
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


TRACE_HELP = "trace to project from (default: the bundled SmolLM2 capture)"
LENGTHS_HELP = ("mean generated tokens (log-normal, staggered batch): a number, gsm8k/math500/amc23/gpqa/aime, "
                "or 'trace' [default: math500]")
CONTEXT_HELP = "instead of --lengths: a lockstep batch decoding from this many context tokens"
PREFETCH_HELP = ("DDR tokens fetched per step: all (exact), or cover99/cover90: an oracle selective prefetch of the "
                 "trace's tokens holding 99%/90% of the DDR tier's attention (not exact)")


@app.command()
def simulate(
    trace: Path = typer.Option(None, help=TRACE_HELP),
    model: str = typer.Option("r1-distill-qwen-7b", help="model preset (see `tiersim presets`)"),
    model_config: Path = typer.Option(None, "--model-config", help="a transformers config.json instead of a preset"),
    gpu: str = typer.Option("h100-sxm", help="GPU preset"),
    batch: int = typer.Option(64, help="sequences decoded together"),
    hbm: float = typer.Option(0.5), ddr: float = typer.Option(0.5),
    compressed: float = typer.Option(0.0), evict: float = typer.Option(0.0),
    lengths: str = typer.Option(None, help=LENGTHS_HELP),
    context: int = typer.Option(None, help=CONTEXT_HELP),
    prefetch: str = typer.Option("all", help=PREFETCH_HELP),
    steps: int = typer.Option(256, help="decode steps simulated (steady state, staggered batch)"),
    seed: int = typer.Option(0),
    calibration: Path = typer.Option(None, help="calibration JSON from `tiersim validate`"),
    profile: Path = typer.Option(None, help="operator profile JSON (python -m tiersim.validator.operators): "
                                 "measured operator times instead of the roofline"),
    host_floor: bool = typer.Option(True, "--host-floor/--no-host-floor",
                                    help="with --profile: a step lasts at least the profiled HF eager host time "
                                         "(--no-host-floor: a launch-free engine, device time only)"),
    against: Path = typer.Option(None, "--against", help="measured decode steps (a calibration or operator-profile "
                                 "JSON): simulate each point, print measured vs simulated with median and worst error"),
    max_error: float = typer.Option(None, "--max-error", help="with --against: exit 1 when the median |error| "
                                    "exceeds this many percent (the gate)"),
    fmt: str = typer.Option("table", "--format", help="table or json"),
    out: Path = typer.Option(None, help="write the per-step timeline (Parquet, kind 'simulation')"),
    report: Path = typer.Option(None, help="also write an HTML report"),
) -> None:
    """Simulate one tier config: HBM use, PCIe traffic, stalls and throughput."""
    import time

    started = time.perf_counter()
    from tiersim.simulator.capacity import baseline_policy, run, with_overhead
    from tiersim.simulator.results import simulation_meta, write_timeline

    _check_format(fmt)
    if max_error is not None and (against is None or not max_error >= 0):
        raise TiersimError(f"--max-error needs --against and a value >= 0, got {max_error}")
    scenario = _scenario(trace, model, model_config, gpu, batch, lengths, context, prefetch, steps, seed, calibration,
                         profile, host_floor)
    if against is not None:
        _against(scenario, against, max_error, fmt)
        return
    policy = scenario.policy(hbm, ddr, compressed, evict)
    baseline, _ = run(scenario, baseline_policy(scenario))
    row, timeline = run(scenario, policy)
    row = with_overhead(row, baseline)
    meta = simulation_meta(scenario, {"hbm": hbm, "ddr": ddr, "compressed": compressed, "evict": evict}, row)
    if out:
        write_timeline(out, timeline, meta)
    if report:
        if out:
            _write_report([out], report)
        else:  # the report reads the same file `--out` would write
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                timeline_path = Path(tmp) / "simulation.parquet"
                write_timeline(timeline_path, timeline, meta)
                _write_report([timeline_path], report)
    if fmt == "json":
        print(json.dumps({**meta, "baseline": baseline, "rows": [row]}, indent=2, default=float))
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
    console.print(f"real-time factor: {simulated / wall:,.0f}x ({simulated:.2f} simulated GPU s, this config and "
                  f"its all-in-HBM baseline, in {wall:.2f} wall s)", highlight=False, markup=False)
    if out:
        console.print(f"wrote {out}", highlight=False, markup=False)


@app.command()
def capacity(
    batch: int = typer.Option(64, help="sequences decoded together"),
    model: str = typer.Option("r1-distill-qwen-7b", help="model preset (see `tiersim presets`)"),
    model_config: Path = typer.Option(None, "--model-config", help="a transformers config.json instead of a preset"),
    gpu: str = typer.Option("h100-sxm", help="GPU preset"),
    trace: Path = typer.Option(None, help=TRACE_HELP),
    lengths: str = typer.Option(None, help=LENGTHS_HELP),
    context: int = typer.Option(None, help=CONTEXT_HELP),
    prefetch: str = typer.Option("all", help=PREFETCH_HELP),
    max_overhead: float = typer.Option(10.0, "--max-overhead", help="overhead budget, percent of step time"),
    steps: int = typer.Option(256, help="decode steps simulated per config"),
    seed: int = typer.Option(0),
    calibration: Path = typer.Option(None, help="calibration JSON from `tiersim validate`"),
    profile: Path = typer.Option(None, help="operator profile JSON (python -m tiersim.validator.operators): "
                                 "measured operator times instead of the roofline"),
    host_floor: bool = typer.Option(True, "--host-floor/--no-host-floor",
                                    help="with --profile: a step lasts at least the profiled HF eager host time "
                                         "(--no-host-floor: a launch-free engine, device time only)"),
    fmt: str = typer.Option("table", "--format", help="table or json"),
    out: Path = typer.Option(None, help="also write the JSON result here"),
    report: Path = typer.Option(None, help="also write an HTML report"),
) -> None:
    """Plan HBM: a grid of tier configs at one batch size, the best config and the largest batches."""
    from tiersim.atomic import write_json
    from tiersim.simulator.capacity import capacity as plan, grid_policies, sweep_batches

    _check_format(fmt)
    if max_overhead < 0:
        raise TiersimError(f"--max-overhead must be >= 0, got {max_overhead}")
    scenario = _scenario(trace, model, model_config, gpu, batch, lengths, context, prefetch, steps, seed, calibration,
                         profile, host_floor)
    total = 1 + len(grid_policies(scenario)) + len(sweep_batches(batch))
    with meter("simulating", total, eta=False, transient=True) as progress:
        result = plan(scenario, max_overhead, progress=progress.advance)
    if out:
        write_json(out, result)
    if report:
        _write_report([result], report)
    if fmt == "json":
        print(json.dumps(result, default=float))
        return
    _print_capacity(result, scenario)


def _rows_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("HBM / DDR / comp / evict", "KV full→HBM GB", "staging GB", "saved GB", "peak GB", "fits",
                "step ms", "stall ms", "overhead", "tok/s", "max batch"):
        table.add_column(col, justify="left" if col.startswith("HBM") else "right")
    for r in rows:
        table.add_row(
            f"{r['hbm']:.2f} / {r['ddr']:.2f} / {r['compressed']:.2f} / {r['evict']:.2f}",
            f"{r['kv_full_gb']:.1f}→{r['kv_hbm_gb']:.1f}", f"{r['staging_gb']:.2f}", f"{r['hbm_saved_gb']:.1f}",
            f"{r['peak_hbm_gb']:.1f}", _fits_cell(r), f"{r['step_ms']:.1f}",
            f"{r['stall_ms']:.1f}", f"{r['overhead_pct']:+.1f}%", f"{r['tokens_per_s']:,.0f}", str(r["max_batch"]),
        )
    return table


def _print_capacity(result: dict, scenario) -> None:
    title = (f"{result['model']} on {result['gpu']}, batch {result['batch']}, {_workload_words(scenario)} "
             f"({result['trace']} trace)")
    console.print(_rows_table(result["rows"], title))
    console.print(_sweep_table(result["batch_sweep"]))
    console.print(f"compute model: {result['baseline'].get('compute_model', 'roofline')}", highlight=False, markup=False)
    base = result["baseline"]
    fits = "fits" if base["fits"] else "[red]does NOT fit[/] (overheads are against it anyway)"
    console.print(f"All in HBM (the overhead baseline): {base['peak_hbm_gb']:.1f} GB peak of "
                  f"{base['hbm_capacity_gb']:.0f} GB, {fits}; {base['step_ms']:.1f} ms/step. "
                  f"Largest batch with the full cache: {result['max_batch_full_cache']}.", highlight=False)
    budget = result["max_overhead_pct"]
    for label, best in (("Best", result["best"]), ("Best lossless (no eviction)", result.get("best_lossless"))):
        if best:
            console.print(f"[bold]{label} within {budget:g}% overhead:[/] hbm {best['hbm']:.2f} / ddr {best['ddr']:.2f} "
                          f"/ evict {best['evict']:.2f} saves {best['hbm_saved_gb']:.1f} GB at "
                          f"{best['overhead_pct']:+.1f}% (largest batch {best['max_batch']}).", highlight=False)
        else:
            console.print(f"[yellow]{label}: no config saves HBM within {budget:g}% overhead[/] "
                          "(raise --max-overhead, or the link is the bottleneck at this batch).", highlight=False)


def _fits_cell(row: dict) -> str:
    if row["fits"]:
        return "[green]yes[/]"
    return "[red]no (host)[/]" if row.get("hbm_fits", False) else "[red]no[/]"


def _sweep_table(sweep: list[dict]) -> Table:
    """Overhead and savings of the lossless configs per batch size: where the link starts to bind."""
    hbms = sorted({r["hbm"] for r in sweep}, reverse=True)
    table = Table(title="Batch sweep (no eviction): overhead / HBM saved", title_justify="left")
    table.add_column("batch", justify="right")
    for h in hbms:
        table.add_column(f"hbm {h:.2f}", justify="right")
    for batch in sorted({r["batch"] for r in sweep}):
        cells = []
        for h in hbms:
            r = next(x for x in sweep if x["batch"] == batch and x["hbm"] == h)
            cell = f"{r['overhead_pct']:+.0f}% / {r['hbm_saved_gb']:.1f} GB"
            cells.append(cell if r["fits"] else f"[red]{cell} (no fit)[/]")
        table.add_row(str(batch), *cells)
    return table


def _workload_words(scenario) -> str:
    words = (f"lockstep from {scenario.context:,} context tokens" if scenario.context is not None
             else f"~{scenario.mean_length:,.0f} generated tokens per sequence")
    if scenario.prefetch != "all":
        words += f", {scenario.prefetch} prefetch ({scenario.prefetch_share():.0%} of DDR, not exact)"
    return words


def _write_report(inputs: list, path: Path) -> None:
    try:
        from tiersim.report import write_report
    except ImportError:
        raise TiersimError("--report needs tiersim.report, which this installation lacks") from None
    write_report(inputs, path)
    console.print(f"wrote {path}", highlight=False, markup=False)

"""`tiersim simulate` (one config) and `tiersim capacity` (the planning grid)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from tiersim.cli.app import RAY_ADDRESS_HELP, app, console, err_console
from tiersim.cli.progress import meter
from tiersim.errors import TiersimError

FORMATS = ("table", "json")


def _scenario(trace, model, model_config, gpu, batch, lengths, context, prefetch, steps, seed, calibration):
    from tiersim.simulator.calibration import apply_calibration, load_calibration
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
        hw = apply_calibration(hw, load_calibration(calibration))
    loaded = load_trace(trace)
    if loaded is None:
        if mean_length is None:
            raise TiersimError("--lengths trace: no trace to take lengths from (the bundled trace is missing)")
        err_console.print("[yellow]note:[/] the bundled trace is missing from this install; using the synthetic "
                          "profile documented in docs/simulator.md", highlight=False)
    label = str(trace) if trace else ("bundled" if loaded is not None else SYNTHETIC_LABEL)
    return scenario_from_trace(loaded, mdl, hw, batch, mean_length, steps=steps, seed=seed, label=label,
                               context=context, prefetch=prefetch)


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
    fmt: str = typer.Option("table", "--format", help="table or json"),
    out: Path = typer.Option(None, help="write the per-step timeline (Parquet, kind 'simulation')"),
    report: Path = typer.Option(None, help="also write an HTML report"),
) -> None:
    """Simulate one tier config: HBM use, PCIe traffic, stalls and throughput."""
    from tiersim.simulator.capacity import baseline_policy, run, with_overhead
    from tiersim.simulator.results import simulation_meta, write_timeline

    _check_format(fmt)
    scenario = _scenario(trace, model, model_config, gpu, batch, lengths, context, prefetch, steps, seed, calibration)
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
    fmt: str = typer.Option("table", "--format", help="table or json"),
    out: Path = typer.Option(None, help="also write the JSON result here"),
    report: Path = typer.Option(None, help="also write an HTML report"),
    ray: bool = typer.Option(False, "--ray", help="run each simulation as a task on Ray (needs pip install "
                                                  "'tiersim\\[cluster]'; see docs/cluster.md)"),
    ray_address: str = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
) -> None:
    """Plan HBM: a grid of tier configs at one batch size, the best config and the largest batches."""
    from tiersim.atomic import write_json
    from tiersim.simulator.capacity import capacity as plan, capacity_jobs

    _check_format(fmt)
    if max_overhead < 0:
        raise TiersimError(f"--max-overhead must be >= 0, got {max_overhead}")
    ray = ray or ray_address is not None
    if ray:
        from tiersim.cluster import import_ray

        import_ray()  # without Ray, say what to install before any work
    scenario = _scenario(trace, model, model_config, gpu, batch, lengths, context, prefetch, steps, seed, calibration)
    total = len(capacity_jobs(scenario))
    if ray:
        from tiersim.cluster import connect, map_tasks

        with connect(ray_address) as cluster, meter("simulating on Ray", total) as progress:
            result = plan(scenario, max_overhead, progress=progress.advance,
                          map_runs=lambda fn, jobs, tick: map_tasks(cluster, fn, jobs, on_done=tick))
    else:
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

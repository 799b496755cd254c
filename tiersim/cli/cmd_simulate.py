"""`tiersim simulate` (one config) and `tiersim capacity` (the planning grid)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tiersim.cli.app import app, console, err_console
from tiersim.errors import TiersimError

FORMATS = ("table", "json")


def _scenario(trace, model, model_config, gpu, batch, lengths, steps, seed, calibration):
    from tiersim.simulator.calibration import apply_calibration, load_calibration
    from tiersim.simulator.capacity import load_trace, scenario_from_trace
    from tiersim.simulator.presets import get_gpu, get_model, model_from_config
    from tiersim.traces.synth import parse_lengths

    if batch < 1:
        raise TiersimError(f"--batch must be >= 1, got {batch}")
    mdl = model_from_config(model_config) if model_config else get_model(model)
    hw = get_gpu(gpu)
    if calibration:
        hw = apply_calibration(hw, load_calibration(calibration))
    mean_length = None if lengths == "trace" else parse_lengths(lengths)
    label = str(trace) if trace else "bundled"
    return scenario_from_trace(load_trace(trace), mdl, hw, batch, mean_length, steps=steps, seed=seed, label=label)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise TiersimError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def _progress(total: int, label: str) -> Progress:
    progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err_console, transient=True)
    progress.add_task(label, total=total)
    return progress


TRACE_HELP = "trace to project from (default: the bundled SmolLM2 capture)"
LENGTHS_HELP = "mean generated tokens: a number, gsm8k/math500/amc23/gpqa/aime, or 'trace'"


@app.command()
def simulate(
    trace: Path = typer.Option(None, help=TRACE_HELP),
    model: str = typer.Option("r1-distill-qwen-7b", help="model preset (see `tiersim presets`)"),
    model_config: Path = typer.Option(None, "--model-config", help="a transformers config.json instead of a preset"),
    gpu: str = typer.Option("h100-sxm", help="GPU preset"),
    batch: int = typer.Option(64, help="sequences decoded together"),
    hbm: float = typer.Option(0.5), ddr: float = typer.Option(0.5),
    compressed: float = typer.Option(0.0), evict: float = typer.Option(0.0),
    lengths: str = typer.Option("math500", help=LENGTHS_HELP),
    steps: int = typer.Option(256, help="decode steps simulated (steady state, staggered batch)"),
    seed: int = typer.Option(0),
    calibration: Path = typer.Option(None, help="calibration JSON from `tiersim validate`"),
    fmt: str = typer.Option("table", "--format", help="table or json"),
    out: Path = typer.Option(None, help="write the per-step timeline (Parquet, kind 'simulation')"),
    report: Path = typer.Option(None, help="also write an HTML report"),
) -> None:
    """Simulate one tier config: HBM use, PCIe traffic, stalls and throughput."""
    from tiersim.simulator.capacity import run, with_overhead

    _check_format(fmt)
    scenario = _scenario(trace, model, model_config, gpu, batch, lengths, steps, seed, calibration)
    policy = scenario.policy(hbm, ddr, compressed, evict)
    baseline, _ = run(scenario, scenario.policy(1.0, 0.0, 0.0, 0.0))
    row, timeline = run(scenario, policy)
    row = with_overhead(row, baseline)
    from tiersim import __version__

    meta = {"kind": "simulation", "schema_version": 1, "tiersim_version": __version__,
            "model": scenario.model.to_dict(),
            "gpu": scenario.gpu.to_dict(), "trace": scenario.trace_label, "batch": batch,
            "config": {"hbm": hbm, "ddr": ddr, "compressed": compressed, "evict": evict},
            "mean_length": scenario.mean_length, "summary": row}
    if out:
        _write_timeline(out, timeline, meta)
    if report:
        if out:
            _write_report([out], report)
        else:  # the report reads the same file `--out` would write
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                timeline_path = Path(tmp) / "simulation.parquet"
                _write_timeline(timeline_path, timeline, meta)
                _write_report([timeline_path], report)
    if fmt == "json":
        print(json.dumps({"rows": [row]}, indent=2, default=float))
        return
    table = _rows_table([row], f"{scenario.model.name} on {scenario.gpu.name}, batch {batch}, "
                               f"~{scenario.mean_length:.0f} generated tokens ({scenario.trace_label} trace)")
    console.print(table)
    if not baseline["fits"]:
        console.print(f"[yellow]note:[/] the all-in-HBM baseline needs {baseline['peak_hbm_gb']:.1f} GB "
                      f"and does not fit in {scenario.gpu.hbm_bytes / 1e9:.0f} GB; overhead is against it anyway.")
    if out:
        console.print(f"wrote {out}")


@app.command()
def capacity(
    batch: int = typer.Option(64, help="sequences decoded together"),
    model: str = typer.Option("r1-distill-qwen-7b", help="model preset (see `tiersim presets`)"),
    model_config: Path = typer.Option(None, "--model-config", help="a transformers config.json instead of a preset"),
    gpu: str = typer.Option("h100-sxm", help="GPU preset"),
    trace: Path = typer.Option(None, help=TRACE_HELP),
    lengths: str = typer.Option("math500", help=LENGTHS_HELP),
    max_overhead: float = typer.Option(10.0, "--max-overhead", help="overhead budget, percent of step time"),
    steps: int = typer.Option(256, help="decode steps simulated per config"),
    seed: int = typer.Option(0),
    calibration: Path = typer.Option(None, help="calibration JSON from `tiersim validate`"),
    fmt: str = typer.Option("table", "--format", help="table or json"),
    out: Path = typer.Option(None, help="also write the JSON result here"),
    report: Path = typer.Option(None, help="also write an HTML report"),
) -> None:
    """Plan HBM: a grid of tier configs at one batch size, the best config and the largest batches."""
    from tiersim.atomic import write_json
    from tiersim.simulator.capacity import GRID_HBM, SWEEP_BATCHES, capacity as plan, grid_policies

    _check_format(fmt)
    if max_overhead < 0:
        raise TiersimError(f"--max-overhead must be >= 0, got {max_overhead}")
    scenario = _scenario(trace, model, model_config, gpu, batch, lengths, steps, seed, calibration)
    total = 1 + len(grid_policies(scenario)) + len(set(SWEEP_BATCHES) | {batch})
    with _progress(total, "simulating") as progress:
        task = progress.tasks[0].id
        result = plan(scenario, max_overhead, progress=lambda: progress.advance(task))
    if out:
        write_json(out, result)
    if report:
        _write_report([result], report)
    if fmt == "json":
        print(json.dumps(result, default=float))
        return
    _print_capacity(result, scenario, len(GRID_HBM))


def _rows_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("HBM / DDR / comp / evict", "KV full→HBM GB", "staging GB", "saved GB", "peak GB", "fits",
                "step ms", "stall ms", "overhead", "tok/s", "max batch"):
        table.add_column(col, justify="left" if col.startswith("HBM") else "right")
    for r in rows:
        table.add_row(
            f"{r['hbm']:.2f} / {r['ddr']:.2f} / {r['compressed']:.2f} / {r['evict']:.2f}",
            f"{r['kv_full_gb']:.1f}→{r['kv_hbm_gb']:.1f}", f"{r['staging_gb']:.2f}", f"{r['hbm_saved_gb']:.1f}",
            f"{r['peak_hbm_gb']:.1f}", "[green]yes[/]" if r["fits"] else "[red]no[/]", f"{r['step_ms']:.1f}",
            f"{r['stall_ms']:.1f}", f"{r['overhead_pct']:+.1f}%", f"{r['tokens_per_s']:,.0f}", str(r["max_batch"]),
        )
    return table


def _print_capacity(result: dict, scenario, _n_hbm: int) -> None:
    title = (f"{result['model']} on {result['gpu']}, batch {result['batch']}, ~{result['mean_length']:.0f} "
             f"generated tokens per sequence ({result['trace']} trace)")
    console.print(_rows_table(result["rows"], title))
    base = result["baseline"]
    fits = "fits" if base["fits"] else "[red]does NOT fit[/]"
    console.print(f"All in HBM (the overhead baseline): {base['peak_hbm_gb']:.1f} GB peak, {fits}; "
                  f"{base['step_ms']:.1f} ms/step. Largest batch with the full cache: {result['max_batch_full_cache']}.")
    best = result["best"]
    if best:
        console.print(f"[bold]Best within {result['max_overhead_pct']:g}% overhead:[/] hbm {best['hbm']:.2f} / ddr "
                      f"{best['ddr']:.2f} / evict {best['evict']:.2f} saves {best['hbm_saved_gb']:.1f} GB at "
                      f"{best['overhead_pct']:+.1f}% (largest batch {best['max_batch']}).")
    else:
        console.print(f"[yellow]No config saves HBM within {result['max_overhead_pct']:g}% overhead[/] "
                      "(raise --max-overhead, or the link is the bottleneck at this batch).")


def _write_timeline(path: Path, timeline: dict, meta: dict) -> None:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tiersim.atomic import atomic_path

    table = pa.Table.from_pandas(pd.DataFrame(timeline), preserve_index=False)
    table = table.replace_schema_metadata({b"tiersim": json.dumps(meta, default=float).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _write_report(inputs: list, path: Path) -> None:
    try:
        from tiersim.report import write_report
    except ImportError:
        raise TiersimError("--report needs tiersim.report, which this installation lacks") from None
    write_report(inputs, path)
    console.print(f"wrote {path}")

"""`tiersim validate`: run the GPU validator (or its CPU smoke mode) and compare measured vs simulated."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer
from rich.table import Table

from tiersim.cli.app import add_columns, app, compact_table, console, err_console, parse_float_list, parse_int_list

SHAPE_HELP = ("model shape built with random bf16 weights (see tiersim.validator.shapes); default: "
              "r1-distill-qwen-7b on CUDA, tiny with --device cpu")


def _table(doc: dict) -> Table:
    from tiersim.validator import compare

    table = compact_table("measured vs simulated (calibrated closed form)")
    add_columns(table, compare.COLUMNS)
    for row in compare.rows(doc):
        table.add_row(*row)
    return table


def _show(doc: dict) -> None:
    from tiersim.validator import compare

    console.print(_table(doc))
    for line in compare.summary_lines(doc):
        console.print(line, highlight=False)


@app.command()
def validate(
    model_shape: str = typer.Option(None, "--model-shape", help=SHAPE_HELP, show_default=False),
    batch: str = typer.Option("1,8,32", help="batch sizes, comma-separated"),
    context: str = typer.Option("2048,8192", help="context lengths (tokens in the cache before decoding)"),
    hbm: str = typer.Option("1.0,0.5,0.25", help="HBM ratios; the rest of the context goes to DDR"),
    device: str = typer.Option("cuda", help="cuda (default), cuda:N, or cpu for the smoke mode"),
    steps: int = typer.Option(24, help="timed decode steps per point"),
    warmup: int = typer.Option(4, help="untimed decode steps before timing"),
    prefill: str = typer.Option("synthetic", help="synthetic (random K/V, no forward) or model (a real prefill)"),
    budget_s: float = typer.Option(None, "--budget-s", help="seconds for the decode grid; later points are skipped"),
    sdpa: str = typer.Option("no-cudnn", help="attention kernels: no-cudnn (cuDNN builds a plan per new KV length) or default"),
    profile: Path = typer.Option(None, help="operator profile (python -m tiersim.validator.operators) for the predictions"),
    out: Path = typer.Option(None, help="calibration JSON to write, e.g. docs/validation/h100.json"),
    compare: Path = typer.Option(None, "--compare", help="print measured vs simulated from this calibration JSON"),
) -> None:
    """Time decode steps with the TieredCache against all-in-HBM, sweep the host link, write a calibration."""
    from tiersim.validator import calibrate
    from tiersim.validator import compare as compare_mod

    if compare is not None:
        _show(compare_mod.load(compare))
        return
    batches, contexts = parse_int_list(batch, "batch"), parse_int_list(context, "context")
    hbms = parse_float_list(hbm, "hbm")
    try:
        doc = calibrate.run_validation(
            model_shape, batches, contexts, hbms, device=device, steps=steps, warmup=warmup, prefill=prefill,
            out=out, budget_s=budget_s, sdpa=sdpa, profile=profile, command=shlex.join(["tiersim", *sys.argv[1:]]) if sys.argv[1:2] == ["validate"] else None,
            log=lambda msg: err_console.print(msg, highlight=False, markup=False),
        )
    except calibrate.NoDeviceError as exc:
        err_console.print(str(exc), highlight=False, markup=False, soft_wrap=True)
        # SystemExit, not typer.Exit: with standalone_mode=False click returns an Exit's code
        # instead of exiting, and `tiersim.cli.app.run` would end with status 0.
        raise SystemExit(1) from None
    _show(doc)

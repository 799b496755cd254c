"""`tiersim report`: simulation, capacity, quality-grid and calibration files -> one offline HTML page."""

from __future__ import annotations

from pathlib import Path

import typer

from tiersim.cli import options
from tiersim.cli.app import app, console

INPUT_HELP = ("simulation results (.parquet), capacity grids (.json), quality grids (.json/.parquet) or "
              "calibration files (.json); the kind is read from each file")


@app.command()
@options.command(outputs={"out": (".html", ".htm")}, example=["docs/validation/h100-80gb-hbm3.json"])
def report(
    inputs: list[Path] = typer.Argument(..., help=INPUT_HELP, show_default=False, metavar="INPUT"),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write"),
    title: str = typer.Option(None, help="page title (default: model and GPU from the inputs)"),
) -> None:
    """Draw interactive Plotly figures for the inputs into one self-contained HTML file."""
    from tiersim.report import write_report

    with console.status("drawing report ..."):
        path = write_report(inputs, out, title=title)
    size_mb = path.stat().st_size / 1e6
    console.print(f"wrote {path} ({size_mb:.1f} MB, opens offline)", highlight=False, markup=False)

"""Every table the CLI prints fits a 100-column terminal without losing a digit to an ellipsis."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tiersim.cli.app import console
from tiersim.cli.main import app

WIDTH = 100
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def narrow_console(monkeypatch):
    monkeypatch.setattr(console, "width", WIDTH)
    return console


def _check_fits(output: str) -> None:
    assert output.strip()
    for line in output.splitlines():
        assert len(line.rstrip()) <= WIDTH, f"{len(line.rstrip())} columns: {line!r}"
    assert "…" not in output, "a value was cut"


@pytest.mark.parametrize("args", [
    ["capacity", "--batch", "64"],
    ["capacity", "--batch", "64", "--model", "qwq-32b", "--lengths", "aime", "--steps", "32"],
    ["simulate", "--batch", "8", "--steps", "32"],
    ["presets"],
    ["validate", "--compare", str(REPO / "docs" / "validation" / "h100-80gb-hbm3.json")],
])
def test_tables_fit_100_columns(narrow_console, args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    output = result.stdout
    if args[0] == "capacity":  # the recommendation is one whole sentence on the first line (`| head -1`)
        first, output = output.split("\n", 1)
        assert first.endswith(".") and first[0].isupper()
    _check_fits(output)


def test_grid_table_fits_100_columns(narrow_console):
    from tiersim.cli.cmd_grid import grid_table

    document = json.loads((REPO / "docs" / "quality-grid-smollm2.json").read_text())
    with narrow_console.capture() as captured:
        narrow_console.print(grid_table(document))
    _check_fits(captured.get())


def test_capacity_json_keeps_every_field_the_table_drops():
    result = CliRunner().invoke(app, ["capacity", "--batch", "8", "--steps", "16", "--format", "json"])
    row = json.loads(result.stdout)["rows"][0]
    assert {"staging_gb", "kv_full_gb", "kv_hbm_gb", "stall_ms"} <= set(row)

"""Every command at 80 and 100 columns: no line wider, and no token cut (issue 26).

A token cut by a narrow table (``host-atte ntion``, ``+1072. 2%``) shows up as a word that the same
output drawn 1,000 columns wide does not have. Tables leave whole columns out instead (the caption
names them); ``--wide`` keeps them all. The commands come from the app: one without a sample run
here runs its declared example (``cli.options.command(example=...)``), one that loads a model is
checked on its ``--help``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cli_run import example, invoke

from tiersim.cli import app as app_module
from tiersim.cli.main import app

REPO = Path(__file__).resolve().parent.parent
CALLBACKS = {(info.name or info.callback.__name__).replace("_", "-"): info.callback for info in app.registered_commands}
COMMANDS = sorted(CALLBACKS)
SAMPLES = {
    "simulate": [["simulate", "--batch", "8", "--steps", "16"]],
    "capacity": [["capacity", "--batch", "64", "--steps", "32"],
                 ["capacity", "--batch", "16..256", "--model", "qwq-32b", "--lengths", "aime", "--steps", "32"]],
    "presets": [["presets"]],
    "serve": [["serve", "--requests", "40", "--qps", "2", "--model", "r1-distill-qwen-1.5b", "--lengths", "300"],
              ["capacity", "--qps", "4..32", "--requests", "40", "--model", "r1-distill-qwen-1.5b", "--lengths", "300",
               "--on-full", "spill,queue"]],
    "validate": [["validate", "--compare", str(REPO / "docs" / "validation" / "h100-80gb-hbm3.json")]],
}
#: What differs between widths by design: the note naming the columns left out, and the measured speed.
VARIES = re.compile(r"(;\s)?left out at \d+ columns: .*? \(--wide shows them\)|real-time factor: .*? wall s\)", re.S)


def _render(args: list[str], width: int, monkeypatch) -> str:
    monkeypatch.setattr(app_module.console, "width", width)
    monkeypatch.setenv("COLUMNS", str(width))  # typer's --help reads it
    code, out, err = invoke(args)
    assert code == 0, err
    return out


BOX = re.compile("[\u2500-\u257f]")  # rules and panel borders: their length follows the width


def _tokens(text: str) -> set[str]:
    return set(VARIES.sub(" ", " ".join(BOX.sub(" ", text).split())).split())


def _cases():
    for command in COMMANDS:
        quick = example(CALLBACKS[command])
        if getattr(CALLBACKS[command], "tiersim_loads_model", False):
            quick = None
        for args in SAMPLES.get(command, [[command, *quick]] if quick is not None else [[command, "--help"]]):
            yield args


@pytest.mark.parametrize("width", [80, 100])
@pytest.mark.parametrize("args", list(_cases()), ids=lambda a: " ".join(Path(x).name for x in a[:3]))
def test_output_fits_without_cutting_a_token(monkeypatch, tmp_path, args, width):
    monkeypatch.chdir(tmp_path)  # an example's default output file lands here, not in the checkout
    wide = _render(args, 1000, monkeypatch)
    narrow = _render(args, width, monkeypatch)
    cut = sorted(_tokens(narrow) - _tokens(wide))
    assert not cut, f"tokens cut at {width} columns: {cut[:8]}"
    first = True
    for line in narrow.splitlines():
        if first and args[0] in ("capacity", "serve"):  # the recommendation is one sentence on one line (`| head -1`)
            first = False
            continue
        assert len(line.rstrip()) <= width or len(line.split()) == 1, f"{len(line.rstrip())} columns: {line!r}"
    assert "…" not in narrow


def test_wide_keeps_every_column(monkeypatch):
    narrow = _render(["simulate", "--batch", "8", "--steps", "16"], 80, monkeypatch)
    wide = _render(["simulate", "--batch", "8", "--steps", "16", "--wide"], 80, monkeypatch)
    header = [line for line in narrow.splitlines() if "hbm/ddr" in line][0]
    assert "left out at 80 columns" in narrow and "max B" not in header
    header = [line for line in wide.splitlines() if "hbm/ddr" in line][0]
    assert "left out" not in wide and "max B" in header


def test_grid_table_at_80_columns(monkeypatch):
    from tiersim.cli.cmd_grid import grid_table

    document = json.loads((REPO / "docs" / "quality-grid-smollm2.json").read_text())
    console = app_module.console
    outputs = {}
    for width in (1000, 80):
        monkeypatch.setattr(console, "width", width)
        with console.capture() as captured:
            console.print(grid_table(document))
        outputs[width] = captured.get()
    assert not _tokens(outputs[80]) - _tokens(outputs[1000])
    assert all(len(line.rstrip()) <= 80 for line in outputs[80].splitlines())

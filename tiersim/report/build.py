"""Which figures and key numbers each input kind gets, and ``write_report`` (the one entry point).

``simulate``, ``capacity`` and ``grid`` call :func:`write_report` for their ``--report`` flag with
their in-memory documents; ``tiersim report`` calls it with file paths. Both go through the same
loaders, so a report from a file and one from ``--report`` are the same page.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tiersim import fileformat
from tiersim.errors import TiersimError
from tiersim.report.calibration import calibration_section as _calibration
from tiersim.report.capacity import capacity_section as _capacity
from tiersim.report.html import Section, figure_id, render_page
from tiersim.report.loaders import ReportInput, load_input
from tiersim.report.quality import quality_section as _quality
from tiersim.report.serving import serving_capacity_section as _serving_capacity
from tiersim.report.serving import serving_section as _serving
from tiersim.report.simulation import simulation_section as _simulation

HTML_SUFFIXES = (".html", ".htm")
KIND_TITLES = {"simulation": "Simulation", "capacity": "Capacity plan", "quality-grid": "Output quality",
               "calibration": "Validation", "serving": "Serving run", "serving-capacity": "Serving capacity"}


def write_report(inputs: Sequence[str | os.PathLike | Mapping], out_path: str | os.PathLike,
                 title: str | None = None) -> Path:
    """Read every input (path or producer dict), draw its figures, write one offline HTML page.

    Returns the path written. Raises :class:`TiersimError` (one line) on a bad input or path.
    """
    from tiersim.atomic import write_text

    out = Path(out_path)
    if out.suffix.lower() not in HTML_SUFFIXES:
        raise TiersimError(f"--out: the report is HTML, the file name must end in .html, got {str(out)!r}")
    if out.is_dir():
        raise TiersimError(f"--out: {out} is a directory")
    write_text(out, build_report(inputs, title))
    return out


def build_report(inputs: Sequence[str | os.PathLike | Mapping], title: str | None = None) -> str:
    """The HTML page as a string (no file written)."""
    if isinstance(inputs, (str, os.PathLike, Mapping)):
        inputs = [inputs]
    if not inputs:
        raise TiersimError("report: no inputs given (simulation, capacity, quality-grid, calibration, serving or "
                            "serving-capacity files)")
    loaded = [load_input(item) for item in inputs]
    sections = [build_section(inp, f"s{i + 1}-{inp.kind}") for i, inp in enumerate(loaded)]
    provenance = [{"kind": inp.kind, "source": inp.source, **inp.provenance()} for inp in loaded]
    facts = {label: _unique(p[key] for p in provenance) for label, key in
             (("model", "model"), ("GPU", "gpu"), ("trace", "trace"), ("tiersim", "tiersim_version"))}
    from tiersim import __version__

    if title is None:
        single = len(facts["model"]) == 1 and len(facts["GPU"]) == 1 and "not recorded" not in facts["model"]
        title = f"tiersim report: {facts['model'][0]} on {facts['GPU'][0]}" if single else "tiersim report"
    meta = {
        **fileformat.header(fileformat.REPORT),
        "generator": f"tiersim {__version__}",
        "inputs": provenance,
        "figures": [figure_id(s.key, name) for s in sections for name, _ in s.figures],
    }
    return render_page(title, facts, provenance, sections, meta)


def _unique(values) -> list[str]:
    seen = list(dict.fromkeys(values))
    known = [v for v in seen if v != "not recorded"]
    return known or seen


def build_section(inp: ReportInput, key: str) -> Section:
    """Figures and key numbers for one input.

    The loader checks the tables' columns; a metadata field of the wrong type that a figure or a key
    number reads (a capacity file's ``mean_length`` that is a list) ends here, as one line naming the
    input, not a traceback (tests draw every valid input kind, so a bug of a figure still fails them).
    """
    try:
        return BUILDERS[inp.kind](inp, key)
    except TiersimError:
        raise
    except (TypeError, KeyError, AttributeError, ValueError, IndexError) as exc:
        words = (str(exc).strip().splitlines() or [""])[0]
        raise TiersimError(f"report input {inp.source}: this {inp.kind} file holds a field of the wrong type or "
                           f"shape ({type(exc).__name__}: {words})") from None


BUILDERS: dict[str, Callable[[ReportInput, str], Section]] = {
    "simulation": _simulation, "capacity": _capacity, "quality-grid": _quality, "calibration": _calibration,
    "serving": _serving, "serving-capacity": _serving_capacity,
}

# Which figures each kind yields when its optional tables are present (tests and docs use it).
FIGURES_BY_KIND = {
    "simulation": ("hbm_occupancy", "pcie_traffic"),
    "capacity": ("throughput_frontier", "capacity_frontier", "savings_vs_batch"),
    "quality-grid": ("quality_heatmap",),
    "calibration": ("measured_vs_simulated", "link_sweep"),
    "serving": ("serving_timeline",),
    "serving-capacity": ("latency_vs_load",),
}

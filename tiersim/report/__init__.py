"""Interactive Plotly reports: figures from tidy frames, assembled into one offline HTML page.

``write_report(inputs, out_path, title=None)`` is the entry point for ``tiersim report`` and the
``--report`` flags; ``tiersim.report.figures`` holds one function per figure for notebook use.
Importing this package pulls in plotly and pandas, so callers import it lazily.
"""

from tiersim.report.build import FIGURES_BY_KIND, build_report, write_report
from tiersim.report.loaders import KINDS, ReportInput, load_input

__all__ = ["FIGURES_BY_KIND", "KINDS", "ReportInput", "build_report", "load_input", "write_report"]

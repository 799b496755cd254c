"""The GPU validator: run the tiered cache with real pinned-memory transfers and calibrate the simulator.

Imports only torch, numpy, transformers and the standard library (plus the numpy-only parts of
``tiersim.simulator``), because the GPU machine has no simpy, plotly or rich. Entry points:
``python -m tiersim.validator`` (no typer needed) and ``tiersim validate`` (the typer wrapper).
Submodules are imported on use so that ``import tiersim.validator`` stays cheap.
"""

__all__ = ["calibrate", "compare", "compute", "decode", "fit", "graph", "graph_compressed", "graph_host", "graph_run",
           "graph_segments", "graph_tiers", "grid", "link", "operators", "operators_decode", "operators_tables",
           "operators_timing", "options", "predict", "quote", "sdpa", "shapes", "timing"]

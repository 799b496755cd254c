"""Rewrite tiersim/data/default-trace.projection.json after the bundled trace or its fit changes.

tests/test_simulator_fastpath.py fails until this has run: the sidecar must equal a fresh fit of the trace.
Run: python scripts/refresh_bundled_projection.py
"""

from tiersim.simulator.capacity import write_bundled_projection

if __name__ == "__main__":
    print(f"wrote {write_bundled_projection()}")

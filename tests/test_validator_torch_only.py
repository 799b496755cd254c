"""The GPU machine has torch and numpy (and pandas, not guaranteed), no simpy, plotly, typer or rich: the
validator, the graph executor and the plain ``--against`` entry must run with those imports blocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BLOCKED = ("simpy", "plotly", "pandas", "pyarrow", "typer", "rich", "click")
CALIBRATION = REPO / "docs" / "validation" / "h100-80gb-hbm3.json"

# ``None`` in sys.modules is "not installed" both for ``import`` (ImportError) and for the availability probes
# transformers makes (``importlib.util.find_spec`` returns None).
_BLOCKER = f"""
import sys
for _name in {BLOCKED!r}:
    sys.modules[_name] = None
"""


def _run(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _BLOCKER + code], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def test_every_validator_module_imports_and_the_graph_grid_runs_without_the_blocked_packages(tmp_path):
    out = tmp_path / "g.json"
    proc = _run(f"""
import importlib, pkgutil, tiersim.validator as v
found = {{m.name for m in pkgutil.iter_modules(v.__path__)}} - {{'__main__'}}
assert found == set(v.__all__), ('__all__ misses', sorted(found - set(v.__all__)))  # a new module is imported too
for name in v.__all__:
    importlib.import_module('tiersim.validator.' + name)
from tiersim.validator.graph_run import run_graph
doc = run_graph('tiny', [1], [80], [1.0, 0.5], device='cpu', steps=2, warmup=1, out={str(out)!r},
                sweep_sizes=[4096, 65536])
print('POINTS', len(doc['points']))
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "POINTS 2" in proc.stdout
    assert json.loads(out.read_text())["executor"] == "graph-eager"


def test_the_blocker_really_blocks():
    proc = _run("import simpy")
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr or "ImportError" in proc.stderr


def test_plain_against_runs_without_simpy_and_prints_the_median_last(tmp_path):
    proc = _run(f"""
import sys
from tiersim.simulator.against import main
sys.exit(main([{str(CALIBRATION)!r}]))
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("median |error| ") and "engine fast" in lines[0]
    assert any(line.startswith("note: --against: measured by the hf-eager executor") for line in lines)

"""scripts/gpu_validate.sh in its DRY_RUN=1 mode: every step of the GPU run, in order, on the CPU at tiny sizes,
with simpy, plotly, pandas, typer and rich made unimportable (the GPU machine's torch + numpy world)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BLOCKED = ("simpy", "plotly", "pandas", "pyarrow", "typer", "rich", "click")


def test_dry_run_runs_every_step_in_order_and_prints_the_median_error_last(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    # None in sys.modules: ``import`` fails and availability probes (importlib.util.find_spec) say "absent".
    (site / "sitecustomize.py").write_text(f"import sys\nfor _n in {BLOCKED!r}:\n    sys.modules[_n] = None\n")
    dest = tmp_path / "out"
    env = {**os.environ, "DRY_RUN": "1", "DEST": str(dest), "PYTHONPATH": str(site), "OUT": ""}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_validate.sh")], capture_output=True, text=True,
                          env=env, timeout=600, cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-4000:]
    steps = [line.split(" ", 2)[2] for line in out.splitlines() if line.startswith("== ") and line[3:4].isdigit()
             and ":" in line[3:12]]
    names = [re.sub(r" \(.*", "", s.split(":")[0]) for s in steps]  # "cuda tests (timeout 55 s)": its name
    assert names == ["cuda tests", "graph grid", "operator profile", "simulate --against", "pre-registered predictions",
                     "figures to quote"], steps
    assert "no pre-registered predictions for preset" in (dest / "cpu-dry-run-preregistered.txt").read_text()
    assert "FAILED" not in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("median |error| ") and last.endswith("points)")
    graph = json.loads((dest / "cpu-dry-run-graph.json").read_text())
    assert graph["kind"] == "calibration" and graph["executor"] == "graph-eager"
    assert {p["hbm"] for p in graph["points"]} == {1.0, 0.5} and all(p["measured_step_ms"] for p in graph["points"])
    # the grid's block, then the strategy check (host attention, hybrid) at its first HBM < 1, then the compressed check
    assert [(p["hbm"], p["compressed"], p["strategy"]) for p in graph["points"]] == [
        (1.0, 0.0, "prefetch"), (0.5, 0.0, "prefetch"), (0.5, 0.0, "host-attention"), (0.5, 0.0, "hybrid"),
        (0.5, 0.25, "prefetch")]
    host = [p for p in graph["points"] if p["strategy"] != "prefetch"]
    assert all(p["host_ms"] > 0 and p["baseline_step_ms"] == graph["points"][0]["measured_step_ms"] for p in host)
    assert [p["fetch_share"] for p in graph["points"]] == [1.0, 1.0, 0.0, 0.5, 1.0]  # the share each one fetched
    assert graph["settings"]["strategy_check"] == ["host-attention", "hybrid"]
    assert json.loads((dest / "cpu-dry-run-operators.json").read_text())["kind"] == "operator-profile"
    against = (dest / "cpu-dry-run-against.txt").read_text()
    assert "executor graph-eager" in against and "predicts a host-bound engine" in against
    assert against.strip().splitlines()[-1].endswith("5 points)")  # the host strategies' points simulated too
    rows = [" ".join(line.split()[3:-3]) for line in against.splitlines() if line.strip().startswith("tiered")]
    assert rows == ["1.00", "0.50", "0.50 host-attention", "0.50 hybrid fetch 0.5", "0.50 +c0.25"]  # each named
    assert "skipped" in (dest / "cpu-dry-run-tests.txt").read_text()


def test_the_gpu_runs_cuda_test_files_are_collected_without_the_cli_libraries(tmp_path):
    """Step 1 on the GPU machine (torch, numpy, transformers, pytest only) collects every file of the CUDA branch's
    ``cuda_tests``; one file importing typer at its top (tests/test_validator.py did) is a collection error, and
    pytest then runs no CUDA test at all. The dry run collects one file only, so this is checked here."""
    import re
    import sys

    script = (REPO / "scripts" / "gpu_validate.sh").read_text()
    files = re.findall(r"CUDA_TESTS:-([^}]*)\}", script)[-1].split()  # the CUDA branch's (second)
    assert "tests/test_graph_host.py" in files and len(files) >= 4
    assert files[:2] == ["tests/test_graph_executor.py", "tests/test_graph_host.py"]  # a timeout cuts the cache's
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nfor _n in {BLOCKED!r}:\n    sys.modules[_n] = None\n")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-p", "no:hypothesispytest", "-p", "no:anyio", *files, "-k", "test_cuda"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    collected = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    assert collected == set(files)


def test_the_gpu_runs_step_timeouts_sum_within_its_six_minutes():
    """The device time the script may take is the sum of its steps' timeouts (each step is killed at its own, with
    SIGKILL ``KILL_S`` later if SIGTERM does not end it): issue 23's 6 minutes with a margin for the copy back,
    even if every step had to be killed. Read from the script itself, with the CUDA branch's defaults; every step
    runs under one of the named timeouts, so a budget raised in one place without taking it from another, or a
    step added without one, fails here, and so does a header whose accounting is not the script's."""
    import re

    script = (REPO / "scripts" / "gpu_validate.sh").read_text()
    branch = script.index("\nelse\n")
    cuda = script[branch:script.index("\nfi\n", branch)]
    top = script[:script.index('\nif [ "${DRY_RUN')]
    value = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", top)}
    value.update({k: int(v) for k, v in re.findall(r"(\w+)=\$\{\1:-(\d+)\}", top + cuda)})
    grid, ops = value["GRID_BUDGET_S"] + value["GRID_EXTRA_S"], value["OPS_BUDGET_S"] + value["OPS_EXTRA_S"]
    steps = re.findall(r'run_step "[^"]*"\s*\\?\s*"\$(\w+)"', script)
    assert steps == ["TESTS_S", "GRID_S", "OPS_S", "AGAINST_S", "PREREG_S"], steps  # ..., against, predictions
    assert '"$QUOTE_S" "$PY" -m tiersim.validator.quote' in script
    planned = (value["PRE_S"] + value["SMI_S"] + value["TESTS_S"] + grid + ops + value["AGAINST_S"] + value["PREREG_S"]
               + value["QUOTE_S"])
    # SIGKILL after SIGTERM for the GPU check, the five steps and the quote; a GPU check that timed out names the
    # GPU with one more nvidia-smi
    killed = planned + 7 * value["KILL_S"] + value["SMI_S"]
    assert planned <= 310 and killed <= 345, (planned, killed)
    header = re.search(r"at most (\d+) s of steps and nvidia-smi \((\d+) s if every step had to be killed\)", script)
    assert header and (int(header.group(1)), int(header.group(2))) == (planned, killed), (planned, killed)


def test_a_failed_step_does_not_stop_the_next_and_against_needs_only_the_grid(tmp_path):
    """The one GPU shot fails soft: with the CUDA tests' step failing (a file that does not exist) and the operator
    profile refused (--budget-s 0), the grid still runs, ``simulate --against`` still runs on the grid's file alone,
    the figures are still printed with the median |error| last, each failure is named, and the exit is non-zero.
    An empty STRATEGY_CHECK means no check (as documented), not the default one."""
    dest = tmp_path / "out"
    env = {**os.environ, "DRY_RUN": "1", "DEST": str(dest), "OUT": "", "CUDA_TESTS": "tests/no_such_test_file.py",
           "OPS_BUDGET_S": "0", "COMPRESSED": "0", "STRATEGY_CHECK": ""}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_validate.sh")], capture_output=True, text=True,
                          env=env, timeout=600, cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 1, (out + proc.stderr)[-4000:]
    failed = [line for line in out.splitlines() if line.startswith("== FAILED: ")]
    assert [f.split(": ")[1].split(" (")[0] for f in failed] == ["cuda tests", "operator profile"], failed
    assert "== simulate --against: exit 0" in out and "figures to quote" in out
    graph = json.loads((dest / "cpu-dry-run-graph.json").read_text())
    assert [p["strategy"] for p in graph["points"]] == ["prefetch", "prefetch"]  # no strategy check, no compressed
    assert not (dest / "cpu-dry-run-operators.json").exists()
    last = out.strip().splitlines()[-1]
    assert last.startswith("median |error| ") and last.endswith("2 points)"), last
    quote = (dest / "cpu-dry-run-quote.txt").read_text().splitlines()
    assert quote[-1] == last and any(line.startswith("overhead at batch 1 x 80 at HBM 0.5: ") for line in quote)


_HIDE_PYTEST = '''
import importlib.abc, importlib.machinery, sys
HIDDEN = ("pytest", "_pytest", "pluggy", "iniconfig")


class Hide(importlib.abc.MetaPathFinder):
    """A device without pytest: pytest and its own dependencies import only from a folder named deps."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in HIDDEN:
            return None
        if path is None:
            path = [p for p in sys.path if p.rstrip("/").endswith("deps")]
            if not path:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return spec


sys.meta_path.insert(0, Hide())
'''


def test_a_device_without_pytest_runs_the_tests_step_from_a_carried_folder(tmp_path):
    """Step 1 needs pytest; a device image without it (pip cannot reach a registry there) runs it from a folder
    carried with the tree (GPU_DEPS, by default build/gpu_deps), which the script puts on the path only then
    (without it the step fails and the rest runs: test_a_failed_step_does_not_stop_the_next...)."""
    import importlib.util
    import shutil

    deps = tmp_path / "deps"
    for name in ("pytest", "_pytest", "pluggy", "iniconfig"):
        origin = Path(importlib.util.find_spec(name).origin)
        source = origin.parent if origin.name == "__init__.py" else origin
        (shutil.copytree if source.is_dir() else shutil.copy)(source, deps / source.name)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_HIDE_PYTEST)
    env = {**os.environ, "DRY_RUN": "1", "DEST": str(tmp_path / "out"), "PYTHONPATH": str(site), "OUT": "",
           "HBM": "1.0", "COMPRESSED": "0", "STRATEGY_CHECK": ""}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_validate.sh")], capture_output=True, text=True,
                          env={**env, "GPU_DEPS": str(deps)}, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert f"== pytest from {deps} (the device's Python has none)" in proc.stdout
    assert "3 skipped" in (tmp_path / "out" / "cpu-dry-run-tests.txt").read_text()

"""Grids and capacity sweeps on Ray give the serial result: joined by address, on a local Ray, with a worker killed.

Ray is started by the tests on this machine only and stopped by them (Ray turns a 127.0.0.1 node address
into the host's own one, so none is given; nothing connects to another machine). Each start costs
seconds, so the tests are few and share one local instance.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import pytest
import ray  # the `cluster` extra; `dev` installs it, so missing it fails these tests instead of skipping them

from tiersim.models import tiny_model
from tiersim.quality.distributed import RayRunner
from tiersim.quality.grid import build_cells, run_grid
from tiersim.quality.journal import RunJournal
from grid_runs import cells as _cells, samples as _samples, without_timing as _without_timing

GENERATION = {"pad_token_id": 0}
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}
NO_RAY = ("import sys; sys.modules['ray'] = None; sys.argv = ['tiersim'] + sys.argv[1:];"
          "from tiersim.cli.main import main; main()")


def _journal_keys(path: Path) -> list[str]:
    return [json.loads(line)["key"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("args", [["grid", "--n", "1", "--ray"], ["capacity", "--ray-address", "auto"]])
def test_without_ray_the_flag_names_the_extra(args, tmp_path):
    proc = subprocess.run([sys.executable, "-c", NO_RAY, *args], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "pip install 'tiersim[cluster]'" in proc.stderr


def test_without_the_flag_ray_is_never_imported(tmp_path):
    proc = subprocess.run([sys.executable, "-c", NO_RAY, "capacity", "--batch", "4", "--steps", "32", "--format",
                           "json"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kind"] == "capacity"


@pytest.fixture
def head_node(monkeypatch):
    """`ray start --head` in a subprocess, on this machine; its address (joined via 127.0.0.1).
    Terminating the blocking `ray start` stops every process it started (checked: none is left in its session)."""
    for name, value in RAY_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # as docs/cluster.md says: a driver joining by address sets it
    # Ray >= 2.60's `ray start` no longer creates a missing token (2.5x wrote ~/.ray/auth_token): hand the
    # head and every driver one through the environment, as docs/cluster.md tells users to.
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Its own temp dir (short: Ray's socket paths must fit 107 bytes), so the cluster address file it
    # leaves is not found by a later `ray.init()` on this machine.
    temp_dir = tempfile.mkdtemp(prefix="tiersim-ray-", dir="/tmp")
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--port", str(port),
               "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp_dir]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output = []
        for line in proc.stdout:
            output.append(line)
            if "Ray runtime started" in line:
                break
        else:
            pytest.fail("ray start --head did not start:\n" + "".join(output))
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
        for pid in left:  # not expected; never leave a Ray process behind
            os.kill(int(pid), signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"ray start left processes running: {left}"


@pytest.mark.slow
def test_cli_grid_joined_by_address_equals_the_serial_grid(head_node, smollm2, tmp_path):
    from tiersim.models import generation_kwargs
    from tiersim.prompts import load_prompts
    from tiersim.quality.grid import prepare_samples
    from tiersim.quality.store import read_grid

    # The CLI in a process of its own, as a user runs it (Ray reads RAY_AUTH_MODE when it loads).
    args = ["grid", "--n", "1", "--max-new-tokens", "3", "--hbm", "0.5", "--evict", "0,0.1", "--baselines", "none",
            "--out", "ray.json", "--ray-address", head_node, "--ray-workers", "1"]
    proc = subprocess.run([sys.executable, "-m", "tiersim", *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "grid 3/3" in proc.stderr and "workers 1/1 alive" in proc.stderr

    model, tokenizer = smollm2  # the serial grid of the same command (the CLI's defaults for the rest)
    expected, _ = run_grid(model, prepare_samples(tokenizer, load_prompts(None, 1)), build_cells([0.5], [0, 0.1]), 3,
                           decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                           generation_kwargs=generation_kwargs(tokenizer))
    got = read_grid(tmp_path / "ray.json")["rows"]
    assert len(got) == 2 and _without_timing(got) == _without_timing(expected)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the tests below (2 CPUs, as CI has), shut down after them."""
    saved = {name: os.environ.get(name) for name in RAY_ENV}
    os.environ.update(RAY_ENV)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def serial_rows():
    rows, _ = run_grid(tiny_model("llama")[0], _samples(), _cells(), 10, generation_kwargs=GENERATION)
    return rows


def test_grid_on_local_ray_equals_serial_and_a_rerun_resumes(local_ray, serial_rows, tmp_path):
    samples, cells = _samples(), _cells()
    total = len(samples) * (len(cells) + 1)
    path = tmp_path / "grid.json.runs.jsonl"
    runner = RayRunner(local_ray, partial(tiny_model, "llama"), workers=2)
    rows, _ = run_grid(None, samples, cells, 10, generation_kwargs=GENERATION, runner=runner,
                       journal=RunJournal(path, {"model": "tiny"}))
    assert _without_timing(rows) == _without_timing(serial_rows)
    keys = _journal_keys(path)
    assert len(keys) == total and len(set(keys)) == total

    asked = []
    again, _ = run_grid(None, samples, cells, 10, generation_kwargs=GENERATION,
                        runner=lambda jobs, *a: asked.extend(jobs) or iter(()),
                        journal=RunJournal(path, {"model": "tiny"}))
    assert asked == [] and again == rows  # everything came back from the journal


def test_a_worker_killed_mid_grid_is_restarted_and_the_grid_equals_serial(local_ray, serial_rows, tmp_path):
    samples, cells = _samples(), _cells()
    path = tmp_path / "grid.json.runs.jsonl"
    runner = RayRunner(local_ray, partial(tiny_model, "llama"), workers=2)
    killed = []

    def kill_a_worker(run):
        if not killed:  # after the first result: the worker still holds queued runs
            pid = next(iter(runner.pids.values()))
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    rows, _ = run_grid(None, samples, cells, 10, generation_kwargs=GENERATION, runner=runner,
                       on_run=kill_a_worker, journal=RunJournal(path, {"model": "tiny"}))
    assert killed and runner.restarts >= 1
    assert _without_timing(rows) == _without_timing(serial_rows)
    keys = _journal_keys(path)  # every line parses: nothing torn, nothing twice
    assert len(keys) == len(samples) * (len(cells) + 1) == len(set(keys))


def test_capacity_on_ray_equals_serial(local_ray):
    from tiersim.cluster import map_tasks
    from tiersim.simulator.capacity import capacity_ticks, grid_result, scenario_from_trace
    from tiersim.simulator.presets import get_gpu, get_model

    scenario = scenario_from_trace(None, get_model("r1-distill-qwen-7b"), get_gpu("h100-sxm"), 16, 2000.0, steps=32)
    ticks = []
    on_ray = grid_result(scenario, progress=lambda: ticks.append(1),
                         map_runs=lambda fn, jobs, tick: map_tasks(local_ray, fn, jobs, on_done=tick))
    assert len(ticks) == capacity_ticks(scenario)
    assert json.dumps(on_ray, default=float) == json.dumps(grid_result(scenario), default=float)


def test_a_worker_that_cannot_load_the_model_fails_in_one_line(local_ray):
    from tiersim.errors import TiersimError
    from tiersim.models import resolve_model_dir

    runner = RayRunner(local_ray, partial(resolve_model_dir, "/nonexistent-model"), workers=1)
    with pytest.raises(TiersimError, match=r"^a Ray worker failed: model '/nonexistent-model' not found"):
        run_grid(None, _samples(1), _cells(), 3, runner=runner)

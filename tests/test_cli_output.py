"""What the CLI writes where: JSON alone on stdout, file notices on stderr, unusable paths refused first."""

import json

import pytest

from cli_run import invoke


@pytest.mark.parametrize("command", [["capacity", "--batch", "8"], ["simulate", "--batch", "8"]])
def test_json_stdout_stays_json_when_files_are_written(tmp_path, command):
    out = tmp_path / ("result.json" if command[0] == "capacity" else "timeline.parquet")
    report = tmp_path / "report.html"
    code, stdout, stderr = invoke([*command, "--steps", "16", "--format", "json", "--out", str(out),
                                   "--report", str(report)])
    assert code == 0, stderr
    json.loads(stdout)
    assert f"wrote {out}" in stderr and f"wrote {report}" in stderr
    assert out.exists() and report.exists()


@pytest.mark.parametrize("option, name", [("--out", "result.json"), ("--report", "r.html")])
def test_unwritable_outputs_are_refused_before_any_work(tmp_path, option, name):
    target = tmp_path / "missing-folder" / name
    code, stdout, stderr = invoke(["capacity", "--batch", "8", option, str(target)])
    assert code == 2 and option in stderr and "does not exist" in stderr
    assert "simulating" not in stderr and not stdout  # refused before the simulation ran


def test_a_directory_is_not_an_output_file(tmp_path):
    code, _, stderr = invoke(["synth", "--out", str(tmp_path)])
    assert code == 2 and "is a directory" in stderr


def test_capture_checks_its_output_before_loading_the_model(tmp_path):
    code, _, stderr = invoke(["capture", "--out", str(tmp_path / "nope" / "t.parquet")])
    assert code == 2 and "--out" in stderr and "loading" not in stderr


def test_threads_default_is_half_the_cpus_and_can_be_set(monkeypatch):
    import torch

    from tiersim.cli import app as app_module

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(app_module.os, "sched_getaffinity", lambda pid: set(range(8)))
        assert app_module.apply_threads(0) == 4 and torch.get_num_threads() == 4
        monkeypatch.setattr(app_module.os, "sched_getaffinity", lambda pid: {0})
        assert app_module.apply_threads(0) == 1
        assert app_module.apply_threads(3) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    code, _, stderr = invoke(["grid", "--threads", "-1", "--n", "1"])
    assert code == 2 and "--threads" in stderr

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


@pytest.mark.parametrize("below", ["", "sub"])
def test_an_output_under_a_regular_file_names_the_file(tmp_path, below):
    """``--out results.json/x.json`` said the folder 'does not exist'; it does, and it is a file."""
    blocker = tmp_path / "results.json"
    blocker.write_text("{}")
    code, stdout, stderr = invoke(["capacity", "--batch", "8", "--out", str(blocker / below / "x.json")])
    assert code == 2 and f"--out: '{blocker}' is a file, not a folder" in stderr and not stdout
    assert blocker.read_text() == "{}"


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


# -- what the issue-26 walk-through saw printed (each from a real run) --------------------------------------------
def test_a_one_step_simulation_has_a_real_time_factor():
    code, stdout, stderr = invoke(["simulate", "--steps", "1", "--batch", "2"])
    assert code == 0, stderr
    factor = [line for line in stdout.splitlines() if line.startswith("real-time factor:")]
    assert factor and float(factor[0].split()[2].rstrip("x").replace(",", "")) > 0, factor


def test_capacity_grid_title_names_the_engine_its_rows_used():
    code, stdout, stderr = invoke(["capacity", "--batch", "8", "--steps", "4", "--format", "json"])
    assert code == 0, stderr
    methods = {row["method"] for row in json.loads(stdout)["rows"]}
    code, text, stderr = invoke(["capacity", "--batch", "8", "--steps", "4"])
    title = [line for line in text.splitlines() if line.startswith("Prefetch grid at batch")][0]
    assert len(methods) == 1 and f"({methods.pop()};" in title, title


def test_a_report_written_by_capacity_names_the_run_not_memory(tmp_path):
    page = tmp_path / "r.html"
    code, _, stderr = invoke(["capacity", "--batch", "2", "--steps", "2", "--report", str(page)])
    assert code == 0, stderr
    html = page.read_text()
    assert "&lt;in memory&gt;" not in html and "<in memory>" not in html
    assert "this run: tiersim capacity --batch 2 --steps 2 --report" in html


def test_simulate_report_alone_draws_what_the_out_file_draws_and_writes_nothing_else(tmp_path):
    """Without ``--out`` the report is drawn from the table ``--out`` would write, not from a temporary file
    (a full or read-only system temp folder cost the report): the same plots, and no other file anywhere."""
    import re

    from tiersim.report import build_report

    alone, out = tmp_path / "alone" / "r.html", tmp_path / "t.parquet"
    alone.parent.mkdir()
    for args in (["--report", str(alone)], ["--out", str(out)]):
        code, _, stderr = invoke(["simulate", "--batch", "4", "--steps", "8", *args])
        assert code == 0, stderr

    def plots(html: str) -> list[str]:
        return re.findall(r"Plotly\.newPlot\((.*?)\)\s*};?", html, re.S)

    text = alone.read_text()
    assert plots(text) and plots(text) == plots(build_report([out]))
    assert "this run: tiersim simulate" in text and list(alone.parent.iterdir()) == [alone]


@pytest.fixture(scope="module")
def cpu_calibration(tmp_path_factory):
    """``validate --device cpu`` (the smoke mode) on the tiny shape: its printout and its file."""
    out = tmp_path_factory.mktemp("smoke") / "cpu.json"
    code, stdout, stderr = invoke(["validate", "--device", "cpu", "--batch", "1", "--context", "64",
                                   "--hbm", "1,0.5", "--steps", "2", "--warmup", "1", "--out", str(out)])
    assert code == 0, stderr
    return out, stderr + stdout  # the progress lines go to stderr, the table to stdout


def _odd_words(printed: str) -> list[str]:
    return [w for w in printed.split() if w.lower().strip(",;()") in ("nan", "-%", "inf", "nan%")]


def test_the_cpu_smoke_mode_prints_no_nan_or_empty_percentages(cpu_calibration):
    _, printed = cpu_calibration
    assert "stall not timed" in printed and "prefetch: not measured" in printed
    assert not _odd_words(printed), printed


def test_a_grid_cut_short_by_its_budget_says_what_was_not_measured():
    code, stdout, stderr = invoke(["validate", "--device", "cpu", "--batch", "1", "--context", "64", "--hbm", "0.5",
                                   "--steps", "2", "--warmup", "1", "--budget-s", "0.001"])
    assert code == 0, stderr
    assert "max transfer overhead not measured" in stdout and not _odd_words(stderr + stdout), stdout


def test_a_cpu_calibration_is_a_report_input_labelled_as_the_cpu(tmp_path, cpu_calibration):
    path, _ = cpu_calibration
    page = tmp_path / "cal.html"
    code, _, stderr = invoke(["report", str(path), "--out", str(page)])
    assert code == 0, stderr  # every field the validator writes is one the report reads (tier_bytes: a dict)
    html = page.read_text()
    assert "measured on the CPU (smoke mode)" in html and "measured on the GPU" not in html

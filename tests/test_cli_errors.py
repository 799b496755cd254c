"""The CLI's error contract where it meets the environment: missing extras, odd characters in paths."""

import subprocess
import sys

import pytest

# Runs the console script with torch made unimportable, as on a machine that installed only the
# simulator (`pip install -e .`).
WITHOUT_TORCH = (
    "import sys; sys.modules['torch'] = None; sys.argv = ['tiersim'] + sys.argv[1:];"
    "from tiersim.cli.main import main; main()"
)


@pytest.mark.parametrize("args", [["grid", "--n", "1"], ["capture", "--n", "1", "--out", "t.parquet"],
                                  ["validate", "--device", "cpu"]])
def test_model_commands_without_torch_name_the_install(args, tmp_path):
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *args], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "needs torch" in proc.stderr and "pip install -e '.[model]'" in proc.stderr  # markup kept literal


def test_simulator_commands_run_without_torch(tmp_path):
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "capacity", "--batch", "4", "--format", "json"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_brackets_in_an_error_message_are_printed_as_written(tmp_path):
    missing = tmp_path / "[dev]" / "prompts.jsonl"
    proc = subprocess.run([sys.executable, "-m", "tiersim", "grid", "--prompts", str(missing)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and str(missing) in proc.stderr

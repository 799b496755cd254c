"""The process as a shell sees it: a reader that closes the pipe, SIGTERM / SIGHUP mid-write. Each case runs a
fresh `python -m tiersim` (signals and file descriptors are the process's, not a test's)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
SERVE = ["serve", "--requests", "3", "--qps", "1", "--lengths", "8", "--prompt-lengths", "8", "--on-full", "queue"]


def _closed_pipe() -> int:
    """A pipe's write end whose reader is already gone (``| head`` after its lines): every write is EPIPE."""
    read, write = os.pipe()
    os.close(read)
    return write


@pytest.mark.parametrize("args, out", [
    (["capacity", "--batch", "4", "--steps", "2", "--format", "json"], "capacity.json"),  # the document, then the file
    ([*SERVE, "--format", "json"], "serving.parquet"),
    (SERVE, "serving.parquet"),  # the table (rich), then the file
])
def test_a_closed_stdout_still_writes_the_files(tmp_path, args, out):
    """click and rich ended the process at the first EPIPE (exit 1, silently): `tiersim ... --out F | head` lost F."""
    write = _closed_pipe()
    try:
        proc = subprocess.run([sys.executable, "-m", "tiersim", *args, "--out", out], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120, cwd=tmp_path, env=ENV)
    finally:
        os.close(write)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, \
        proc.stderr
    assert f"wrote {out}" in proc.stderr and (tmp_path / out).stat().st_size > 0
    if out.endswith(".json"):
        assert json.loads((tmp_path / out).read_text())["kind"] == "capacity"


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_a_full_stdout_still_writes_the_files_then_says_so(tmp_path, fmt):
    """`> /dev/full`: the ENOSPC of the table's first line was the error, and --out was never written."""
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "tiersim", *SERVE, "--format", fmt, "--out", "s.parquet"],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=120, cwd=tmp_path, env=ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: stdout: No space left on device (ENOSPC)")
    assert (tmp_path / "s.parquet").stat().st_size > 0


def test_a_closed_stdout_is_a_reader_gone(tmp_path):
    """`>&-` (sys.stdout is None): the run and its files as with any stdout."""
    proc = subprocess.run([sys.executable, "-m", "tiersim", *SERVE, "--out", "s.parquet"], stdout=None,
                          stderr=subprocess.PIPE, text=True, timeout=120, cwd=tmp_path, env=ENV,
                          preexec_fn=lambda: os.close(1))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert (tmp_path / "s.parquet").stat().st_size > 0


# SIGTERM (or SIGHUP) sent by the process to itself just after the Parquet writer filled the temporary file, before
# the rename: the moment a timeout or a closed terminal leaves a `.serving.parquet.*.tmp` behind.
KILLED_MID_WRITE = """
import os, signal, sys
import pyarrow.parquet as pq
SIGNAL = getattr(signal, sys.argv[1])
real = pq.write_table
def write_then_signal(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), SIGNAL)
pq.write_table = write_then_signal
sys.argv = ["tiersim", *sys.argv[2:]]
from tiersim.cli.main import run
run()
"""


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_signal_mid_write_leaves_no_temporary_file(tmp_path, name):
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, name, *SERVE, "--out", "serving.parquet"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=ENV)
    assert proc.returncode == 128 + getattr(signal, name), proc.stderr  # as the shell reports a signal's end
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"interrupted ({name}): no partial output was written"
    assert sorted(os.listdir(tmp_path)) == []  # neither the result under its name nor the temporary file

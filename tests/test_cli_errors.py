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


@pytest.mark.parametrize("args", [["capacity", "--batch", "2", "--steps", "2", "--trace", "{fifo}"],
                                  ["report", "{fifo}", "--out", "{tmp}/r.html"]])
def test_a_fifo_input_is_refused_not_waited_on(args, tmp_path):
    """A named pipe as an input passed every check (it exists, it is readable) and open() then waited for a
    writer forever; a fresh process with a timeout, since before the fix it never returned."""
    import os

    fifo = tmp_path / "trace.parquet"
    os.mkfifo(fifo)
    args = [a.replace("{fifo}", str(fifo)).replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run([sys.executable, "-m", "tiersim", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert f"{fifo} is not a regular file (a pipe or a device)" in proc.stderr


def test_fileformat_read_refuses_a_fifo(tmp_path):
    import os
    import threading

    from tiersim import fileformat

    fifo = tmp_path / "doc.json"
    os.mkfifo(fifo)
    raised = []

    def read():
        try:
            fileformat.read(fifo, [fileformat.KINDS["calibration"]], label="--compare")
        except Exception as exc:  # noqa: BLE001 - the test looks at what it was
            raised.append(exc)

    # In a daemon thread: before the fix read() blocked in open() for a writer that never comes.
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)
    assert not reader.is_alive(), "fileformat.read waited on the pipe"
    assert raised and "is not a regular file (a pipe or a device)" in str(raised[0])


@pytest.mark.parametrize("through_a_link", [False, True])
def test_an_output_that_is_a_pipe_is_refused_before_work(tmp_path, through_a_link):
    """A FIFO (or a device, e.g. `out.parquet -> /dev/null`) as --out passed the checks, and the result's rename
    replaced the node itself."""
    import os

    fifo = tmp_path / "fifo.parquet"
    os.mkfifo(fifo)
    out = fifo
    if through_a_link:
        out = tmp_path / "out.parquet"
        out.symlink_to(fifo)
    proc = subprocess.run([sys.executable, "-m", "tiersim", "serve", "--requests", "3", "--lengths", "8",
                           "--prompt-lengths", "8", "--on-full", "queue", "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "is not a regular file (a device or a pipe)" in proc.stderr and fifo.is_fifo()


def test_an_output_name_longer_than_the_file_system_takes_is_refused_before_work(tmp_path):
    """is_dir() raised ENAMETOOLONG: one line, but without the option's name."""
    proc = subprocess.run([sys.executable, "-m", "tiersim", "serve", "--requests", "3", "--lengths", "8",
                           "--prompt-lengths", "8", "--on-full", "queue",
                           "--out", str(tmp_path / ("a" * 300 + ".parquet"))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout
    assert "--out: the file name is 308 bytes long, more than the 255" in proc.stderr


@pytest.mark.parametrize("loop", [False, True])
def test_an_input_that_is_a_link_to_nowhere_says_so(tmp_path, loop):
    """A dangling link or a loop of links read 'file not found' for a name ls lists."""
    link = tmp_path / "requests.csv"
    if loop:
        (tmp_path / "other.csv").symlink_to(link)
        link.symlink_to(tmp_path / "other.csv")
    else:
        link.symlink_to(tmp_path / "gone.csv")
    proc = subprocess.run([sys.executable, "-m", "tiersim", "serve", "--requests-file", str(link), "--on-full", "queue"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert f"--requests-file: {link} is a symbolic link to nowhere" in proc.stderr

"""An interrupted grid resumes from its run journal and ends with the rows an uninterrupted grid gives."""

import pytest
from typer.testing import CliRunner

from tiersim.errors import TiersimError
from tiersim.quality import grid as grid_module
from tiersim.quality.grid import Sample, build_cells, run_grid
from tiersim.quality.journal import RunJournal, journal_path
from tiersim.quality.store import read_grid
from grid_runs import cells as _cells, samples as _samples, without_timing as _without_timing

CONTEXT = {"model": "tiny-llama", "device": "cpu", "dtype": "float32"}
GENERATION = {"pad_token_id": 0}


@pytest.fixture
def count_generations(monkeypatch):
    calls = []
    real = grid_module.generate

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(grid_module, "generate", counting)
    return calls


def test_an_interrupted_grid_resumes_with_identical_rows(tiny_llama, tmp_path, count_generations):
    samples, cells = _samples(), _cells()
    total = len(samples) * (len(cells) + 1)
    reference, _ = run_grid(tiny_llama, samples, cells, 10, generation_kwargs=GENERATION)

    path = tmp_path / "grid.json.runs.jsonl"
    journal = RunJournal(path, CONTEXT)
    finished = []

    def stop_after_four(run):
        finished.append(run)
        if len(finished) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_grid(tiny_llama, samples, cells, 10, generation_kwargs=GENERATION, on_run=stop_after_four, journal=journal)
    journal.close()
    assert len(path.read_text().splitlines()) == 4

    count_generations.clear()
    resumed_runs = []
    rows, _ = run_grid(tiny_llama, samples, cells, 10, generation_kwargs=GENERATION, on_run=resumed_runs.append,
                       journal=RunJournal(path, CONTEXT))
    assert len(count_generations) == total - 4
    assert [r.resumed for r in resumed_runs] == [True] * 4 + [False] * (total - 4)
    assert _without_timing(rows) == _without_timing(reference)

    count_generations.clear()
    again, _ = run_grid(tiny_llama, samples, cells, 10, generation_kwargs=GENERATION, journal=RunJournal(path, CONTEXT))
    assert count_generations == [] and again == rows  # stored seconds too: the same document


def test_a_run_is_reused_only_under_the_same_settings(tmp_path):
    journal = RunJournal(tmp_path / "j.jsonl", CONTEXT)
    sample, cells = _samples(1)[0], _cells()
    base = journal.key(sample, cells[0], 10, GENERATION)
    assert base == RunJournal(tmp_path / "other.jsonl", dict(CONTEXT)).key(sample, cells[0], 10, GENERATION)
    changed = [
        journal.key(sample, cells[1], 10, GENERATION),  # another cell
        journal.key(sample, None, 10, GENERATION),  # the full cache
        journal.key(sample, cells[0], 11, GENERATION),  # max_new_tokens
        journal.key(sample, cells[0], 10, {"pad_token_id": 1}),
        journal.key(Sample("s0", sample.input_ids + 1, None), cells[0], 10, GENERATION),  # same id, other tokens
        journal.key(sample, build_cells([0.5], [0], retier_every=8)[0], 10, GENERATION),  # a policy option
        RunJournal(tmp_path / "j2.jsonl", {**CONTEXT, "dtype": "bfloat16"}).key(sample, cells[0], 10, GENERATION),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_a_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "j.jsonl"
    journal = RunJournal(path, CONTEXT)
    journal.add("a", [1, 2], 0.5, {})
    journal.add("b", [3], 0.25, {"hbm": 3})
    journal.close()
    with open(path, "a") as f:
        f.write('{"schema": 1, "key": "c", "token_ids": [4')  # killed mid-write
    back = RunJournal(path, CONTEXT)
    assert len(back) == 2 and back.get("b")["tier_counts"] == {"hbm": 3} and back.get("c") is None
    back.add("d", [5], 0.1, {})  # the resumed run appends after the torn line, not onto it
    back.close()
    assert len(RunJournal(path, CONTEXT)) == 3
    back.discard()
    assert not path.exists()


@pytest.mark.parametrize("damaged", [
    b"\xff\xfe garbage\n",  # bytes that are not UTF-8: the whole resume was one line naming neither the journal
    # right key, wrong types (a hand edit, a damaged disk): the tokenizer raised a TypeError traceback
    b'{"schema": 1, "key": "c", "token_ids": "x", "seconds": 0.1, "tier_counts": {}}\n',
    b'{"schema": 1, "key": "c", "token_ids": [1, true], "seconds": 0.1, "tier_counts": {}}\n',
    b'{"schema": 1, "key": "c", "token_ids": [1], "seconds": "slow", "tier_counts": {}}\n',
    b'{"schema": 1, "key": "c", "token_ids": [1], "seconds": NaN, "tier_counts": {}}\n',
    b'{"schema": 1, "key": "c", "token_ids": [1], "seconds": 0.1, "tier_counts": [1]}\n',
    b'{"schema": 1, "key": "c", "token_ids": [1], "seconds": 0.1}\n',
    b'{"schema": 1, "key": 7, "token_ids": [1], "seconds": 0.1, "tier_counts": {}}\n',
])
def test_a_damaged_line_is_skipped_like_a_torn_one(tmp_path, damaged):
    path = tmp_path / "j.jsonl"
    journal = RunJournal(path, CONTEXT)
    journal.add("a", [1, 2], 0.5, {"hbm": 2})
    journal.close()
    with open(path, "ab") as f:
        f.write(damaged)
    journal = RunJournal(path, CONTEXT)
    journal.add("b", [3], 0.25, {})
    journal.close()
    back = RunJournal(path, CONTEXT)
    assert len(back) == 2 and back.get("c") is None and back.get("7") is None
    assert back.get("a")["token_ids"] == [1, 2] and back.get("b")["token_ids"] == [3]


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_under_the_journal_is_one_line_naming_it(tmp_path):
    """/dev/full fails every write with ENOSPC: the error was a bare 'No space left on device' (no file), and
    the grid's close() in its error path flushed the same buffer again, raising over its 'runs are kept' line."""
    from pathlib import Path

    from tiersim.atomic import WriteError

    journal = RunJournal(tmp_path / "runs.jsonl", {})
    journal.path = Path("/dev/full")  # set after loading: reading /dev/full never ends
    with pytest.raises(WriteError, match=r"cannot write /dev/full: No space left on device \(ENOSPC\)"):
        journal.add("k", [1, 2, 3], 0.1, {})
    journal.close()  # nothing left to flush
    assert len(journal) == 0  # the run was not recorded as kept


def test_cli_keeps_finished_runs_and_resumes(tmp_path, smollm2, monkeypatch):
    from tiersim.cli.main import app

    out = tmp_path / "grid.json"
    args = ["grid", "--n", "2", "--max-new-tokens", "3", "--hbm", "0.5", "--evict", "0", "--baselines", "none",
            "--out", str(out)]
    calls = []
    real = grid_module.generate

    def interrupted(*a, **k):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(grid_module, "generate", interrupted)
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and not out.exists()
    assert "3 finished runs are kept in" in str(result.exception)  # the `interrupted:` line under tiersim
    assert len(journal_path(out).read_text().splitlines()) == 3

    calls.clear()
    monkeypatch.setattr(grid_module, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.stderr and len(calls) == 1  # 2 prompts x (full + 1 cell) = 4 runs
    assert read_grid(out)["rows"][0]["exact_match"] == 1.0
    assert not journal_path(out).exists()  # --out holds everything now


@pytest.mark.parametrize("resume", [True, False])
def test_a_directory_where_the_journal_goes_is_one_line_naming_it(tmp_path, monkeypatch, resume):
    """The journal's path being a folder gave a bare '[Errno 21] Is a directory' (reading it with --resume,
    deleting it without): the line now names the journal and says a file belongs there, before any model work."""
    from tiersim.cli.main import app

    (tmp_path / "out.json.runs.jsonl").mkdir()
    monkeypatch.chdir(tmp_path)
    args = ["grid", "--model", "no-such-model", "--out", "out.json"] + (["--resume"] if resume else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert isinstance(result.exception, TiersimError), result.exception
    message = str(result.exception)
    assert "out.json.runs.jsonl is a directory" in message and "in a file" in message and "Errno" not in message
    assert (tmp_path / "out.json.runs.jsonl").is_dir()  # nothing of the user's is removed

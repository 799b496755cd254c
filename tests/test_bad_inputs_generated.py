"""Generated bad input over every command the app registers (issue 26): no traceback, no silent accept.

The commands and their options are read from the typer app (``cli.options.describe``), so a command
added later is covered by the generic cases without a line here. Each case runs the real entry point
in-process (``cli_run.invoke``) with one bad value on top of valid, quick arguments: the bad value is
the only reason to refuse, and the run must end with exit 2 and one ``error:`` line, before any work.

Targets made in the test: missing folders, directories, wrong suffixes, outputs that are the run's own
input, read-only folders (a read-only tmpfs as root, else a 0555 folder) and full disks: a small
tmpfs where ``mount`` works (root), and everywhere a fake one (``os.replace`` raising ENOSPC), with
the ``--format json`` document still on stdout.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_run import invoke

from tiersim.cli.main import app
from tiersim.cli.options import describe
from tiersim.traces import default_trace_path

REPO = Path(__file__).resolve().parent.parent
COMMANDS = {(info.name or info.callback.__name__).replace("_", "-"): info.callback for info in app.registered_commands}
SPECS = {name: [s for s in describe(callback) if s.flag != "--wide"] for name, callback in COMMANDS.items()}
#: Valid, quick arguments per command (a command without an entry runs with none: its bad values must
#: be refused all the same). "{capacity}" is a capacity file made once for the module.
BASE = {
    "simulate": ["--steps", "2", "--batch", "2", "--format", "json"],
    "capacity": ["--batch", "2", "--steps", "2", "--format", "json"],
    "synth": ["--n", "1", "--lengths", "8"],
    "grid": ["--n", "1", "--max-new-tokens", "1"],
    "capture": ["--n", "1", "--max-new-tokens", "1"],
    "validate": ["--device", "cpu", "--batch", "1", "--context", "8", "--hbm", "1", "--steps", "1", "--warmup", "1"],
    "report": ["{capacity}"],
    "serve": ["--requests", "3", "--qps", "1", "--lengths", "8", "--prompt-lengths", "8", "--on-full", "queue",
              "--format", "json"],
}
GOOD_CONFIG = {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2,
               "head_dim": 32, "intermediate_size": 512, "vocab_size": 1000}
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder to run in (a command's default output lands here, never in the checkout) with the
    valid input files the cases need."""
    folder = tmp_path_factory.mktemp("bad-inputs")
    code, out, err = invoke(["capacity", "--batch", "2", "--steps", "2", "--format", "json",
                             "--out", str(folder / "capacity.json")])
    assert code == 0, err
    shutil.copy(default_trace_path(), folder / "trace.parquet")
    (folder / "config.json").write_text(json.dumps(GOOD_CONFIG))
    (folder / "prompts.jsonl").write_text(json.dumps({"prompt": "What is 2 + 2?"}) + "\n")
    (folder / "requests.csv").write_text("arrival_s,prompt_tokens,output_tokens\n0,8,4\n0.5,8,4\n")
    shutil.copy(REPO / "docs" / "validation" / "h100-80gb-hbm3.json", folder / "calibration.json")
    shutil.copy(REPO / "docs" / "validation" / "h100-80gb-hbm3-operators.json", folder / "profile.json")
    cwd = os.getcwd()
    os.chdir(folder)
    yield folder
    os.chdir(cwd)


#: A valid file for each input option (by flag), so "the output is this input" is the only fault.
VALID_INPUT = {"--trace": "trace.parquet", "INPUT": "capacity.json", "--model-config": "config.json",
               "--prompts": "prompts.jsonl", "--calibration": "calibration.json", "--against": "calibration.json",
               "--compare": "calibration.json", "--profile": "profile.json", "--requests-file": "requests.csv"}


def base_args(command: str, work: Path, without: str | None = None) -> list[str]:
    args = [a.replace("{capacity}", str(work / "capacity.json")) for a in BASE.get(command, [])]
    if without == "INPUT":  # the bad value is report's input itself
        args = [a for a in args if not a.endswith("capacity.json")]
    return args


def assert_refused(args: list[str], *, before_work: bool = True) -> tuple[str, str]:
    code, out, err = invoke(args)
    assert "Traceback" not in err, err
    assert code == 2, f"exit {code} for tiersim {' '.join(args)}: {err or out[:200]}"  # no silent accept
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:") and sum(x.startswith("error:") for x in lines) == 1, err
    if before_work:
        assert len(lines) == 1, err  # refused before any progress, load or write
        assert not out, out
    return out, err


# -- option values: every number, every choice, every option of every command ------------------------------
def _number_cases(spec) -> st.SearchStrategy[str]:
    b = spec.bounds
    words = ["x", "", "1,2", "--"] + (["1.5", "1e3", "nan"] if spec.kind is int else ["nan", "inf", "-inf", "1e999"])
    out = [st.sampled_from(words)]
    if b.min is not None:
        low = st.integers(-10**12, int(b.min) - 1) if spec.kind is int else st.floats(-1e12, b.min, exclude_max=True)
        out.append(low.map(str))
    if b.max is not None:
        high = (st.integers(int(b.max) + 1, 10**15) if spec.kind is int
                else st.floats(b.max, 1e12, exclude_min=True))
        out.append(high.map(str))
    return st.one_of(out)


def _fuzzable(spec) -> bool:
    if spec.kind in (int, float):
        return True
    return spec.kind is str and bool(spec.bounds.choices)


CASES = [(command, spec) for command in COMMANDS for spec in SPECS[command] if _fuzzable(spec)]


def test_every_command_goes_through_the_checks():
    assert all(getattr(callback, "tiersim_options", None) is not None for callback in COMMANDS.values())


def test_every_command_has_cases_and_every_option_help():
    assert {"simulate", "capacity", "synth", "report", "capture", "grid", "validate", "presets"} <= set(COMMANDS)
    assert len(CASES) >= 50  # (command, option) pairs with a type or range to break
    for command, callback in COMMANDS.items():
        missing = [s.flag for s in SPECS[command] if not s.argument and not _help(callback, s.name)]
        assert not missing, f"{command}: no help for {missing}"


def _help(callback, name: str) -> str | None:
    import inspect

    default = inspect.signature(callback).parameters[name].default
    return getattr(default, "help", None)


@settings(max_examples=400, **SETTINGS)
@given(data=st.data())
def test_bad_option_values_are_refused_by_name(work, data):
    command, spec = data.draw(st.sampled_from(CASES))
    if spec.kind is str:
        value = data.draw(st.text(min_size=1, max_size=8).filter(
            lambda s: s not in spec.bounds.choices and not s.startswith("-") and s.strip() == s and s))
    else:
        value = data.draw(_number_cases(spec))
    _, err = assert_refused([command, *base_args(command, work), spec.flag, value])
    assert spec.flag in err or "--" not in value and value == "", err  # the option is named


# -- input files: missing, a directory, empty, garbage ----------------------------------------------------------
INPUTS = [(command, spec) for command in COMMANDS for spec in SPECS[command] if spec.input]


def _input_args(command, spec, work, path) -> list[str]:
    args = [command, *base_args(command, work, without=spec.flag)]
    return args + ([str(path)] if spec.argument else [spec.flag, str(path)])


@pytest.mark.parametrize("kind", ["missing", "directory", "empty"])
@pytest.mark.parametrize("command, spec", INPUTS, ids=[f"{c}{s.flag}" for c, s in INPUTS])
def test_unreadable_input_files_are_refused(work, command, spec, kind):
    path = work / f"in-{kind}-{command}-{spec.name}.json"
    if kind == "directory":
        path.mkdir(exist_ok=True)
    elif kind == "empty":
        path.write_bytes(b"")
    assert_refused(_input_args(command, spec, work, path))


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_garbage_input_files_are_refused(work, data):
    command, spec = data.draw(st.sampled_from(INPUTS))
    path = work / f"garbage-{command}-{spec.name}.json"
    path.write_bytes(data.draw(st.binary(min_size=1, max_size=64).filter(lambda b: b.strip(b"\n\r\t ") != b"")))
    assert_refused(_input_args(command, spec, work, path))


# -- output targets -----------------------------------------------------------------------------------------------
OUTPUTS = [(command, spec) for command in COMMANDS for spec in SPECS[command] if spec.output is not None]


def _target(kind: str, spec, work: Path, readonly: Path) -> Path:
    suffix = spec.output[0] if spec.output else ".out"
    if kind == "directory":
        return work
    if kind == "missing-folder":
        return work / "no-such-folder" / f"x{suffix}"
    if kind == "wrong-suffix":
        return work / "x.txt"
    return readonly / f"x{suffix}"


@pytest.fixture(scope="module")
def readonly(tmp_path_factory):
    """A folder nobody may write: a read-only tmpfs where we are root (root ignores mode bits), else 0555."""
    folder = tmp_path_factory.mktemp("readonly")
    mounted = os.geteuid() == 0 and _mount(folder, "ro,size=64k")
    if not mounted:
        folder.chmod(0o555)
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=False)
    else:
        folder.chmod(0o755)


def _mount(folder: Path, options: str) -> bool:
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.parametrize("kind", ["directory", "missing-folder", "wrong-suffix", "read-only"])
@pytest.mark.parametrize("command, spec", OUTPUTS, ids=[f"{c}{s.flag}" for c, s in OUTPUTS])
def test_unusable_outputs_are_refused_before_work(work, readonly, command, spec, kind):
    if kind == "wrong-suffix" and not spec.output:
        pytest.skip(f"{command} {spec.flag} declares no suffix")
    target = _target(kind, spec, work, readonly)
    assert_refused([command, *base_args(command, work), spec.flag, str(target)])


SAME = [(command, out, inp) for command in COMMANDS for out in SPECS[command] if out.output is not None
        for inp in SPECS[command] if inp.input and inp.flag in VALID_INPUT]


@pytest.mark.parametrize("command, out, inp", SAME, ids=[f"{c}{o.flag}={i.flag}" for c, o, i in SAME])
def test_an_output_may_not_be_an_input_of_the_same_run(work, command, out, inp):
    shared = work / f"shared-{command}-{inp.flag.strip('-')}{out.output[0] if out.output else '.out'}"
    shutil.copy(work / VALID_INPUT[inp.flag], shared)  # a valid input: being the output is the only fault
    before = shared.read_bytes()
    args = [command, *base_args(command, work, without=inp.flag)]
    args += [str(shared)] if inp.argument else [inp.flag, str(shared)]
    _, err = assert_refused([*args, out.flag, str(shared)])
    assert "overwrite its own input" in err and shared.read_bytes() == before


# -- full disks: a real small tmpfs where it can be mounted, a fake ENOSPC everywhere -------------------------------
#: Commands that compute in well under a second, with an output of each kind.
QUICK_WRITES = [
    (["simulate", "--steps", "2", "--batch", "2", "--format", "json"], "--out", ".parquet", True),
    (["simulate", "--steps", "2", "--batch", "2", "--format", "json"], "--report", ".html", True),
    (["capacity", "--batch", "2", "--steps", "2", "--format", "json"], "--out", ".json", True),
    (["capacity", "--batch", "2", "--steps", "2", "--format", "json"], "--report", ".html", True),
    (["synth", "--n", "1", "--lengths", "8"], "--out", ".parquet", False),
    (["report", "{capacity}"], "--out", ".html", False),
]


@pytest.mark.parametrize("args, flag, suffix, json_out", QUICK_WRITES, ids=[f"{a[0]}{f}" for a, f, _, _ in QUICK_WRITES])
def test_a_failed_write_is_one_line_and_the_json_still_arrives(work, monkeypatch, args, flag, suffix, json_out):
    """The fake full disk: every atomic rename into the output folder fails with ENOSPC, after the work."""
    import tiersim.atomic

    replace = os.replace

    def full(src, dst, *a, **k):  # the disk holding the outputs is full; the temporary folder is not
        if Path(dst).parent == work:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return replace(src, dst, *a, **k)

    monkeypatch.setattr(tiersim.atomic.os, "replace", full)
    target = work / f"full-{args[0]}{suffix}"
    args = [a.replace("{capacity}", str(work / "capacity.json")) for a in args]
    out, err = assert_refused([*args, flag, str(target)], before_work=False)
    assert "ENOSPC" in err and str(target) in err
    assert not target.exists() and not list(work.glob(f".{target.name}.*"))  # no half file, no temporary left
    if json_out:
        json.loads(out)  # the computed result reached stdout


@pytest.fixture(scope="module")
def tiny_disk(tmp_path_factory):
    """A 256 kB tmpfs with about 100 kB left (None where mount is not allowed: not root)."""
    folder = tmp_path_factory.mktemp("tiny-disk")
    if os.geteuid() != 0 or not _mount(folder, "size=256k"):
        yield None
        return
    (folder / "filler").write_bytes(b"\0" * 150_000)
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_a_real_full_disk(work, tiny_disk):
    if tiny_disk is None:
        pytest.skip("cannot mount a tmpfs here (not root); the fake ENOSPC cases cover the write path")
    # An HTML report (~5 MB) is refused before the work: its size is known.
    _, err = assert_refused(["report", str(work / "capacity.json"), "--out", str(tiny_disk / "r.html")])
    assert "no room" in err
    # A timeline of 20,000 steps outgrows the 100 kB left: the write fails, the document arrives.
    out, err = assert_refused(["simulate", "--steps", "20000", "--batch", "2", "--format", "json",
                               "--out", str(tiny_disk / "t.parquet")], before_work=False)
    assert "ENOSPC" in err and "t.parquet" in err
    json.loads(out)
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler"]


# -- silently wrong answers the issue found ----------------------------------------------------------------------
@pytest.mark.parametrize("config, words", [
    ({**GOOD_CONFIG, "use_sliding_window": True, "sliding_window": 4096}, "sliding-window"),
    ({**GOOD_CONFIG, "model_type": "mistral", "sliding_window": 4096}, "sliding-window"),
    ({**GOOD_CONFIG, "torch_dtype": "int3"}, "torch_dtype"),
    ({**GOOD_CONFIG, "torch_dtype": 16}, "torch_dtype"),
])
def test_model_configs_the_simulator_would_misplan_are_refused(work, config, words):
    path = work / "odd-config.json"
    path.write_text(json.dumps(config))
    _, err = assert_refused(["capacity", "--model-config", str(path), "--batch", "2", "--steps", "2"])
    assert words in err


def test_full_attention_configs_still_plan(work):
    path = work / "qwen-like.json"
    path.write_text(json.dumps({**GOOD_CONFIG, "torch_dtype": "bfloat16", "use_sliding_window": False,
                                "sliding_window": 131072}))
    code, out, err = invoke(["simulate", "--model-config", str(path), "--steps", "2", "--batch", "2", "--format", "json"])
    assert code == 0, err


@pytest.mark.parametrize("args, words", [
    (["capacity", "--model-config", "{config}", "--model", "llama-3.1-8b"], "give one"),
    (["synth", "--sigma", "50"], "--sigma"),
    (["synth", "--lengths", "1e9"], "available"),
    (["synth", "--layers", "100000"], "--layers"),
    (["synth", "--n", "100000000"], "--n"),
    (["synth", "--lengths", "nan"], "--lengths"),
    (["capture", "--n", "100000"], "36 prompts"),
    (["grid", "--prompts", "{work}"], "is a directory"),
    (["simulate", "--hbm", "0.63", "--ddr", "0.5"], "1.13"),
    (["capture", "--hbm", "1.5"], "--hbm"),
])
def test_the_issues_silent_and_unclear_cases(work, args, words):
    args = [a.replace("{config}", str(work / "config.json")).replace("{work}", str(work)) for a in args]
    _, err = assert_refused(args)
    assert words in err and "1.1300000000000001" not in err and "TierConfig" not in err


def test_a_report_field_of_the_wrong_type_is_refused(work):
    document = json.loads((work / "capacity.json").read_text())
    document["rows"][0]["step_ms"] = "fast"
    path = work / "typed.json"
    path.write_text(json.dumps(document))
    _, err = assert_refused(["report", str(path), "--out", str(work / "typed.html")])
    assert "step_ms" in err


def test_synth_bounds_follow_the_memory_available(monkeypatch):
    from tiersim.errors import TiersimError
    from tiersim.traces import read
    from tiersim.traces import synth

    profile = synth.fit(read(default_trace_path()))
    monkeypatch.setattr(synth, "available_memory", lambda: 100 * 10**6)  # 100 MB: 125,000 rows
    with pytest.raises(TiersimError, match="lower --n, --lengths or --layers"):
        synth.synthesize(profile, n=4, mean_length=2000, num_layers=30)
    assert len(synth.synthesize(profile, n=1, mean_length=100, num_layers=30).steps) < 10_000


def test_an_interrupted_capture_keeps_its_sequences_and_resumes(work, monkeypatch):
    import tiersim.models
    import tiersim.traces.capture
    from tiersim.traces import Trace, read
    from tiersim.traces.resume import parts_path

    source = read(default_trace_path())
    calls = []

    def one_sequence(model, tokenizer, items, *args, on_sequence=None, **kwargs):
        """The model's run of one prompt: a sequence of the bundled trace, renamed; Ctrl-C on the 2nd call."""
        calls.append(items[0].id)
        if interrupt_at and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        on_sequence(type("Done", (), {"prompt_id": items[0].id, "new_tokens": 1, "seconds": 1.0})())
        steps = source.steps[source.steps.seq_id == 0].copy()
        sequence = {**source.meta["sequences"][0], "seq_id": 0, "prompt_id": items[0].id}
        return Trace(meta={**source.meta, "sequences": [sequence]}, steps=steps)

    monkeypatch.setattr(tiersim.models, "load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(tiersim.models, "describe_model", lambda model: {})
    monkeypatch.setattr(tiersim.traces.capture, "capture", one_sequence)
    out = work / "cut.parquet"
    args = ["capture", "--n", "3", "--max-new-tokens", "1", "--out", str(out)]
    interrupt_at = 2
    code, _, err = invoke(args)
    lines = err.strip().splitlines()
    assert code == 130 and "Traceback" not in err
    assert lines[-1].startswith(f"interrupted: capture kept 1 of 3 sequences in {parts_path(out)}"), lines
    assert not out.exists() and len(list(parts_path(out).glob("*.parquet"))) == 1

    calls.clear()
    interrupt_at = None
    code, _, err = invoke(args)
    assert code == 0, err
    assert "resuming" in err and len(calls) == 2  # only the two that had not finished
    trace = read(out)
    assert [s["seq_id"] for s in trace.meta["sequences"]] == [0, 1, 2]
    assert sorted(trace.steps.seq_id.unique()) == [0, 1, 2] and not parts_path(out).exists()


def test_validate_without_cuda_is_an_error_line(work):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _, err = assert_refused(["validate", "--device", "cuda"])
    assert "no CUDA device" in err


def test_the_cli_bounds_are_the_simulators():
    from tiersim.cli import groups
    from tiersim.simulator import capacity

    assert (groups.MAX_TOKENS, groups.MAX_STEPS) == (capacity.MAX_TOKENS, capacity.MAX_STEPS)


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--warmup", "0"), ("--budget-s", "nan"),
                                         ("--prefill", "maybe"), ("--batch", "0,8"), ("--hbm", "0.5,2")])
def test_both_front_ends_refuse_a_value_out_of_its_declared_range_in_the_same_words(capsys, flag, value):
    from tiersim.validator.__main__ import parser

    with pytest.raises(SystemExit) as exc:
        parser().parse_args([flag, value])
    assert exc.value.code == 2
    argparse_words = capsys.readouterr().err.strip().splitlines()[-1]
    _, err = assert_refused(["validate", "--device", "cpu", flag, value])
    cli_words = err.strip().removeprefix("error: ")
    assert flag in cli_words and cli_words.split(flag, 1)[1].lstrip(": ") in argparse_words, (cli_words, argparse_words)

"""Generated bad input over every command the app registers (issue 26): no traceback, no silent accept.

The commands and their options are read from the typer app (``cli.options.describe``), so a command
added later is covered by the generic cases without a line here. Each case runs the real entry point
in-process (``cli_run.invoke``) with one bad value on top of the quick valid arguments the command
declares (``command(example=...)``): the bad value is the only reason to refuse, and the run must end
with exit 2 and one ``error:`` line, before any work. test_bad_inputs_fields.py varies what valid files
hold; test_bad_inputs_named.py has the cases the issue named.

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
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_run import assert_refused, example, invoke

from tiersim.cli.main import app
from tiersim.cli.options import describe
from tiersim.traces import default_trace_path

REPO = Path(__file__).resolve().parent.parent
GOOD_CONFIG = {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2,
               "head_dim": 32, "intermediate_size": 512, "vocab_size": 1000}
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _fuzzable(spec) -> bool:
    if spec.kind in (int, float):
        return True
    return spec.kind is str and bool(spec.bounds.choices)


def _takes_json(specs) -> bool:
    return any(s.flag == "--format" and s.bounds.choices and "json" in s.bounds.choices for s in specs)


def _specs(callback) -> list:
    return [s for s in describe(callback) if s.flag != "--wide"]


def collect(typer_app) -> SimpleNamespace:
    """Every case this file generates for the commands ``typer_app`` registers: read from their
    declarations (``cli.options.describe``, ``command(example=...)``), so a command or option another
    module adds is in these lists without a line here (``test_a_command_added_later_is_covered``)."""
    commands = {(i.name or i.callback.__name__).replace("_", "-"): i.callback for i in typer_app.registered_commands}
    specs = {name: _specs(cb) for name, cb in commands.items()}
    c = SimpleNamespace(commands=commands, specs=specs)
    c.cases = [(name, s) for name in commands for s in specs[name] if _fuzzable(s)]
    c.inputs = [(name, s) for name in commands for s in specs[name] if s.input]
    c.outputs = [(name, s) for name in commands for s in specs[name] if s.output is not None]
    c.same = [(name, o, i) for name, o in c.outputs for i in specs[name] if i.input]
    # Runs to the end with a full disk: every output of every command whose example is quick.
    c.writes = [(name, s) for name, s in c.outputs if example(commands[name]) is not None
                and not getattr(commands[name], "tiersim_loads_model", False)]
    return c


ALL = collect(app)
COMMANDS, SPECS = ALL.commands, ALL.specs


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
    shutil.copy(REPO / "docs" / "quality-grid-smollm2.json", folder / "quality-grid.json")
    cwd = os.getcwd()
    os.chdir(folder)
    yield folder
    os.chdir(cwd)


#: A valid file for each input option known here, so "the output is this input" is the only fault; an
#: input option added later gets a placeholder file (the sameness is refused before anything reads it).
VALID_INPUT = {"--trace": "trace.parquet", "INPUT": "capacity.json", "--model-config": "config.json",
               "--prompts": "prompts.jsonl", "--calibration": "calibration.json", "--against": "calibration.json",
               "--compare": "calibration.json", "--profile": "profile.json", "--requests-file": "requests.csv"}


def base_args(command: str, without=None, commands=None) -> list[str]:
    """The command's declared example (empty where it declares none), less the option or the
    positional arguments (an example gives them first) that ``without`` (a spec) is about to replace."""
    args = example((commands or COMMANDS)[command]) or []
    if without is None:
        return args
    if without.argument:
        first = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
        return args[first:]
    if without.flag in args:
        i = args.index(without.flag)
        takes_value = without.kind is not bool
        return args[:i] + args[i + 1 + takes_value:]
    return args



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


def _bad_value(data, spec) -> str:
    if spec.kind is str:
        return data.draw(st.text(min_size=1, max_size=8).filter(
            lambda s: s not in spec.bounds.choices and not s.startswith("-") and s.strip() == s and s))
    return data.draw(_number_cases(spec))


def check_bad_value(command, spec, value, commands=None) -> None:
    _, err = assert_refused([command, *base_args(command, commands=commands), spec.flag, value])
    assert spec.flag in err or "--" not in value and value == "", err  # the option is named


CASES = ALL.cases


def test_every_command_goes_through_the_checks():
    assert all(getattr(callback, "tiersim_options", None) is not None for callback in COMMANDS.values())


def test_every_command_has_cases_and_every_option_help():
    assert {"simulate", "capacity", "synth", "report", "capture", "grid", "validate", "presets"} <= set(COMMANDS)
    assert len(CASES) >= 50  # (command, option) pairs with a type or range to break
    for command, callback in COMMANDS.items():
        missing = [s.flag for s in SPECS[command] if not s.argument and not _help(callback, s.name)]
        assert not missing, f"{command}: no help for {missing}"


def test_every_command_declares_a_quick_example_that_runs():
    """What the write and width cases run: a command without one would only be checked on refusals."""
    missing = [name for name, callback in COMMANDS.items() if example(callback) is None]
    assert not missing, f"declare options.command(example=[...]) for {missing}"


def _help(callback, name: str) -> str | None:
    import inspect

    default = inspect.signature(callback).parameters[name].default
    return getattr(default, "help", None)


@settings(max_examples=400, **SETTINGS)
@given(data=st.data())
def test_bad_option_values_are_refused_by_name(work, data):
    command, spec = data.draw(st.sampled_from(CASES))
    check_bad_value(command, spec, _bad_value(data, spec))


# -- input files: missing, a directory, empty, garbage ----------------------------------------------------------
INPUTS = ALL.inputs


def _input_args(command, spec, path, commands=None) -> list[str]:
    args = [command, *base_args(command, without=spec, commands=commands)]
    return args + ([str(path)] if spec.argument else [spec.flag, str(path)])


def check_unreadable_input(work, command, spec, kind, commands=None) -> None:
    path = work / f"in-{kind}-{command}-{spec.name}.json"
    if kind == "directory":
        path.mkdir(exist_ok=True)
    elif kind == "empty":
        path.write_bytes(b"")
    _, err = assert_refused(_input_args(command, spec, path, commands))
    if kind != "empty":  # the one input check names the option (an empty file is its reader's to refuse)
        assert spec.flag in err and ("not found" if kind == "missing" else "is a directory") in err, err


@pytest.mark.parametrize("kind", ["missing", "directory", "empty"])
@pytest.mark.parametrize("command, spec", INPUTS, ids=[f"{c}{s.flag}" for c, s in INPUTS])
def test_unreadable_input_files_are_refused(work, command, spec, kind):
    check_unreadable_input(work, command, spec, kind)


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_garbage_input_files_are_refused(work, data):
    command, spec = data.draw(st.sampled_from(INPUTS))
    path = work / f"garbage-{command}-{spec.name}.json"
    path.write_bytes(data.draw(st.binary(min_size=1, max_size=64).filter(lambda b: b.strip(b"\n\r\t ") != b"")))
    assert_refused(_input_args(command, spec, path))


# -- output targets -----------------------------------------------------------------------------------------------
OUTPUTS = ALL.outputs
TARGETS = ["directory", "missing-folder", "wrong-suffix", "read-only"]


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


def check_unusable_output(work, readonly, command, spec, kind, commands=None) -> None:
    target = _target(kind, spec, work, readonly)
    _, err = assert_refused([command, *base_args(command, commands=commands), spec.flag, str(target)])
    assert spec.flag in err, err


@pytest.mark.parametrize("kind", TARGETS)
@pytest.mark.parametrize("command, spec", OUTPUTS, ids=[f"{c}{s.flag}" for c, s in OUTPUTS])
def test_unusable_outputs_are_refused_before_work(work, readonly, command, spec, kind):
    if kind == "wrong-suffix" and not spec.output:
        pytest.skip(f"{command} {spec.flag} declares no suffix")
    check_unusable_output(work, readonly, command, spec, kind)


SAME = ALL.same


def check_same_file(work, command, out, inp, commands=None) -> None:
    shared = work / f"shared-{command}-{inp.flag.strip('-')}{out.output[0] if out.output else '.out'}"
    if inp.flag in VALID_INPUT:  # a valid input: being the output is the only fault
        shutil.copy(work / VALID_INPUT[inp.flag], shared)
    else:
        shared.write_text("an input of a kind this file does not know\n")
    before = shared.read_bytes()
    args = [command, *base_args(command, without=inp, commands=commands)]
    args += [str(shared)] if inp.argument else [inp.flag, str(shared)]
    _, err = assert_refused([*args, out.flag, str(shared)])
    assert "overwrite its own input" in err and shared.read_bytes() == before


@pytest.mark.parametrize("command, out, inp", SAME, ids=[f"{c}{o.flag}={i.flag}" for c, o, i in SAME])
def test_an_output_may_not_be_an_input_of_the_same_run(work, command, out, inp):
    check_same_file(work, command, out, inp)


# -- full disks: a real small tmpfs where it can be mounted, a fake ENOSPC everywhere -------------------------------
WRITES = ALL.writes


def check_failed_write(work, monkeypatch, command, spec, commands=None) -> None:
    """The fake full disk: every atomic rename into the output folder fails with ENOSPC, after the work;
    a command with ``--format json`` must still print its document."""
    import tiersim.atomic

    replace = os.replace

    def full(src, dst, *a, **k):  # the disk holding the outputs is full; the temporary folder is not
        if Path(dst).parent == work:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return replace(src, dst, *a, **k)

    monkeypatch.setattr(tiersim.atomic.os, "replace", full)
    json_out = _takes_json(_specs((commands or COMMANDS)[command]))
    target = work / f"full-{command}{spec.flag}{spec.output[0] if spec.output else '.out'}"
    args = [command, *base_args(command, commands=commands), *(["--format", "json"] if json_out else [])]
    out, err = assert_refused([*args, spec.flag, str(target)], before_work=False)
    assert "ENOSPC" in err and str(target) in err
    assert not target.exists() and not list(work.glob(f".{target.name}.*"))  # no half file, no temporary left
    if json_out:
        json.loads(out)  # the computed result reached stdout


@pytest.mark.parametrize("command, spec", WRITES, ids=[f"{c}{s.flag}" for c, s in WRITES])
def test_a_failed_write_is_one_line_and_the_json_still_arrives(work, monkeypatch, command, spec):
    check_failed_write(work, monkeypatch, command, spec)


def test_every_quick_command_output_is_written_to_a_full_disk():
    assert {("simulate", "--out"), ("simulate", "--report"), ("capacity", "--out"), ("capacity", "--report"),
            ("synth", "--out"), ("report", "--out"), ("validate", "--out")} <= {(c, s.flag) for c, s in WRITES}


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
    assert err.strip().endswith(f"cannot write {tiny_disk / 't.parquet'}: No space left on device (ENOSPC)"), err
    json.loads(out)
    _, err = assert_refused(["synth", "--n", "4", "--lengths", "2000", "--out", str(tiny_disk / "s.parquet")],
                            before_work=False)  # pyarrow's own words ("Detail: [errno 28] ...") read as the errno
    assert err.strip().endswith(f"cannot write {tiny_disk / 's.parquet'}: No space left on device (ENOSPC)"), err
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler"]


# -- a command another lane adds later is covered by its declaration alone ---------------------------------------
def _probe_app():
    """A command as a new module would add it (an input file, a number with a range, a choice, an output,
    ``--format json``), registered on its own app so this file's lists can be built for it."""
    import typer

    from tiersim.atomic import write_json
    from tiersim.cli import options
    from tiersim.cli.app import deliver

    probe = typer.Typer()

    @probe.command(name="probe")
    @options.command(outputs={"out": (".json",)}, example=["--qps", "2"])
    def probe_command(
        qps: float = options.opt(1.0, help="requests per second", min=0.01, max=1e6),
        requests: Path = typer.Option(None, help="request file"),
        executor: str = options.opt("eager", help="eager or graph", choices=("eager", "graph")),
        fmt: str = options.opt("table", "--format", help="table or json", choices=("table", "json")),
        out: Path = typer.Option(Path("probe.json"), help="result file"),
    ) -> None:
        document = {"qps": qps, "executor": executor}
        deliver(document if fmt == "json" else None, [(out, lambda: write_json(out, document))])

    return probe


def test_a_command_added_later_is_covered(work, readonly, monkeypatch):
    probe = _probe_app()
    found = collect(probe)
    flags = lambda pairs: {s.flag for _, s in pairs}  # noqa: E731
    assert flags(found.cases) == {"--qps", "--executor", "--format"} and flags(found.inputs) == {"--requests"}
    assert flags(found.outputs) == flags(found.writes) == {"--out"} and len(found.same) == 1
    # ... and the same checks hold for it, through the real entry point.
    monkeypatch.setattr(app, "registered_commands", [*app.registered_commands, *probe.registered_commands])
    commands = found.commands
    by_flag = {s.flag: s for s in found.specs["probe"]}
    for value in ("0", "nan", "1e7", "x"):
        check_bad_value("probe", by_flag["--qps"], value, commands)
    check_bad_value("probe", by_flag["--executor"], "jit", commands)
    for kind in ("missing", "directory"):
        check_unreadable_input(work, "probe", by_flag["--requests"], kind, commands)
    for kind in TARGETS:
        check_unusable_output(work, readonly, "probe", by_flag["--out"], kind, commands)
    check_same_file(work, "probe", by_flag["--out"], by_flag["--requests"], commands)
    check_failed_write(work, monkeypatch, "probe", by_flag["--out"], commands)

"""The cases issue 26 named, each as the issue's walk-through met it: silently wrong answers, unbounded
work, unclear words, Ctrl-C and resume, and the two front ends' shared ranges (the generated cases over
every command are in test_bad_inputs_generated.py, whose fixtures and helpers these use)."""

from __future__ import annotations

import inspect
import json

import pytest

from cli_run import assert_refused, invoke
from test_bad_inputs_generated import ALL, GOOD_CONFIG, check_bad_value, work  # noqa: F401  (work: the fixture)

from tiersim.errors import TiersimError
from tiersim.traces import default_trace_path


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


@pytest.mark.parametrize("command", [["simulate"], ["capacity"]])
def test_no_host_floor_without_a_profile_is_refused(command):
    """--no-host-floor drops the profile's host time; without --profile it was accepted and changed nothing."""
    _, err = assert_refused([*command, "--batch", "2", "--steps", "2", "--no-host-floor"])
    assert "applies with --profile only" in err


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


@pytest.mark.parametrize("args, refused", [
    (["--max-new-tokens", "1000000"], "lower --max-new-tokens or --n"),  # 16 GB of recorded rows
    (["--max-new-tokens", "8192", "--full"], "or leave out --full"),  # ~2.5e8 attention entries
    (["--max-new-tokens", "128", "--n", "2"], None),  # the default size: a few MB
])
def test_capture_bounds_follow_the_memory_available(work, monkeypatch, args, refused):
    """Before its first token a capture estimates what it will hold (the recorded rows, the KV cache,
    the merged trace; tiersim.traces.capture.check_fits) against the memory available: 8 GB here."""
    import tiersim.models
    import tiersim.options
    import tiersim.traces.capture

    shape = {"num_layers": 30, "kv_bytes_per_token": 30 * 2 * 3 * 64 * 2}  # SmolLM2-135M
    ran = []
    monkeypatch.setattr(tiersim.options, "available_memory", lambda: 8 * 10**9)
    monkeypatch.setattr(tiersim.models, "load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(tiersim.models, "check_context_without_weights", lambda *a, **k: None)  # reads the model
    monkeypatch.setattr(tiersim.models, "describe_model", lambda model: shape)
    monkeypatch.setattr(tiersim.traces.capture, "capture", lambda *a, **k: ran.append(1) or _stop())
    command = ["capture", *args, "--out", str(work / "bounded.parquet"), "--no-resume"]
    if refused:
        _, err = assert_refused(command)
        assert refused in err and "available" in err and not ran
    else:
        code, _, err = invoke(command)
        assert ran and "boom" in err  # past the check: the (stubbed) generation ran


def _stop():
    raise TiersimError("boom")


def test_an_out_name_that_leaves_no_room_for_its_sidecar_is_refused_before_any_run(tmp_path):
    """--out of 250 bytes passes its own check, but OUT.runs.jsonl / OUT.parts do not fit NAME_MAX: the first
    finished run or sequence failed with ENAMETOOLONG."""
    from tiersim.quality.journal import RunJournal, journal_path
    from tiersim.traces.resume import CaptureParts

    out = tmp_path / ("x" * 242 + ".parquet")
    with pytest.raises(TiersimError, match="give --out a shorter name"):
        RunJournal(journal_path(out), {})
    with pytest.raises(TiersimError, match="give --out a shorter name"):
        CaptureParts(out, {"model": "x"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("resume", [True, False])
def test_a_file_where_the_capture_keeps_its_parts_is_refused(tmp_path, resume):
    """OUT.parts as a regular file: rmtree could not clear it and the first finished sequence failed after
    its generation ('File exists'); now one line before any sequence runs, and the file is left alone."""
    from tiersim.traces.resume import CaptureParts, parts_path

    out = tmp_path / "trace.parquet"
    parts_path(out).write_text("mine")
    with pytest.raises(TiersimError, match="which is a file, not a folder"):
        CaptureParts(out, {"model": "x"}, resume=resume)
    assert parts_path(out).read_text() == "mine"


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
    monkeypatch.setattr(tiersim.models, "check_context_without_weights", lambda *a, **k: None)  # reads the model
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


@pytest.mark.parametrize("device", ["", "   "])
def test_an_empty_device_is_refused_not_taken_as_cuda(work, capsys, device):
    """`--device ""` (an unset `$DEV`) was read as the default, cuda: on a GPU machine it measured, and here it
    said 'no CUDA device'; either front end now names the accepted values before any work."""
    from tiersim.validator.__main__ import main

    _, err = assert_refused(["validate", "--device", device])
    assert "--device must be 'cuda', 'cuda:N' or 'cpu'" in err and "CUDA device" not in err
    assert main(["--device", device]) == 2
    err = capsys.readouterr().err
    assert "error: --device must be 'cuda', 'cuda:N' or 'cpu'" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["grid", "capture"])
@pytest.mark.parametrize("device", ["", "   "])
def test_an_empty_device_is_refused_by_the_real_model_commands_too(work, command, device):
    """grid and capture run on cpu or cuda only: an empty --device (an unset `$DEV`) is their choices' line
    before any model loads, never the default cpu run nor a CUDA probe."""
    _, err = assert_refused([command, "--device", device])
    assert f"--device must be one of cpu, cuda, got {device!r}" in err and "CUDA device" not in err


def test_the_cli_bounds_are_the_simulators():
    from tiersim.cli import groups
    from tiersim.simulator import capacity

    from tiersim.simulator import fastpath, presets

    assert (groups.MAX_TOKENS, groups.MAX_STEPS) == (capacity.MAX_TOKENS, capacity.MAX_STEPS)
    assert groups.HOST_OVERHEADS == tuple(presets.HOST_OVERHEADS) and groups.ENGINES == fastpath.ENGINES


def test_the_cli_engine_presets_are_the_data_files():
    """--engine-overhead's choices (simulate, capacity, serve) are every preset of public-engine-overheads.json."""
    from tiersim.cli import groups
    from tiersim.simulator import engines

    assert sorted(groups.ENGINE_OVERHEADS) == sorted(engines.names())


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


# -- found by the session's review: options that were dropped without a word -----------------------------------
def test_validate_compare_refuses_an_out_it_would_not_write(work):
    calibration = work / "calibration.json"
    _, err = assert_refused(["validate", "--compare", str(calibration), "--out", str(work / "other.json")])
    assert f"--out {work / 'other.json'} is for a new run" in err and not (work / "other.json").exists()


def test_validate_compare_names_every_option_it_would_drop_at_once(work, capsys):
    """One check covers every option beside --compare, a strategy option and a grid option alike, and names them
    all in its one line, so the user fixes the command once (the strategy check ran first and alone, naming
    only --strategy, then the grid's check would refuse --batch on the next try)."""
    from tiersim.validator.__main__ import main

    calibration = str(work / "calibration.json")
    args = ["--compare", calibration, "--batch", "4", "--strategy", "hybrid", "--fetch-share", "0.25"]
    words = "--batch 4, --strategy hybrid and --fetch-share 0.25 are for a new run; --compare only prints"
    _, err = assert_refused(["validate", *args])
    assert words in err and "drop them or --compare" in err
    assert main(args) == 2
    assert f"error: {words}" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--batch", "4"], ["--device", "cpu"], ["--executor", "graph"], ["--steps", "3"],
                                  ["--context", "512"], ["--model-shape", "tiny"]])
def test_validate_compare_refuses_a_run_option_it_would_drop(work, args, capsys):
    """--compare prints a calibration already measured: a grid or device option beside it changed nothing
    without a word (both front ends; the same value as the default is not refused)."""
    from tiersim.validator.__main__ import main

    calibration = str(work / "calibration.json")
    _, err = assert_refused(["validate", "--compare", calibration, *args])
    assert f"{args[0]} {args[1]} is for a new run; --compare only prints" in err
    assert main(["--compare", calibration, *args]) == 2
    assert f"error: {args[0]} {args[1]} is for a new run" in capsys.readouterr().err
    assert invoke(["validate", "--compare", calibration, "--batch", "1,8,32", "--device", "cuda"])[0] == 0


@pytest.mark.parametrize("text", ["1,,2", ",2"])
def test_an_empty_item_inside_a_list_option_is_refused(text):
    from tiersim.options import parse_list

    with pytest.raises(TiersimError, match="an empty item"):
        parse_list(text, int, "--batch")
    assert parse_list("1,2,", int, "--batch") == [1, 2]


# -- hostile probes: an empty text where leaving the option out means the default ----------------------------------
UNSET_TEXTS = [(name, s) for name, specs in ALL.specs.items() for s in specs
               if s.kind is str and not s.argument and s.bounds.choices is None
               and getattr(inspect.signature(ALL.commands[name]).parameters[s.name].default, "default", ...) is None]


@pytest.mark.parametrize("command, spec", UNSET_TEXTS, ids=[f"{c}{s.flag}" for c, s in UNSET_TEXTS])
def test_an_empty_text_is_refused_not_read_as_unset(work, command, spec):
    """``--lengths ""`` ran math500 in silence (serve, simulate, capacity), ``--title ""`` drew the default title."""
    check_bad_value(command, spec, "")


def test_the_empty_text_cases_include_the_ones_found():
    assert {("serve", "--lengths"), ("simulate", "--lengths"), ("capacity", "--lengths"),
            ("report", "--title")} <= {(c, s.flag) for c, s in UNSET_TEXTS}


# -- found by the review of issue 22/23's changes: a point field the --compare text formats ---------------------
def _edited(work, edit) -> str:
    doc = json.loads((work / "calibration.json").read_text())
    edit(doc)
    path = work / "edited-calibration.json"
    path.write_text(json.dumps(doc))
    return str(path)


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["points"][0].update(fetch_share="half", strategy="hybrid"), "points[0].fetch_share must be a number"),
    (lambda d: d["points"][1].update(host_ms="fast", strategy="host-attention"), "points[1].host_ms must be a number"),
    (lambda d: d["points"][0].update(strategy=["hybrid"]), "points[0].strategy must be text"),
    (lambda d: d.setdefault("settings", {}).update(strategy_check="hybrid"), "settings.strategy_check must be a list of names"),
    (lambda d: d.update(error={"why": 1}), "error must be text"),
])
def test_validate_compare_refuses_a_field_it_would_print_wrong_in_one_line(work, capsys, edit, words):
    """``--compare`` formats each point's numbers (``{:g}``, ``{:.3f}``) and words: a hand-edited value of another type
    in a field the graph executor added (a point's strategy and fetched share, the strategy check, a stopped run's
    error) was a ValueError traceback from ``python -m tiersim.validator`` and 'Unknown format code' from ``tiersim
    validate``; the file's reader (``fileformat.SHAPES``) names the field, as it does the older ones."""
    from tiersim.validator.__main__ import main

    path = _edited(work, edit)
    _, err = assert_refused(["validate", "--compare", path])
    assert words in err
    assert main(["--compare", path]) == 2
    assert words in capsys.readouterr().err


def test_every_shipped_calibration_file_still_prints():
    """The checks refuse no file the validator wrote: each shipped measurement prints."""
    from pathlib import Path

    from tiersim.validator import compare

    files = [p for p in sorted((Path(__file__).resolve().parent.parent / "docs" / "validation").glob("*.json"))
             if json.loads(p.read_text()).get("kind") == "calibration"]
    assert files
    for path in files:
        assert compare.format_text(compare.load(path)), path

"""`simulate --against` reads measured points from a file a user or another machine wrote: every field it
turns into work or a figure is checked first (found in review: a NaN or negative measured time was compared
and printed as an error of +nan%, batch 0 was a numpy traceback, steps 1e9 ran the machine out of memory)."""

from __future__ import annotations

import copy
import json

import pytest

from tiersim.errors import TiersimError
from tiersim.simulator.against import load_measurements

GOOD = {"kind": "calibration", "schema_version": 1, "executor": "cuda-graph",
        "device": {"name": "NVIDIA H100 80GB HBM3"}, "gpu_preset": "h100-sxm",
        "model_shape": {"name": "r1-distill-qwen-7b"}, "settings": {"steps": 8, "warmup": 2},
        "points": [{"batch": 1, "context": 2048, "hbm": 0.5, "measured_step_ms": 9.5}]}


def _write(tmp_path, doc):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(doc))
    return path


def _with(where: str, key: str, value):
    doc = copy.deepcopy(GOOD)
    (doc["points"][0] if where == "point" else doc["settings"])[key] = value
    return doc


def test_a_good_point_reads(tmp_path):
    _, points = load_measurements(_write(tmp_path, GOOD))
    assert points == [{"model": "r1-distill-qwen-7b", "batch": 1, "context": 2050, "hbm": 0.5, "compressed": 0.0,
                       "measured_ms": 9.5, "steps": 8, "label": "tiered"}]


@pytest.mark.parametrize("where,key,value", [
    ("point", "measured_step_ms", float("nan")), ("point", "measured_step_ms", float("inf")),
    ("point", "measured_step_ms", -5.0), ("point", "measured_step_ms", "abc"),
    ("point", "measured_step_ms", 1e-30),  # an error of +6e32% was printed as a result
    ("point", "batch", 0), ("point", "batch", -1), ("point", "batch", 1.5), ("point", "batch", 10**9),
    ("point", "context", -3), ("point", "context", 10**12), ("point", "context", 2.5),
    ("point", "hbm", 2.0), ("point", "hbm", float("nan")), ("point", "hbm", -0.1), ("point", "hbm", "x"),
    ("point", "compressed", 0.6), ("point", "compressed", -0.1), ("point", "compressed", "x"),  # hbm 0.5: at most 0.5
    ("settings", "steps", 10**9), ("settings", "steps", 0), ("settings", "warmup", -1),
    ("settings", "warmup", 10**12),
])
def test_a_bad_field_is_one_line_naming_the_file_and_the_field(tmp_path, where, key, value):
    path = _write(tmp_path, _with(where, key, value))
    with pytest.raises(TiersimError) as info:
        load_measurements(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and ("measured_step_ms" if key == "measured_step_ms"
                                                              else key) in message, message


def test_an_operator_profile_run_is_checked_the_same_way(tmp_path):
    doc = {"kind": "operator-profile", "schema_version": 1, "settings": {"decode_warmup": 3},
           "models": {"r1-distill-qwen-7b": {"decode": [
               {"cache": "dynamic", "batch": 0, "context": 2048, "hbm": 1.0, "step_ms": 30.0, "steps": 10}]}}}
    path = _write(tmp_path, doc)
    with pytest.raises(TiersimError, match="batch"):
        load_measurements(path)


def test_the_module_entry_point_exits_2_on_a_bad_point(tmp_path, capsys):
    from tiersim.simulator.against import main

    assert main([str(_write(tmp_path, _with("point", "batch", 0)))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "batch" in err[0]


def test_a_shape_with_no_preset_is_told_the_way_that_prices_it(tmp_path):
    """A CPU smoke calibration is of the validator's ``tiny`` shape, which no --model names: the error must not
    send the user to --model (found in review: 'choose it with --model', then 'unknown model preset tiny')."""
    from tiersim.simulator.against import compare
    from tiersim.simulator.scenario import assemble

    doc = copy.deepcopy(GOOD)
    doc["model_shape"] = {"name": "tiny"}
    _, points = load_measurements(_write(tmp_path, doc))
    with pytest.raises(TiersimError) as info:
        compare(assemble(1, engine="fast"), points)
    assert "python -m tiersim.simulator.against" in str(info.value) and "--model" not in str(info.value)
    doc["model_shape"] = {"name": "qwen3-8b"}
    _, points = load_measurements(_write(tmp_path, doc))
    with pytest.raises(TiersimError, match="choose it with --model"):
        compare(assemble(1, engine="fast"), points)


def test_validator_compare_refuses_an_out_it_would_not_write(tmp_path, capsys):
    """``--compare FILE`` prints a calibration already written; an ``--out`` (or ``--profile``) beside it belongs
    to a new run that does not happen (found in review: exit 0 and no file written, without a word)."""
    from tiersim.validator.__main__ import main

    cal = _write(tmp_path, GOOD)
    assert main(["--compare", str(cal)]) == 0
    capsys.readouterr()
    for extra in (["--out", str(tmp_path / "other.json")], ["--profile", str(cal)]):
        assert main(["--compare", str(cal), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and extra[0] in err[0]
    assert not (tmp_path / "other.json").exists()


@pytest.mark.parametrize("strategy", ["prefetch", "host-attention", "hybrid", "selective", "recompute"])
def test_against_and_the_validator_read_a_point_s_fetch_share_by_one_rule(tmp_path, strategy):
    """A measured point's recorded ``fetch_share`` is that strategy's own knob only where the strategy takes one
    (hybrid, selective); ``simulate --against`` and the validator's predictions read it by the one rule
    (``strategies.own_share``), so they price the same point the same way. They disagreed: --against kept
    hybrid's alone and priced a selective point at 0.25 as if it fetched everything, while the validator kept
    selective's. The share priced is the simulator's: hybrid's the part on the host, selective's the part fetched."""
    from tiersim.simulator.against import compare
    from tiersim.simulator.scenario import assemble
    from tiersim.validator.predict import tier_options

    doc = _with("point", "strategy", strategy)
    doc["points"][0]["fetch_share"] = 0.25
    _, [point] = load_measurements(_write(tmp_path, doc))
    kept = "fetch_share" in tier_options({"strategy": strategy, "fetch_share": 0.25})
    assert (point.get("fetch_share") == 0.25) == kept == (strategy in ("hybrid", "selective"))
    assert point.get("share") == {"hybrid": 0.75, "selective": 0.25}.get(strategy)
    if strategy == "selective":  # the share moves the price: a quarter fetched is not the whole DDR tier
        scenario = assemble(1, model="r1-distill-qwen-7b", gpu="h100-sxm", engine="fast")
        whole = {**point, "fetch_share": 1.0, "share": 1.0}
        quarter, full = (r["simulated_ms"] for r in compare(scenario, [point, whole])["rows"])
        assert quarter < full


SMOKE = {**GOOD, "device": {"name": "cpu"}, "model_shape": {
    "name": "tiny", "architecture": "qwen2", "num_layers": 2, "hidden_size": 64, "intermediate_size": 128,
    "num_attention_heads": 4, "num_kv_heads": 2, "head_dim": 16, "vocab_size": 256, "tie_word_embeddings": False,
    "rope_theta": 10000.0, "kv_bytes_per_token": 512}}


def test_the_file_s_own_shape_is_the_one_the_validator_wrote(tmp_path, capsys):
    """The record the validator writes (``Shape.to_dict``) reads back as that shape and is priced."""
    from tiersim.shapes import TINY, ModelShape
    from tiersim.simulator.against import main
    from tiersim.validator.shapes import SHAPES

    assert ModelShape.from_record(SHAPES["tiny"].to_dict(), where="test") == TINY
    assert main([str(_write(tmp_path, SMOKE))]) == 0
    assert "median |error|" in capsys.readouterr().out


@pytest.mark.parametrize("change", [{"hidden_size": None}, {"num_layers": 0}, {"num_kv_heads": 3},
                                    {"head_dim": "16"}, {"name": 7}, {"params": -1}])
def test_a_bad_stored_shape_is_one_line_not_a_traceback(tmp_path, capsys, change):
    """Found in review: the shape was built unchecked, ``ModelShape(**record)``: a missing field was a TypeError
    traceback and zero layers a ZeroDivisionError."""
    from tiersim.simulator.against import main

    doc = copy.deepcopy(SMOKE)
    doc["model_shape"].update(change)
    if doc["model_shape"]["hidden_size"] is None:
        del doc["model_shape"]["hidden_size"]
    assert main([str(_write(tmp_path, doc))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --against: ") and "model" in err[0]


def test_a_point_s_model_that_is_not_a_name_is_one_line(tmp_path, capsys):
    """Found in review: a point's ``model_shape`` object reached ``model in MODELS``: TypeError, unhashable dict."""
    from tiersim.simulator.against import main

    doc = copy.deepcopy(GOOD)
    del doc["model_shape"]
    doc["points"][0]["model_shape"] = {"name": "tiny"}
    with pytest.raises(TiersimError, match="point 1's model must be a model's name"):
        load_measurements(_write(tmp_path, doc))
    assert main([str(_write(tmp_path, doc))]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_file_without_a_preset_is_priced_on_its_measured_device(tmp_path, capsys):
    """Found in review: with no ``gpu_preset`` the module priced every file on an H100, an A100's measurement too."""
    from tiersim.simulator.against import main

    doc = {"kind": "operator-profile", "schema_version": 1, "device": {"name": "NVIDIA A100-SXM4-80GB"},
           "settings": {"decode_warmup": 3}, "models": {"r1-distill-qwen-7b": {"decode": [
               {"cache": "dynamic", "batch": 1, "context": 2048, "hbm": 1.0, "step_ms": 30.0, "steps": 10}]}}}
    assert main([str(_write(tmp_path, doc))]) == 0
    assert capsys.readouterr().out.startswith("r1-distill-qwen-7b on a100-80g:")

"""A calibration file is another machine's output: every field `--calibration` turns into a GPU preset is
checked first, in one line naming the file (found in review: a NaN or 1e-300 bandwidth gave NaN step times
with exit 0, `true` was read as 1 GB/s, a non-object device/link/compute section was an AttributeError)."""

from __future__ import annotations

import copy
import json
import math

import pytest
from typer.testing import CliRunner

from tiersim.errors import TiersimError
from tiersim.simulator.calibration import apply_calibration, load_calibration
from tiersim.simulator.presets import get_gpu

GOOD = {"kind": "calibration", "schema_version": 1, "executor": "cuda-graph",
        "device": {"name": "NVIDIA H100 80GB HBM3"}, "gpu_preset": "h100-sxm",
        "model_shape": {"name": "r1-distill-qwen-7b"}, "settings": {"steps": 8, "warmup": 2},
        "link": {"h2d_gbps": 52.0, "d2h_gbps": 51.0, "bidir_total_gbps": 90.0, "copy_latency_us": 17.0},
        "compute": {"hbm_bw_gbps": 2900.0, "peak_tflops": 700.0, "layer_overhead_us": 40.0},
        "points": [{"batch": 1, "context": 2048, "hbm": 0.5, "measured_step_ms": 9.5}]}


def _write(tmp_path, doc):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(doc))
    return path


def test_a_good_calibration_applies(tmp_path):
    gpu = apply_calibration(get_gpu("h100-sxm"), load_calibration(_write(tmp_path, GOOD)))
    assert gpu.h2d_bw == 52e9 and gpu.hbm_bw == 2900e9 and "NVIDIA H100" in gpu.name


@pytest.mark.parametrize("section,key,value", [
    ("link", "h2d_gbps", float("nan")), ("link", "h2d_gbps", float("inf")), ("link", "h2d_gbps", True),
    ("link", "d2h_gbps", 1e308), ("link", "bidir_total_gbps", "fast"), ("link", "copy_latency_us", -1.0),
    ("compute", "hbm_bw_gbps", 1e-300), ("compute", "peak_tflops", float("nan")),
    ("compute", "layer_overhead_us", float("inf")),
])
def test_a_bad_number_is_one_line_naming_the_file_and_the_field(tmp_path, section, key, value):
    doc = copy.deepcopy(GOOD)
    doc[section][key] = value
    path = _write(tmp_path, doc)
    with pytest.raises(TiersimError) as info:
        apply_calibration(get_gpu("h100-sxm"), load_calibration(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and key in message, message


@pytest.mark.parametrize("field,value", [("device", "H100"), ("link", [1]), ("compute", "x"), ("settings", 3),
                                         ("model_shape", "tiny"), ("executor", 7), ("gpu_preset", {"a": 1})])
def test_a_section_of_the_wrong_type_is_one_line(tmp_path, field, value):
    doc = copy.deepcopy(GOOD)
    doc[field] = value
    path = _write(tmp_path, doc)
    with pytest.raises(TiersimError) as info:
        load_calibration(path)
    assert str(path) in str(info.value) and field in str(info.value)


def test_simulate_with_a_nan_calibration_exits_2_without_a_table(tmp_path):
    from tests.cli_run import invoke

    doc = copy.deepcopy(GOOD)
    doc["link"]["h2d_gbps"] = math.nan
    code, out, err = invoke(["simulate", "--calibration", str(_write(tmp_path, doc)), "--steps", "2",
                             "--batch", "2", "--hbm", "0.5", "--ddr", "0.5"])
    assert code == 2 and out == "" and "h2d_gbps" in err and len(err.strip().splitlines()) == 1, (out, err)


@pytest.mark.parametrize("field,value", [("device", "H100"), ("settings", "x"), ("models", [1])])
def test_an_operator_profile_section_of_the_wrong_type_is_one_line(tmp_path, field, value):
    """--profile and --against read an operator profile's sections with .get: a string device was an
    AttributeError traceback in both (found in review)."""
    from tiersim.simulator.against import load_measurements
    from tiersim.simulator.profile import load_profile

    doc = {"kind": "operator-profile", "schema_version": 1, "device": {"name": "NVIDIA H100 80GB HBM3"},
           "gpu_preset": "h100-sxm", "settings": {}, "models": {}, field: value}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    for load in (load_profile, load_measurements):
        with pytest.raises(TiersimError) as info:
            load(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_calibrated_link_is_measured_not_assumed(tmp_path):
    """A calibration that measured the host link replaces an assumed preset link: the GPU no longer says it is
    assumed, and simulate no longer warns so (found in review: --gpu h200 with an h200 calibration printed
    'the h200 preset's host link ... is an assumption' over the measured 52 GB/s)."""
    from tests.cli_run import invoke

    doc = copy.deepcopy(GOOD)
    doc["gpu_preset"], doc["device"]["name"] = "h100-pcie", "NVIDIA H100 PCIe"
    path = _write(tmp_path, doc)
    assert get_gpu("h100-pcie").link_assumed
    gpu = apply_calibration(get_gpu("h100-pcie"), load_calibration(path))
    assert not gpu.link_assumed and "NVIDIA H100 PCIe" in gpu.link_source and gpu.h2d_bw == 52e9
    code, out, err = invoke(["simulate", "--gpu", "h100-pcie", "--calibration", str(path), "--steps", "2", "--batch",
                             "2", "--format", "json"])
    assert code == 0 and "assumption" not in err, err
    assert json.loads(out)["gpu"]["link_assumed"] is False
    code, _, err = invoke(["simulate", "--gpu", "h100-pcie", "--steps", "2", "--batch", "2", "--format", "json"])
    assert code == 0 and "assumption" in err  # without a calibration the note stays


@pytest.mark.parametrize("batch", ["2", "1..2"])
def test_the_capacity_file_marks_an_assumed_link(batch):
    """Issue 22: an assumed link is marked in the output, not only on stderr (found in review: capacity's JSON,
    grid or batch range, said nothing of it)."""
    from tests.cli_run import invoke

    for gpu, assumed in (("h100-pcie", True), ("h100-sxm", False), ("h200", False)):
        code, out, err = invoke(["capacity", "--gpu", gpu, "--batch", batch, "--steps", "2", "--format", "json"])
        assert code == 0, err
        link = json.loads(out)["gpu_link"]
        assert link["assumed"] is assumed and link["source"].startswith("assumed" if assumed else "measured")

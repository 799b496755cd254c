"""The GPU validator: link fit, shapes, the CPU smoke path end to end, the calibration file, the CLI.

CI has no GPU: everything here runs the ``--device cpu`` smoke mode on the tiny shape (seconds).
The CUDA-only test at the end runs on a GPU machine (`pytest tests/test_validator.py`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tiersim.hierarchy.config import TierConfig, tier_targets
from tiersim.validator.fit import fit_latency_bandwidth


def _runner():
    """typer's CliRunner, imported where used: the GPU machine has no typer, and this file's CUDA tests must still
    be collected there (scripts/gpu_validate.sh, step 1)."""
    from typer.testing import CliRunner

    return CliRunner()


REPO = Path(__file__).resolve().parent.parent
SMOKE = ["--model-shape", "tiny", "--device", "cpu", "--batch", "1,2", "--context", "96,160",
         "--hbm", "1.0,0.5", "--steps", "2", "--warmup", "1"]
FOREIGN = ("simpy", "plotly", "rich", "typer", "click", "pandas", "pyarrow")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One CPU smoke run through `python -m tiersim.validator` in a fresh interpreter.

    Returns (calibration document, path, stdout, modules the run imported from FOREIGN).
    """
    out = tmp_path_factory.mktemp("validate") / "cpu.json"
    code = (
        # what torch and transformers import themselves is not the validator's doing (transformers 5.17 pulls
        # huggingface_hub -> httpx, whose optional CLI imports click and rich where they are installed)
        "import runpy, sys, json\nimport torch, transformers\n_base = set(sys.modules)\n"
        f"sys.argv = ['tiersim.validator', *{SMOKE!r}, '--out', {str(out)!r}]\n"
        "try:\n    runpy.run_module('tiersim.validator', run_name='__main__')\n"
        "except SystemExit as exc:\n    assert not exc.code, exc.code\n"
        f"print('FOREIGN=' + json.dumps(sorted(m for m in {FOREIGN!r} if m in sys.modules and m not in _base)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    foreign = json.loads(proc.stdout.rsplit("FOREIGN=", 1)[1])
    return json.loads(out.read_text()), out, proc.stdout, foreign


# -- the fit -------------------------------------------------------------------------------------
def test_link_fit_recovers_latency_and_bandwidth_from_synthetic_timings():
    rng = np.random.default_rng(7)
    sizes = np.array([4096 * 4**i for i in range(8)], dtype=float)
    for latency, bandwidth in ((5e-6, 50e9), (2e-6, 25e9), (12e-6, 380e9)):
        exact = latency + sizes / bandwidth
        fitted = fit_latency_bandwidth(sizes, exact)
        assert fitted == pytest.approx((latency, bandwidth), rel=1e-6)
        noisy = exact * rng.normal(1.0, 0.02, sizes.size)
        lat, bw = fit_latency_bandwidth(sizes, noisy)
        assert lat == pytest.approx(latency, rel=0.10)
        assert bw == pytest.approx(bandwidth, rel=0.05)


def test_link_fit_keeps_both_terms_non_negative():
    sizes = np.array([1e3, 1e5, 1e7])
    lat, bw = fit_latency_bandwidth(sizes, sizes / 10e9 * np.array([0.7, 1.0, 1.0]))  # a negative intercept
    assert lat == 0.0 and bw > 0
    lat, bw = fit_latency_bandwidth(sizes, np.full(3, 4e-6))  # flat: pure per-call cost
    assert lat == pytest.approx(4e-6) and bw > 0
    with pytest.raises(ValueError):
        fit_latency_bandwidth([4096], [1e-6])


def test_link_summary_reads_each_direction_fit():
    from tiersim.validator.link import DIRECTIONS, SIZES, summarize_link

    truth = {"h2d": (6e-6, 48e9), "d2h": (4e-6, 52e9), "both": (8e-6, 80e9)}
    rows = []
    for size in SIZES:
        for direction in DIRECTIONS:
            lat, bw = truth[direction]
            moved = size * (2 if direction == "both" else 1)
            seconds = lat + moved / bw
            rows.append({"bytes": size, "direction": direction, "seconds": seconds, "gbps": moved / seconds / 1e9})
    link = summarize_link(rows)
    assert link["h2d_gbps"] == pytest.approx(48.0, rel=1e-6)
    assert link["d2h_gbps"] == pytest.approx(52.0, rel=1e-6)
    assert link["copy_latency_us"] == pytest.approx(6.0, rel=1e-6)
    # the shared ceiling is the best both-ways rate observed, below the fit's asymptote
    assert link["bidir_total_gbps"] == pytest.approx(max(r["gbps"] for r in rows if r["direction"] == "both"))
    assert link["bidir_total_gbps"] < 80.0


def test_layer_model_fit_and_its_fallback():
    from tiersim.validator.compute import fit_layer_model

    xs = [3e8, 5e8, 9e8]
    fit = fit_layer_model(xs, [20e-6 + x / 2.5e12 for x in xs], fallback_gbps=1000.0)
    assert fit["hbm_bw_gbps"] == pytest.approx(2500.0, rel=1e-6)
    assert fit["layer_overhead_us"] == pytest.approx(20.0, rel=1e-6)
    one = fit_layer_model([4e8], [4e8 / 1e12 + 10e-6], fallback_gbps=1000.0)
    assert one["hbm_bw_gbps"] == 1000.0 and one["layer_overhead_us"] == pytest.approx(10.0, rel=1e-6)


# -- shapes ----------------------------------------------------------------------------------------
def test_shapes_are_the_real_models_and_agree_with_the_simulator_presets():
    from tiersim.simulator.presets import MODELS
    from tiersim.validator.shapes import SHAPES, parameter_count

    design_kv = {"r1-distill-qwen-1.5b": 28672, "r1-distill-qwen-7b": 57344, "r1-distill-qwen-14b": 196608,
                 "r1-distill-qwen-32b": 262144, "qwen3-8b": 147456, "llama-3.1-8b": 131072,
                 "llama-3.1-70b": 327680}
    for name, kv in design_kv.items():
        assert SHAPES[name].kv_bytes_per_token == kv
    for name, preset in MODELS.items():
        shape = SHAPES[name]
        assert (shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.hidden_size, shape.num_attention_heads) == (
            preset.num_layers, preset.num_kv_heads, preset.head_dim, preset.hidden_size, preset.num_attention_heads)
        assert parameter_count(shape) == pytest.approx(preset.params, rel=0.03), name


def test_built_model_has_the_shape_and_the_scoring_attention():
    from tiersim.validator.shapes import build_model, get_shape, hf_config, parameter_count

    shape = get_shape("tiny")
    model = build_model(shape, "cpu")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "tiersim"
    assert sum(p.numel() for p in model.parameters()) == parameter_count(shape)
    cfg = hf_config(get_shape("r1-distill-qwen-7b"))  # config only: no 15 GB of weights on CPU
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        3584, 18944, 28, 4)


# -- decode timing -----------------------------------------------------------------------------------
def test_synthetic_prefill_leaves_the_cache_a_real_prefill_would():
    from tiersim.validator.decode import run_point
    from tiersim.validator.shapes import build_model, get_shape

    shape = get_shape("tiny")
    model = build_model(shape, "cpu")
    batch, context = 2, 120
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add stalls on a busy CI machine
    try:
        synthetic = run_point(model, batch, context, 0.5, steps=2, warmup=1, prefill="synthetic")
        real = run_point(model, batch, context, 0.5, steps=2, warmup=1, prefill="model")
    finally:
        torch.set_num_threads(threads)
    assert synthetic["tier_bytes"] == real["tier_bytes"]
    ddr_tokens = tier_targets(TierConfig(hbm=0.5, ddr=0.5), context, protected=4 + 64)["ddr"]
    assert ddr_tokens > 0
    expected = ddr_tokens * shape.kv_bytes_per_token * batch  # every step prefetches the whole DDR tier
    assert synthetic["h2d_bytes"] == real["h2d_bytes"] == expected
    assert synthetic["step_ms"] > 0 and synthetic["stall_ms"] is None  # stalls are a CUDA measurement


# -- the smoke run and the calibration file ------------------------------------------------------------
def test_smoke_run_writes_a_valid_calibration(smoke):
    from tiersim.simulator.calibration import apply_calibration, load_calibration
    from tiersim.simulator.presets import GB, get_gpu

    doc, path, _, _ = smoke
    assert doc["kind"] == "calibration" and doc["schema_version"] == 1
    assert doc["device"]["torch"] == torch.__version__ and doc["device"]["name"].startswith("cpu")
    assert doc["command"].startswith("python -m tiersim.validator") and "--model-shape tiny" in doc["command"]
    link = doc["link"]
    assert {r["direction"] for r in link["sweep"]} == {"h2d", "d2h", "both"}
    assert min(r["bytes"] for r in link["sweep"]) == 4096 and max(r["bytes"] for r in link["sweep"]) == 64 << 20
    assert link["h2d_gbps"] > 0 and link["d2h_gbps"] > 0 and link["bidir_total_gbps"] > 0
    assert doc["compute"]["hbm_bw_gbps"] > 0 and doc["compute"]["peak_tflops"] > 0
    assert len(doc["points"]) == 2 * 2 * 2
    for p in doc["points"]:
        assert p["measured_step_ms"] > 0 and p["baseline_step_ms"] > 0 and p["simulated_step_ms"] > 0
        assert p["overhead_pct"] == pytest.approx(100 * (p["measured_step_ms"] / p["baseline_step_ms"] - 1))
        assert p["sim_error_pct"] == pytest.approx(100 * (p["simulated_step_ms"] / p["measured_step_ms"] - 1))
        assert (p["h2d_bytes"] > 0) == (p["hbm"] < 1.0)
    assert doc["sim_error_pct"] == [p["sim_error_pct"] for p in doc["points"]]
    assert doc["overhead_pct"] == [p["overhead_pct"] for p in doc["points"]]
    # the simulator reads it back and adopts the measured link
    gpu = apply_calibration(get_gpu(doc["gpu_preset"]), load_calibration(path))
    assert gpu.h2d_bw == pytest.approx(link["h2d_gbps"] * GB)
    assert not [f for f in path.parent.iterdir() if f.name.endswith(".tmp")]  # atomic: no temp file left


def test_calibration_points_are_the_validation_point_record(smoke):
    """The file's point keys are ValidationPoint's fields, and docs/file-formats.md names each of them."""
    import re
    from dataclasses import fields

    from tiersim.validator.calibrate import ValidationPoint

    names = [f.name for f in fields(ValidationPoint)]
    assert all(list(p) == names for p in smoke[0]["points"])
    text = (REPO / "docs" / "file-formats.md").read_text()
    section = text[text.index("## Calibration / validation"):text.index("## Operator profile")]
    documented = set(re.findall(r"`?\"?([a-z0-9_]+)\"?`?", section))
    assert not [n for n in names if n not in documented]


def test_smoke_run_prints_the_table(smoke):
    doc, _, stdout, _ = smoke
    assert "measured ms" in stdout and "simulated ms" in stdout
    table_rows = [line for line in stdout.splitlines() if line.split()[:1] == ["tiny"]]
    assert len(table_rows) == len(doc["points"])


def test_validator_core_imports_only_torch_and_numpy(smoke):
    assert smoke[3] == []


def test_predictions_come_from_the_calibrated_closed_form(smoke):
    from tiersim.simulator.calibration import apply_calibration
    from tiersim.simulator.presets import get_gpu
    from tiersim.validator.predict import effective_context, predict, sim_model
    from tiersim.validator.shapes import get_shape

    doc = smoke[0]
    model = sim_model(get_shape("tiny"), doc["model_shape"]["params"])
    gpu = apply_calibration(get_gpu(doc["gpu_preset"]), doc)
    s = doc["settings"]
    policy = {k: s[k] for k in ("sink_tokens", "recent_window", "retier_every")}
    for p in doc["points"]:
        pred = predict(model, gpu, policy, p["batch"], effective_context(p["context"], s["warmup"], s["steps"]), p["hbm"])
        assert p["simulated_step_ms"] == pytest.approx(pred["step_ms"])
    # link-bound on an H100 (7B, batch 64, 8K): the prediction follows the DDR bytes over the link
    from tiersim.simulator.presets import get_model

    h100, r1 = get_gpu("h100-sxm"), get_model("r1-distill-qwen-7b")
    ddr_bytes = 64 * tier_targets(TierConfig(hbm=0.25, ddr=0.75), 8192, protected=68)["ddr"] * r1.kv_bytes_per_token
    link_ms = 1e3 * (ddr_bytes / h100.h2d_bw + r1.num_layers * 2 * h100.copy_latency)
    assert predict(r1, h100, policy, 64, 8192.0, 0.25)["step_ms"] == pytest.approx(link_ms, rel=1e-9)
    assert predict(r1, h100, policy, 64, 8192.0, 1.0)["step_ms"] < 0.2 * link_ms


# -- the compare table and the CLI ----------------------------------------------------------------------
def _fake_calibration(path: Path) -> dict:
    doc = {"kind": "calibration", "schema_version": 1, "device": {"name": "NVIDIA H100 80GB HBM3"},
           "link": {"h2d_gbps": 50.0, "d2h_gbps": 52.0, "bidir_total_gbps": 83.0, "copy_latency_us": 5.0, "sweep": []},
           "compute": {"hbm_bw_gbps": 2700.0, "peak_tflops": 700.0, "layer_overhead_us": 30.0},
           "points": [{"model_shape": "r1-distill-qwen-7b", "batch": 1, "context": 2048, "hbm": 0.5,
                       "measured_step_ms": 20.0, "baseline_step_ms": 19.0, "stall_ms": 0.25, "h2d_bytes": 58_720_256,
                       "overhead_pct": 100 / 19, "simulated_step_ms": 22.0, "sim_error_pct": 10.0}],
           "sim_error_pct": [10.0], "overhead_pct": [100 / 19]}
    path.write_text(json.dumps(doc))
    return doc


def test_compare_table_shows_measured_next_to_simulated(tmp_path):
    from tiersim.cli.main import app
    from tiersim.validator.compare import COLUMNS, format_text, rows

    doc = _fake_calibration(tmp_path / "h100.json")
    row = dict(zip(COLUMNS, rows(doc)[0]))
    assert (row["measured ms"], row["simulated ms"], row["error %"], row["overhead %"]) == ("20.000", "22.000", "+10.0", "+5.3")
    assert row["H2D MB/step"] == "58.720"
    text = format_text(doc)
    assert "NVIDIA H100 80GB HBM3" in text and "H2D 50.0 GB/s" in text
    result = _runner().invoke(app, ["validate", "--compare", str(tmp_path / "h100.json")])
    assert result.exit_code == 0, result.output
    assert "measured vs simulated" in result.output
    assert "20.000" in result.output and "22.000" in result.output and "+10.0" in result.output


def test_compare_refuses_a_foreign_file_in_one_line(tmp_path):
    from tiersim.cli.main import app

    bad = tmp_path / "trace.json"
    bad.write_text(json.dumps({"kind": "capacity", "schema_version": 1}))
    result = _runner().invoke(app, ["validate", "--compare", str(bad)])
    assert result.exit_code != 0
    assert "not a tiersim calibration file" in str(result.exception or result.output)


def test_cli_smoke_mode_writes_the_file(tmp_path):
    from tiersim.cli.main import app

    out = tmp_path / "cal.json"
    args = ["validate", "--model-shape", "tiny", "--device", "cpu", "--batch", "1", "--context", "100",
            "--hbm", "0.5", "--steps", "2", "--warmup", "1", "--out", str(out)]
    result = _runner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert [p["hbm"] for p in doc["points"]] == [0.5]  # the baseline is measured but only asked-for ratios listed
    assert doc["points"][0]["baseline_step_ms"] > 0
    assert "measured vs simulated" in result.output


@pytest.mark.parametrize(
    "args, field",
    [(["--hbm", "1.5"], "--hbm"), (["--batch", "0"], "--batch"), (["--batch", "two"], "--batch"),
     (["--model-shape", "gpt-5"], "--model-shape"), (["--prefill", "magic"], "--prefill"),
     (["--steps", "0"], "--steps"), (["--out", "."], "--out"), (["--out", "cal.txt"], "--out")],
)
def test_bad_input_names_the_field(args, field):
    from tiersim.cli.main import app
    from tiersim.errors import TiersimError

    result = _runner().invoke(app, ["validate", "--device", "cpu", *args])
    assert isinstance(result.exception, TiersimError)
    assert field in str(result.exception) and len(str(result.exception).splitlines()) == 1


def test_bad_input_exits_2_with_one_line_before_measuring(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tiersim", "validate", "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "--out" in proc.stderr
    assert proc.stdout == ""  # refused before the link sweep or any model was built


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_validate_says_so_in_one_line_and_fails():
    proc = subprocess.run([sys.executable, "-m", "tiersim", "validate"], capture_output=True, text=True,
                          env=_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 2  # the CLI: a usage error like any other (issue 26)
    assert proc.stderr.strip().startswith("error: no CUDA device:") and len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run([sys.executable, "-m", "tiersim.validator", "--model-shape", "tiny"], capture_output=True,
                          text=True, env=_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("no CUDA device:")


# -- on a GPU machine only ------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_times_prefetch_copies_and_stalls(tmp_path):
    from tiersim.validator.calibrate import run_validation

    doc = run_validation("tiny", [1, 4], [512], [1.0, 0.5], device="cuda", steps=8, warmup=2,
                         out=tmp_path / "gpu.json", sweep_sizes=(4096, 1 << 20, 16 << 20))
    assert doc["device"]["cuda"] and doc["device"]["name"]
    offloaded = [p for p in doc["points"] if p["hbm"] == 0.5]
    for p in offloaded:
        assert p["prefetch_gbps"] and p["prefetch_gbps"] > 0
        assert p["stall_ms"] is not None and p["stall_ms"] >= 0
        assert p["h2d_bytes"] > 0
    assert doc["link"]["h2d_gbps"] > 1.0  # a real PCIe / C2C link, not a memcpy


def test_instrumented_cache_times_the_public_prefetch_interface():
    """The probe steps wrap the prefetch strategy's public methods; a rename there must fail here, not on the GPU."""
    import inspect

    from tiersim.hierarchy.access import Prefetch
    from tiersim.validator.decode import InstrumentedCache, TimedPrefetch

    for name in ("prefetch", "fetch"):
        ours, theirs = (list(inspect.signature(getattr(c, name)).parameters) for c in (TimedPrefetch, Prefetch))
        assert ours == theirs, name
    cache = InstrumentedCache(TierConfig(hbm=0.5, ddr=0.5))
    assert isinstance(cache.access, TimedPrefetch) and cache.access.owner is cache
    # Selective subclasses Prefetch: it must keep its own access, not be timed as plain prefetch.
    selective = InstrumentedCache(TierConfig(hbm=0.5, ddr=0.5, strategy="selective", fetch_share=0.5))
    assert not isinstance(selective.access, TimedPrefetch)
    assert "stream" in vars(cache.access)
    # A host-attention cache keeps its own strategy (its steps are timed as a whole).
    assert not isinstance(InstrumentedCache(TierConfig(hbm=0.5, ddr=0.5, strategy="host-attention")).access,
                          TimedPrefetch)


def test_a_spent_time_budget_still_ends_with_a_file(tmp_path):
    from tiersim.validator.calibrate import run_validation
    from tiersim.validator.compare import format_text

    out = tmp_path / "cal.json"
    doc = run_validation("tiny", [1], [96], [1.0, 0.5], device="cpu", steps=2, warmup=1, out=out,
                         sweep_sizes=(4096, 1 << 16), budget_s=1e-9)
    assert json.loads(out.read_text())["points"] == doc["points"]
    assert len(doc["points"]) == 2
    assert all(p["measured_step_ms"] is None and p["error"].startswith("skipped: time budget") for p in doc["points"])
    assert doc["sim_error_pct"] == [] and doc["overhead_pct"] == []
    assert "tiny" in format_text(doc)  # the table shows skipped points as dashes


def test_cpu_smoke_mode_defaults_to_the_tiny_shape_and_refuses_real_sizes(tmp_path):
    """`tiersim validate --device cpu` once built the 7B shape on the CPU and died of memory."""
    from tiersim.errors import TiersimError
    from tiersim.validator.calibrate import run_validation

    doc = run_validation(None, [1], [96], [1.0], device="cpu", steps=1, warmup=1, sweep_sizes=(4096, 1 << 16),
                         budget_s=1e-9)
    assert doc["model_shape"]["name"] == "tiny"
    with pytest.raises(TiersimError, match="too large for the CPU smoke mode"):
        run_validation("r1-distill-qwen-7b", [1], [96], [1.0], device="cpu")


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_every_architecture_of_the_table_builds_and_decodes(arch):
    from dataclasses import replace

    from tiersim.validator.decode import run_point
    from tiersim.validator.shapes import build_model, get_shape, parameter_count

    shape = replace(get_shape("tiny"), name=f"tiny-{arch}", architecture=arch)
    model = build_model(shape, "cpu")
    assert sum(p.numel() for p in model.parameters()) == parameter_count(shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        point = run_point(model, 1, 100, 0.5, steps=1, warmup=1)
    finally:
        torch.set_num_threads(threads)
    assert point["h2d_bytes"] == tier_targets(TierConfig(hbm=0.5, ddr=0.5), 100, protected=68)["ddr"] * shape.kv_bytes_per_token


@pytest.mark.parametrize("device", ["cuda:abc", "cuda:", "cuda:-1", "tpu"])
def test_a_malformed_device_is_a_format_error_on_any_machine(device):
    from tiersim.errors import TiersimError
    from tiersim.validator.calibrate import NoDeviceError, resolve_device

    with pytest.raises(TiersimError, match="--device must be 'cuda', 'cuda:N' or 'cpu'") as caught:
        resolve_device(device)
    assert not isinstance(caught.value, NoDeviceError)

"""The operator profiler (tiersim.validator.operators): CPU smoke mode, file format, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FOREIGN = ("simpy", "plotly", "rich", "typer", "click", "pandas", "pyarrow")


def _run(args: list[str]) -> subprocess.CompletedProcess:
    code = (
        # what torch and transformers import themselves is not the validator's doing (transformers 5.17 pulls
        # huggingface_hub -> httpx, whose optional CLI imports click and rich where they are installed)
        "import runpy, sys, json\nimport torch, transformers\n_base = set(sys.modules)\n"
        f"sys.argv = ['tiersim.validator.operators', *{args!r}]\n"
        "try:\n    runpy.run_module('tiersim.validator.operators', run_name='__main__')\n"
        "except SystemExit as exc:\n    code = exc.code\nelse:\n    code = 0\n"
        f"print('FOREIGN=' + json.dumps(sorted(m for m in {FOREIGN!r} if m in sys.modules and m not in _base)))\n"
        "sys.exit(code)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("ops") / "cpu-ops.json"
    proc = _run(["--shape", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text()), out, proc.stdout


def test_smoke_profile_has_every_table(smoke):
    from tiersim.validator.operators import SMOKE
    from tiersim.validator.operators_tables import linear_shapes
    from tiersim.validator.sdpa import SDPA_CHOICES
    from tiersim.validator.shapes import get_shape

    doc, path, _ = smoke
    assert doc["kind"] == "operator-profile" and doc["schema_version"] == 1
    assert doc["device"]["name"].startswith("cpu") and doc["command"].startswith("python -m tiersim.validator.operators")
    m = doc["models"]["tiny"]
    assert m["skipped"] == []
    shape = get_shape("tiny")
    gemm = {(r["op"], r["tokens"]): r for r in m["gemm"]}
    assert set(gemm) == {(op, t) for op in linear_shapes(shape) for t in SMOKE["tokens"]}
    assert gemm[("lm_head", 4)]["n"] == shape.vocab_size and gemm[("lm_head", 4)]["flops"] == 2 * 4 * 64 * 256
    small = {(r["op"], r["tokens"]) for r in m["small"]}
    for op in ("rmsnorm", "rope", "silu_mul", "residual_add", "embedding", "rotary_emb", "final_norm"):
        assert all((op, t) in small for t in SMOKE["tokens"])
    attn = {(r["op"], r["batch"], r["context"]) for r in m["attention"]}
    assert attn == {(op, b, c) for op in ("sdpa_decode", "sdpa_decode_no_cudnn", "kv_cat")
                    for b in SMOKE["batches"] for c in SMOKE["contexts"]}
    for r in m["gemm"] + m["small"] + m["attention"]:
        assert r["device_us"] > 0 and r["host_us"] > 0 and r["method"] == "eager-burst"
    compare = [(c["cache"], c["hbm"], c["sdpa"]) for c in m["decode_compare"]]
    assert compare == [(kind, hbm, sdpa) for sdpa in SDPA_CHOICES
                       for kind, hbm in (("dynamic", 1.0), ("tiered", 1.0), ("tiered", 0.5))]
    # the grid: the dynamic compare runs, then every other point under each SDPA choice
    assert [(r["cache"], r["batch"], r["sdpa"]) for r in m["decode"]] == (
        [("dynamic", SMOKE["decode"][0][0], sdpa) for sdpa in SDPA_CHOICES]
        + [("dynamic", b, sdpa) for sdpa in SDPA_CHOICES for b, _ in SMOKE["decode"][1:]])
    # no two runs decode at the same KV lengths (a per-length plan cache must not favour the later one)
    contexts = [c["context"] for c in m["decode_compare"]] + [r["context"] for r in m["decode"][2:]]
    assert len(set(contexts)) == len(contexts)
    assert all(r["first_call_us"] > 0 for r in m["attention"] if r["op"].startswith("sdpa_decode"))
    for c in m["decode_compare"]:
        assert c["step_ms"] > 0 and c["cpu_issue_ms"] > 0 and c["top_ops_by_self_cpu"]
        assert c["top_python_by_self_time"] and c["gpu_kernel_ms"] is None  # kernel time is a CUDA measurement
    assert not [f for f in path.parent.iterdir() if f.name.endswith(".tmp")]


def test_smoke_prints_the_short_table_last_and_imports_only_torch_and_numpy(smoke):
    _, _, stdout = smoke
    body, foreign = stdout.rsplit("FOREIGN=", 1)
    assert json.loads(foreign) == []
    assert body.startswith("operator profile: cpu")
    assert "lm_head" in body and "top self-CPU ops, tiered hbm 0.5 sdpa no-cudnn" in body


def test_rotation_covers_the_l2_but_not_more_copies_than_layers():
    from tiersim.validator.operators_timing import ROTATE_BYTES, copies_for

    assert copies_for(ROTATE_BYTES * 2, 28) == 1
    assert copies_for(ROTATE_BYTES / 4, 28) == 4
    assert copies_for(1024, 28) == 28


@pytest.mark.parametrize("args, needle", [
    (["--shape", "gpt-9"], "gpt-9"),
    (["--shape", "tiny", "--device", "cpu", "--budget-s", "0"], "--budget-s"),
    (["--shape", "tiny", "--device", "cpu", "--out", "x.txt"], "--out"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle):
    proc = _run(args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]


def test_budget_spent_still_writes_a_file_listing_what_was_skipped(tmp_path):
    from tiersim.validator.operators import run

    doc = run(["tiny"], device="cpu", out=tmp_path / "p.json", budget_s=1e-9, steps=1, warmup=1)
    m = doc["models"]["tiny"]
    assert m["gemm"] == [] and m["decode"] == [] and m["skipped"]
    assert json.loads((tmp_path / "p.json").read_text())["models"]["tiny"]["skipped"] == m["skipped"]


def test_kernel_time_counts_device_rows_once():
    """A CPU operator's row repeats the time of the kernels it launched: only device rows are summed."""
    from types import SimpleNamespace

    from tiersim.validator.operators_decode import _top_ops

    def row(key, cpu, dev, device_type):
        return SimpleNamespace(key=key, count=2, self_cpu_time_total=cpu, cpu_time_total=cpu,
                               self_device_time_total=dev, device_type=device_type)

    prof = SimpleNamespace(key_averages=lambda: [
        row("aten::mm", 300.0, 1000.0, "DeviceType.CPU"), row("nvjet_gemm", 0.0, 1000.0, "DeviceType.CUDA"),
        row("cudaLaunchKernel", 100.0, 0.0, "DeviceType.CPU"), row("Memcpy HtoD", 0.0, 500.0, "DeviceType.CUDA")])
    rows, kernel_ms, cpu_ms = _top_ops(prof, steps=2)
    assert kernel_ms == pytest.approx((1000 + 500) / 2 / 1e3)
    assert cpu_ms == pytest.approx(400 / 2 / 1e3)
    assert [r["name"] for r in rows][:2] == ["aten::mm", "cudaLaunchKernel"]


def test_sdpa_choice_is_checked_before_measuring(tmp_path):
    from tiersim.errors import TiersimError
    from tiersim.validator.calibrate import run_validation

    with pytest.raises(TiersimError, match="--sdpa"):
        run_validation("tiny", [1], [64], [1.0], device="cpu", sdpa="cudnn-only")


def test_the_validator_predicts_with_a_profile_of_the_same_device(tmp_path, smoke):
    """`python -m tiersim.validator --profile FILE`: the predictions use the measured operator tables."""
    from tiersim.errors import TiersimError
    from tiersim.validator.calibrate import run_validation

    _, profile, _ = smoke
    kwargs = dict(device="cpu", steps=1, warmup=1, sweep_sizes=[4096, 65536])
    doc = run_validation("tiny", [1], [96], [1.0], profile=profile, **kwargs)
    assert doc["compute_model"].startswith("profile (tiny on cpu")
    plain = run_validation("tiny", [1], [96], [1.0], **kwargs)
    assert plain["compute_model"] == "roofline (calibrated)"
    with pytest.raises(TiersimError, match="--profile: file not found"):
        run_validation("tiny", [1], [96], [1.0], profile=tmp_path / "missing.json", **kwargs)

"""The GPU run's pre-registered predictions (docs/validation/predicted-<gpu>.json): written before any GPU run, so the
run is a held-out test of the simulator. These tests hold the committed files to the GPU script's grid and to the
simulator as it is now. When a deliberate physics change moves a prediction, the regeneration test fails: regenerate
on purpose (``python scripts/preregister_gpu_grid.py --replace``). The new predictions are then not pre-registered
for any GPU run made before them (docs/validation/README.md)."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiersim.errors import TiersimError
from tiersim.simulator import preregister

REPO = Path(__file__).resolve().parent.parent
VALIDATION = REPO / "docs" / "validation"
PRESETS = ("h200", "h100-sxm")
REGENERATE = ("regenerate deliberately: python scripts/preregister_gpu_grid.py --replace (the new predictions are not "
              "pre-registered for a GPU run made before them; docs/validation/README.md)")


def _script():
    spec = importlib.util.spec_from_file_location("preregister_gpu_grid", REPO / "scripts" / "preregister_gpu_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _committed(gpu: str) -> dict:
    return json.loads((VALIDATION / f"predicted-{gpu}.json").read_text())


def _script_grid() -> dict:
    return _script().read_grid((REPO / "scripts" / "gpu_validate.sh").read_text())


@pytest.mark.parametrize("gpu", PRESETS)
def test_the_registered_grid_is_the_gpu_script_s(gpu):
    """Someone who changes the script's grid (or the registered file's) without registering again fails here."""
    doc = _committed(gpu)
    assert doc["grid"] == _script_grid(), f"the GPU script's grid changed: {REGENERATE}"
    keys = [{k: p[k] for k in ("batch", "context", "hbm", "compressed", "strategy", "fetch_share")}
            for p in doc["points"]]
    assert keys == preregister.grid_points(doc["grid"])
    assert doc["gpu_preset"] == gpu and doc["simulator"]["calibration"] is None


def test_the_script_grid_is_the_one_issue_23_names():
    """The 7B shape; batch 1, 8, 32, 64; context 2K, 8K; HBM 1.0, 0.5, 0.25; both host strategies checked."""
    grid = _script_grid()
    assert (grid["shape"], grid["batch"], grid["context"], grid["hbm"]) == (
        "r1-distill-qwen-7b", [1, 8, 32, 64], [2048, 8192], [1.0, 0.5, 0.25])
    assert grid["strategy_check"] == ["host-attention", "hybrid"] and grid["compressed"] == 0.25
    points = preregister.grid_points(grid)
    assert len(points) == 4 * 2 * 3 + 2 + 2


@pytest.mark.parametrize("gpu", PRESETS)
def test_regenerating_gives_the_committed_files_bit_for_bit(tmp_path, gpu):
    """Everything but the stamps (commit, time) is what the simulator predicts today: a physics change that moves a
    prediction shows here, and is registered again only on purpose."""
    committed = _committed(gpu)
    doc = preregister.document(committed["grid"], gpu, committed["generated"], committed["command"])
    doc["registered"] = committed["registered"]
    assert preregister.predictions(doc) == preregister.predictions(committed), f"the predictions moved: {REGENERATE}"
    from tiersim.fileformat import write_document

    write_document(tmp_path / "p.json", doc)
    assert (tmp_path / "p.json").read_bytes() == (VALIDATION / f"predicted-{gpu}.json").read_bytes()
    assert preregister.markdown(doc) == (VALIDATION / f"predicted-{gpu}.md").read_text(), REGENERATE


def test_the_h200_figures_are_the_issue_s_four():
    fig = _committed("h200")["figures"]
    assert set(fig) == set(preregister.FIGURE_NAMES)
    assert fig["median_abs_error_pct"]["predicted"] is None  # no simulator predicts its own error
    head = fig["overhead_head"]
    assert (head["batch"], head["context"], head["hbm"]) == (1, 2048, 0.5)
    assert [p["batch"] for p in fig["link_bound"]] == [1, 8, 32, 64]
    assert all(p["context"] == 8192 and p["hbm"] == 0.25 for p in fig["link_bound"])


def test_the_grid_rules_are_the_graph_executor_s():
    """The two rules restated from the validator's layer: the points' order and checks, and the steps the file
    records, held to a real (CPU, tiny) run of the graph grid."""
    from tiersim.validator import graph_host
    from tiersim.validator.graph_run import run_graph

    grid = {"shape": "tiny", "batch": [1, 2], "context": [16], "hbm": [1.0, 0.5, 0.25], "steps": 2, "warmup": 3,
            "compressed": 0.25, "strategy_check": ["host-attention", "hybrid"]}
    doc = run_graph("tiny", grid["batch"], grid["context"], grid["hbm"], device="cpu", steps=grid["steps"],
                    warmup=grid["warmup"], strategy_check="host-attention,hybrid", compressed=0.25)
    ran = [{"batch": p["batch"], "context": p["context"], "hbm": p["hbm"], "compressed": p["compressed"],
            "strategy": p["strategy"], "fetch_share": p["fetch_share"]} for p in doc["points"]]
    assert ran == preregister.grid_points(grid)
    assert {k: doc["settings"][k] for k in ("steps", "warmup")} == preregister.file_settings(2, 3)
    assert graph_host.HYBRID_SHARE == preregister.HYBRID_SHARE


def test_the_graph_executor_s_defaults_are_the_script_s_grid():
    """Two definitions of the grid exist (the script's defaults, which the GPU run uses, and graph_run's): the
    predictions read the script's; this says when the two part."""
    from tiersim.validator import graph_run

    grid = _script_grid()
    assert (tuple(grid["batch"]), tuple(grid["context"]), tuple(grid["hbm"])) == (
        graph_run.DEFAULT_BATCHES, graph_run.DEFAULT_CONTEXTS, graph_run.DEFAULT_HBM)


SCRIPT = """if [ "$DRY_RUN" = 1 ]; then
  DEVICE=cpu SHAPE=${SHAPE:-tiny} BATCH=${BATCH:-1} CONTEXT=${CONTEXT:-80} HBM=${HBM:-1.0,0.5}
  STEPS=${STEPS:-1} WARMUP=${WARMUP:-1} COMPRESSED=${COMPRESSED:-0.25} STRATEGY_CHECK=${STRATEGY_CHECK-hybrid}
else
  DEVICE=cuda SHAPE=${SHAPE:-big} BATCH=${BATCH:-2,4} CONTEXT=${CONTEXT:-512}
  HBM=${HBM:-1.0,0.5} STEPS=${STEPS:-8} WARMUP=${WARMUP:-2} COMPRESSED=${COMPRESSED:-0}
  STRATEGY_CHECK=${STRATEGY_CHECK-}
fi
"""


def test_the_grid_is_read_from_the_cuda_branch_not_the_dry_run():
    grid = _script().read_grid(SCRIPT, "s.sh")
    assert grid == {"source": "s.sh", "shape": "big", "batch": [2, 4], "context": [512], "hbm": [1.0, 0.5],
                    "steps": 8, "warmup": 2, "compressed": 0.0, "strategy_check": []}
    assert [p["strategy"] for p in preregister.grid_points(grid)] == ["prefetch"] * 4  # no check, no compressed


@pytest.mark.parametrize("text, words", [
    (SCRIPT.replace("DEVICE=cuda", "DEVICE=gpu"), "no DEVICE=cuda branch"),
    (SCRIPT.replace("BATCH=${BATCH:-2,4}", ""), "no BATCH="),
    (SCRIPT.replace("BATCH=${BATCH:-2,4}", "BATCH=${BATCH:-2,x}"), "BATCH default '2,x' is not a int list"),
    (SCRIPT.replace("HBM=${HBM:-1.0,0.5}", "HBM=${HBM:-}"), "HBM default '' is not a float list"),
])
def test_a_script_without_a_readable_grid_is_one_line(text, words):
    script = _script()
    with pytest.raises(script.GridError, match="^s.sh: ") as info:
        script.read_grid(text, "s.sh")
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("args, words", [(["--script", "/nonexistent.sh"], "cannot read the GPU script"),
                                         (["--gpu", "bogus"], "unknown GPU preset 'bogus'"),
                                         (["--gpu", ","], "--gpu names no preset")])
def test_the_command_s_bad_input_is_one_line(tmp_path, capsys, args, words):
    assert _script().main([*args, "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def _grid():
    grid = _script().read_grid(SCRIPT, "s.sh")
    return {**grid, "shape": "r1-distill-qwen-7b"}


def test_a_rerun_keeps_the_registration_and_a_moved_prediction_is_refused_unless_replaced(tmp_path):
    path = tmp_path / "predicted-h200.json"
    first = {"commit": "aaaa", "created": "2026-12-01T00:00:00+00:00"}
    later = {"commit": "bbbb", "created": "2026-12-02T00:00:00+00:00"}
    doc = preregister.document(_grid(), "h200", first, "cmd")
    assert preregister.write(path, doc) == "written"
    assert preregister.write(path, preregister.document(_grid(), "h200", later, "cmd")) == "unchanged"
    assert preregister.load(path)["generated"] == first  # nothing moved: the registration stands
    moved = preregister.document({**_grid(), "steps": 9}, "h200", later, "cmd")
    with pytest.raises(TiersimError, match="differ from the registered ones .*commit aaaa.*--replace"):
        preregister.write(path, moved)
    assert preregister.write(path, moved, replace=True) == "replaced"
    again = preregister.load(path)
    assert again["registered"] == first and again["generated"] == later


def _results(prereg: dict, scale: float, created: str, **changes) -> dict:
    """A graph grid's file as the GPU run writes it, every step ``scale`` times the prediction."""
    points = [{"batch": p["batch"], "context": p["context"], "hbm": p["hbm"], "compressed": p["compressed"],
               "strategy": p["strategy"], "fetch_share": p["fetch_share"], "measured_step_ms": p["step_ms"] * scale,
               "stall_ms": p["stall_ms"], "overhead_pct": p["overhead_pct"], "prefetch_gbps": p["prefetch_gbps"]}
              for p in prereg["points"]]
    return {"kind": "calibration", "schema_version": 1, "created": created, "executor": "cuda-graph",
            "device": {"name": "NVIDIA H200"}, "gpu_preset": prereg["gpu_preset"],
            "model_shape": {"name": prereg["model"]}, "settings": dict(prereg["settings"]),
            "summary": {"prefetch_share_of_peak_h2d": 0.9}, "points": points, **changes}


def test_the_results_are_set_beside_the_frozen_predictions(tmp_path, capsys):
    from tiersim.simulator.against import main

    stamp = {"commit": "aaaa", "created": "2026-12-01T00:00:00+00:00"}
    prereg_path = tmp_path / "predicted-h200.json"
    preregister.write(prereg_path, preregister.document(_grid(), "h200", stamp, "cmd"))
    prereg = preregister.load(prereg_path)
    res = tmp_path / "h200-graph.json"
    res.write_text(json.dumps(_results(prereg, 1.25, "2026-12-05T00:00:00+00:00")))
    result = preregister.compare(prereg, res)
    assert result["preregistered"] and result["same_settings"] and not result["unmatched"]
    assert len(result["rows"]) == len(prereg["points"])
    assert result["median_abs_error_pct"] == pytest.approx(20.0)  # 1 / 1.25 - 1
    assert main([str(res), "--preregistered", str(prereg_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("pre-registered: predictions made at aaaa")
    assert out[-1].startswith("median |error| (pre-registered, uncalibrated) 20.0%")

    early = tmp_path / "early.json"  # results older than the predictions: not a pre-registered test
    early.write_text(json.dumps(_results(prereg, 1.0, "2026-11-30T00:00:00+00:00", settings={"steps": 3, "warmup": 1})))
    assert main([str(early), "--preregistered", str(prereg_path)]) == 0
    out = capsys.readouterr().out
    assert "NOT pre-registered" in out and "settings differ" in out


def test_the_gpu_script_s_folder_form_picks_the_measured_preset_s_committed_predictions(tmp_path, capsys):
    """Step 4b of scripts/gpu_validate.sh passes docs/validation itself: the file for the preset the grid was
    measured on is compared (the committed H200 one here, every point measured 1.1x its prediction); a folder
    without that preset's predictions is said in one line and is no failure (the CPU dry run's case)."""
    from tiersim.simulator.against import main

    committed = REPO / "docs" / "validation"
    res = tmp_path / "h200-graph.json"
    res.write_text(json.dumps(_results(preregister.load(committed / "predicted-h200.json"), 1.1,
                                       "2099-01-01T00:00:00+00:00")))
    assert main([str(res), "--preregistered", str(committed)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert str(committed / "predicted-h200.json") in out[0] and out[1].startswith("pre-registered: ")
    assert out[-1].startswith("median |error| (pre-registered, uncalibrated) 9.1%")
    assert main([str(res), "--preregistered", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("no pre-registered predictions for preset h200 in ")
    from typer.testing import CliRunner  # the command asked for a comparison: there a missing file is an error

    from tiersim.cli.main import app

    ok = CliRunner().invoke(app, ["simulate", "--against", str(res), "--preregistered", str(committed)])
    assert ok.exit_code == 0 and "median |error| (pre-registered, uncalibrated) 9.1%" in ok.output, ok.output
    bad = subprocess.run([sys.executable, "-m", "tiersim", "simulate", "--against", str(res), "--preregistered",
                          str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and f"no predicted-h200.json in {tmp_path}" in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("change, words", [
    (lambda r, p: r.update(gpu_preset="h100-sxm"), "measured on preset 'h100-sxm', the predictions are for 'h200'"),
    (lambda r, p: r.update(points=[{**r["points"][0], "batch": 3}]), "no measured point of"),
    (lambda r, p: p.update(kind="calibration"), "is not a tiersim gpu-preregistration file"),
    (lambda r, p: p.update(points=[]), "holds no predicted points"),
    (lambda r, p: p["points"][0].update(step_ms="fast"), "point 1 needs numbers"),
    (lambda r, p: p.update(registered=None), "registered must be an object"),
    (lambda r, p: p.pop("figures"), "figures must be an object"),
    (lambda r, p: p.update(gpu_preset=7), "gpu_preset must be a preset's name"),
    (lambda r, p: p["points"][0].update(strategy=["hybrid"]), "a strategy's name"),
    (lambda r, p: p["points"][0].update(stall_ms="0"), "point 1's stall_ms must be a number"),
    (lambda r, p: p["figures"].update(overhead_head={"overhead_pct": [1]}), "figures.overhead_head.overhead_pct"),
])
def test_a_bad_comparison_is_one_line(tmp_path, capsys, change, words):
    from tiersim.simulator.against import main

    stamp = {"commit": "aaaa", "created": "2026-12-01T00:00:00+00:00"}
    prereg = preregister.document(_grid(), "h200", stamp, "cmd")
    results = _results(prereg, 1.0, "2026-12-05T00:00:00+00:00")
    prereg, results = copy.deepcopy(prereg), copy.deepcopy(results)
    change(results, prereg)
    (tmp_path / "p.json").write_text(json.dumps(prereg))
    (tmp_path / "r.json").write_text(json.dumps(results))
    assert main([str(tmp_path / "r.json"), "--preregistered", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1


def test_preregistered_takes_no_simulation_options(tmp_path, capsys):
    from tiersim.simulator.against import main

    assert main([str(tmp_path / "r.json"), "--preregistered", str(tmp_path / "p.json"), "--gpu", "h200"]) == 2
    assert "drop --model, --gpu" in capsys.readouterr().err


def test_tiersim_simulate_takes_preregistered_beside_against(tmp_path):
    """`tiersim simulate --against R --preregistered P`: the same comparison; without --against, or beside an option
    that would be dropped, one line."""
    from typer.testing import CliRunner

    from tiersim.cli.main import app

    stamp = {"commit": "aaaa", "created": "2026-12-01T00:00:00+00:00"}
    prereg_path = tmp_path / "p.json"
    preregister.write(prereg_path, preregister.document(_grid(), "h200", stamp, "cmd"))
    res = tmp_path / "r.json"
    res.write_text(json.dumps(_results(preregister.load(prereg_path), 0.5, "2026-12-05T00:00:00+00:00")))
    runner = CliRunner()
    ok = runner.invoke(app, ["simulate", "--against", str(res), "--preregistered", str(prereg_path)])
    assert ok.exit_code == 0, ok.output
    assert "median |error| (pre-registered, uncalibrated) 100.0%" in ok.output
    gate = runner.invoke(app, ["simulate", "--against", str(res), "--preregistered", str(prereg_path),
                               "--max-error", "50"])
    assert gate.exit_code == 1
    for args, words in ((["--preregistered", str(prereg_path)], "needs --against"),
                        (["--against", str(res), "--preregistered", str(prereg_path), "--gpu", "h200"],
                         "drop the model and GPU")):
        bad = subprocess.run([sys.executable, "-m", "tiersim", "simulate", *args], capture_output=True, text=True,
                             timeout=120, cwd=REPO)
        assert bad.returncode == 2 and words in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_the_command_writes_both_presets_and_a_rerun_changes_no_byte(tmp_path, capsys):
    script = _script()
    assert script.main(["--out-dir", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"predicted-{g}.{ext}" for g in sorted(PRESETS) for ext in ("json", "md")]
    before = {n: (tmp_path / n).read_bytes() for n in names}
    assert script.main(["--out-dir", str(tmp_path)]) == 0
    assert {n: (tmp_path / n).read_bytes() for n in names} == before
    assert capsys.readouterr().out.count(": unchanged;") == 2
    doc = preregister.load(tmp_path / "predicted-h200.json")
    assert doc["command"] == f"python scripts/preregister_gpu_grid.py --out-dir {tmp_path}"
    assert doc["registered"] == doc["generated"] and doc["registered"]["commit"]

"""The graph grid's checkpoints: its file is written after every point, so a process that dies where Python cannot
write it (a hung CUDA call the GPU script's ``timeout -k`` kills) still leaves the points measured before."""

from __future__ import annotations

import json

import pytest


def test_the_file_after_each_point_holds_every_point_so_far_and_the_end_writes_over_it(monkeypatch, tmp_path):
    """Killed hard (nothing in Python runs: here, the third point never returns and the file is read at that
    moment) the file on disk has the two points before it, each predicted, marked unfinished, and
    ``simulate --against`` reads it; a run that ends writes its own file over the checkpoint."""
    from tiersim.simulator.against import load_measurements
    from tiersim.validator import graph_run

    real = graph_run.measure_point
    out = tmp_path / "g.json"
    seen: list[dict] = []

    class Died(BaseException):
        """Stands for SIGKILL: the run stops here and nothing after it runs."""

    def third_dies(model, batch, context, hbm, *args, **kwargs):
        if out.exists():
            seen.append(json.loads(out.read_text()))
        if len(seen) == 2:
            raise Died
        return real(model, batch, context, hbm, *args, **kwargs)

    monkeypatch.setattr(graph_run, "measure_point", third_dies)
    with pytest.raises(Died):
        graph_run.run_graph("tiny", [1, 2], [72], [1.0, 0.5], device="cpu", steps=1, warmup=1, out=out,
                            sweep_sizes=[4096, 65536])
    doc = json.loads(out.read_text())  # what a SIGKILL leaves
    assert [(p["batch"], p["hbm"]) for p in doc["points"]] == [(1, 1.0), (1, 0.5)]
    assert doc["error"].startswith("unfinished: a checkpoint after 2 points")
    assert all(p["simulated_step_ms"] > 0 for p in doc["points"]) and doc["points"][1]["overhead_pct"] is not None
    assert len(load_measurements(out)[1]) == 2
    assert [len(d["points"]) for d in seen] == [1, 2]  # one checkpoint per point, each with the points so far
    assert not [f for f in tmp_path.iterdir() if f.name != "g.json"]  # atomic: no temporary left beside it

    monkeypatch.setattr(graph_run, "measure_point", real)
    graph_run.run_graph("tiny", [1], [72], [1.0, 0.5], device="cpu", steps=1, warmup=1, out=out,
                        sweep_sizes=[4096, 65536])
    final = json.loads(out.read_text())
    assert "error" not in final and len(final["points"]) == 2


def test_a_checkpoint_that_fails_is_said_and_the_run_goes_on(monkeypatch, tmp_path):
    from tiersim import fileformat
    from tiersim.validator import graph_run

    real = fileformat.write_document
    calls = []

    def fails_while_running(path, doc, *args, **kwargs):
        calls.append(doc.get("error"))
        if doc.get("error", "").startswith("unfinished"):
            raise OSError("disk full\nsecond line")
        return real(path, doc, *args, **kwargs)

    monkeypatch.setattr(fileformat, "write_document", fails_while_running)
    logged: list[str] = []
    out = tmp_path / "g.json"
    doc = graph_run.run_graph("tiny", [1], [72], [1.0, 0.5], device="cpu", steps=1, warmup=1, out=out,
                              sweep_sizes=[4096, 65536], log=logged.append)
    assert len(doc["points"]) == 2 and json.loads(out.read_text())["points"]
    assert [line.strip() for line in logged if line.strip().startswith("checkpoint")] == ["checkpoint not written: OSError: disk full"] * 2
    assert calls[-1] is None  # the run's own file, after the two failed checkpoints


def _cut_short_capture():
    """What ``torch.cuda.graph``'s exit raises when SIGTERM (``Terminated``) cut a capture short: a RuntimeError
    raised while handling the signal (its ``__context__``)."""
    from tiersim.validator.calibrate import Terminated

    try:
        try:
            raise Terminated("terminated by signal 15 (a timeout?)")
        except Terminated:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
    except RuntimeError as exc:
        return exc


def test_a_sigterm_hidden_by_a_failed_capture_is_still_a_sigterm():
    from tiersim.validator.calibrate import Terminated
    from tiersim.validator.graph_run import interrupted_by

    assert isinstance(interrupted_by(_cut_short_capture()), Terminated)
    assert interrupted_by(RuntimeError("capture failed")) is None


def test_a_strategy_check_whose_capture_a_sigterm_cut_short_stops_the_run_with_its_file(monkeypatch, tmp_path):
    """A failing check point passes (its error is recorded, the grid goes on), but not when the failure is a capture
    the script's SIGTERM cut short: the run stops at once, as the signal asks, with the points before it written."""
    from tiersim.validator import calibrate, graph_run

    real = graph_run.measure_point

    def cut_short(model, batch, context, hbm, *args, strategy=None, **kwargs):
        if strategy is not None:
            raise _cut_short_capture()
        return real(model, batch, context, hbm, *args, strategy=strategy, **kwargs)

    monkeypatch.setattr(graph_run, "measure_point", cut_short)
    out = tmp_path / "g.json"
    with pytest.raises(calibrate.Terminated):
        graph_run.run_graph("tiny", [1, 2], [72], [1.0, 0.5], device="cpu", steps=1, warmup=1, out=out,
                            sweep_sizes=[4096, 65536], strategy_check="host-attention")
    doc = json.loads(out.read_text())
    assert [(p["hbm"], p["strategy"]) for p in doc["points"]] == [(1.0, "prefetch"), (0.5, "prefetch")]
    assert doc["error"].startswith("stopped after 2 points: Terminated")


@pytest.mark.parametrize("executor", ["graph", "hf"])
def test_tiersim_validate_stopped_by_ctrl_c_or_sigterm_writes_the_points_before_it_and_says_so(
        monkeypatch, tmp_path, executor):
    """``tiersim validate`` turns SIGTERM into Ctrl-C (KeyboardInterrupt), which the runs' stop handlers did not
    take: the graph grid kept only its last checkpoint, the eager harness nothing at all. Stopped at its second
    point, either executor writes its file with the first point measured and predicted, ``error`` saying why,
    and the command says what it kept (exit 130, one line, no traceback)."""
    from cli_run import invoke

    from tiersim.validator import decode, graph_run

    module, name = (graph_run, "measure_point") if executor == "graph" else (decode, "run_point")
    real, calls = getattr(module, name), []

    def second_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, second_interrupted)
    out = tmp_path / "v.json"
    code, _, err = invoke(["validate", "--executor", executor, "--device", "cpu", "--batch", "1", "--context", "72",
                           "--hbm", "1.0,0.5", "--steps", "1", "--warmup", "1", "--out", str(out)])
    assert code == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == f"interrupted: wrote {out} with the 1 points measured before the run stopped"
    doc = json.loads(out.read_text())
    assert doc["error"].startswith("stopped after 1 points: KeyboardInterrupt")
    assert [p["hbm"] for p in doc["points"]] == [1.0] and doc["points"][0]["measured_step_ms"] > 0
    assert doc["points"][0]["simulated_step_ms"] > 0  # predicted: simulate --against can read it

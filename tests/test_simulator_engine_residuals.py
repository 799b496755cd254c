"""``decode_fidelity.residuals`` / ``residual_line``: what a source's runs leave over the simulated device time, by
batch and context. The diagnosis behind the vLLM 0.5 figures of docs/simulator.md ("Engine presets"): it must recover
an engine line that is there, and it shows, computed here from the held-out runs, that ``vllm-sync``'s per-sequence
term is steeper than what vLLM 0.5 adds, while nothing is fitted on those runs."""

import copy
import statistics

import pytest

from tiersim.simulator import decode_fidelity as df
from tiersim.simulator import engines


def runs_priced_with(source: str, preset: str) -> dict:
    """A copy of the data file whose ``source`` points measure exactly what the simulator prices with ``preset``'s
    line: references built from the simulation itself, so a residual line must give back the preset's line."""
    doc = copy.deepcopy(df.load())
    doc["sources"][source]["engine_overhead"] = preset
    doc["sources"][source].pop("engine_overhead_by_gpu", None)  # one preset on every GPU
    doc["points"] = [p for p in doc["points"] if p["source"] == source]
    for p, priced in zip(doc["points"], df.points(doc)):
        if "t2t_ms" in p:
            p["t2t_ms"] = priced.simulated_ms
        else:
            p["latency_s"] = priced.simulated_ms * 1e-3 * p["length"]
    return doc


@pytest.mark.parametrize("source", ["argonne-vllm", "nvidia-dli-trtllm"])  # whole runs; token-to-token latencies
@pytest.mark.parametrize("preset", ["vllm-sync", "vllm"])
def test_residual_line_recovers_an_engine_line_that_is_in_the_runs(source, preset):
    doc = runs_priced_with(source, preset)
    rows = df.residuals(source, doc)
    line = engines.get(preset)
    assert rows and all(r.charged_ms == pytest.approx(1e3 * line.host_s(r.batch)) for r in rows)
    assert all(r.residual_ms == pytest.approx(r.charged_ms, abs=1e-9) for r in rows)
    fitted = df.residual_line(rows)
    assert len(fitted) == 2  # both GPUs of each source have two batch sizes or more at short context
    for fixed, per_sequence in fitted.values():
        assert fixed == pytest.approx(line.fixed_s * 1e3, abs=1e-9)
        assert per_sequence == pytest.approx(line.per_sequence_s * 1e3, abs=1e-9)


def test_residual_line_needs_two_batch_sizes_per_gpu():
    rows = [r for r in df.residuals("argonne-vllm") if r.batch == 1]
    assert rows and df.residual_line(rows) == {}


def test_vllm_0_5_runs_show_a_flatter_per_sequence_cost_than_vllm_sync():
    """The diagnosis, live: on Argonne's vLLM 0.5 runs (held out) the short-context residual grows by well under
    vllm-sync's 0.100 ms per sequence on both GPUs, and by more than TensorRT-LLM's on the same machines (the
    device model's own miss at batch 16-64); at batch 16 vLLM's residual grows with the context (the attention
    kernel, not the engine line), TensorRT-LLM's far less on the H100 now its preset carries the GQA re-read share."""
    sync = engines.get("vllm-sync").per_sequence_s * 1e3
    vllm_rows, trt_rows = df.residuals("argonne-vllm"), df.residuals("argonne-trtllm")
    vllm, trt = df.residual_line(vllm_rows), df.residual_line(trt_rows)
    assert set(vllm) == set(trt) == {"a100-40gb", "h100"}
    for gpu, (fixed, per_sequence) in vllm.items():
        assert 0.0 < per_sequence < 0.75 * sync, gpu
        assert per_sequence > trt[gpu][1] and fixed > trt[gpu][0], gpu
        assert fixed < 1e3 * engines.get("vllm-sync").host_s(1), gpu

    def growth(rows, gpu):  # batch 16: the residual's median at L >= 1024 less that at short context
        at16 = [r for r in rows if r.gpu == gpu and r.batch == 16]
        return (statistics.median(r.residual_ms for r in at16 if r.length >= 1024)
                - statistics.median(r.residual_ms for r in at16 if r.length <= df.SHORT_CONTEXT))

    for gpu in ("a100-40gb", "h100"):
        # vLLM's grows with the context on both GPUs
        assert growth(vllm_rows, gpu) > 0.25, gpu
    # TensorRT-LLM's far less on the H100, its preset carrying the GQA re-reads; on the A100, with vLLM's
    # sliding-window runs apart (another attention kernel, decode_fidelity.other_kernel), the two grow alike
    assert growth(trt_rows, "h100") < 0.5 * growth(vllm_rows, "h100")
    assert growth(trt_rows, "a100-40gb") < 1.5 * growth(vllm_rows, "a100-40gb")


def test_residuals_read_only_the_named_source():
    doc = copy.deepcopy(df.load())
    for p in doc["points"]:
        if p["source"] != "argonne-vllm":
            p.pop("latency_s", None), p.pop("t2t_ms", None)  # every other source's measurement removed
    assert [r.residual_ms for r in df.residuals("argonne-vllm", doc)] == \
        [r.residual_ms for r in df.residuals("argonne-vllm")]


def test_vllm_sync_line_is_drawn_through_vidurs_stored_cpu_profile_only():
    """vllm-sync (and --host-overhead sync) is the line through the batch-8 and batch-64 sums of vidur's A100 CPU
    profile, stored with its citation; the profile alone is read (no engine measurement, fit or held out)."""
    from tiersim.simulator import fidelity
    from tiersim.simulator.presets import HOST_OVERHEADS

    doc = engines.load()
    sync = engines.get("vllm-sync")
    fixed, per_sequence = fidelity.cpu_profile_line("vidur-a100", {"cpu_profiles": doc["cpu_profiles"]})
    assert fixed == pytest.approx(sync.fixed_s, abs=0.005e-3)
    assert per_sequence == pytest.approx(sync.per_sequence_s, abs=0.0005e-3)
    assert HOST_OVERHEADS["sync"] == (sync.fixed_s, sync.per_sequence_s)
    profile = doc["cpu_profiles"]["vidur-a100"]
    assert profile["role"] == "fit" and profile["engine"] == "vllm-sync" and "vidur @ " in profile["where"]
    assert [r["batch"] for r in profile["rows"]] == list(range(8, 65, 8))
    # least squares over every batch moves the fixed term by ~0.03 ms, the slope by under 0.1 us per sequence
    ls_fixed, ls_per = fidelity.cpu_profile_line("vidur-a100", doc, method="least_squares")
    assert 0.0 < ls_fixed - fixed < 0.05e-3 and abs(ls_per - per_sequence) < 0.001e-3
    # vidur's A40 host (a check nothing reads): the same engine's line within 0.1 ms and 4 us per sequence
    a40 = fidelity.cpu_profile_line("vidur-a40", doc)
    assert doc["cpu_profiles"]["vidur-a40"]["role"] == "check"
    assert abs(a40[0] - fixed) < 0.1e-3 and abs(a40[1] - per_sequence) < 0.004e-3
    with pytest.raises(ValueError, match="endpoints or least_squares"):
        fidelity.cpu_profile_line("vidur-a100", doc, method="median")


def test_docs_state_the_residual_lines_as_computed():
    """docs/simulator.md's "vLLM 0.4-0.5" paragraph quotes these lines; recomputed here so a physics or data change
    that moves them also moves the text."""
    import re
    from pathlib import Path

    from tiersim.simulator import fidelity

    text = re.sub(r"\s+", " ", (Path(__file__).resolve().parent.parent / "docs" / "simulator.md").read_text())
    vllm, trt = df.residual_line(df.residuals("argonne-vllm")), df.residual_line(df.residuals("argonne-trtllm"))
    (a_f, a_p), (h_f, h_p) = vllm["a100-40gb"], vllm["h100"]
    assert f"leave {a_f:.2f} ms + {a_p:.3f} ms/seq (A100-40GB) and {h_f:.2f} + {h_p:.3f} (H100)" in text
    (ta_f, ta_p), (th_f, th_p) = trt["a100-40gb"], trt["h100"]
    sign = lambda x: f"{'−' if x < 0 else '+'} {abs(x):.3f}"  # noqa: E731 (the doc's typography)
    assert (f"leaves {ta_f:.2f} {sign(ta_p)}/seq and {th_f:.2f} {sign(th_p)}/seq".replace("-", "−") in text)
    fixed, per_sequence = fidelity.cpu_profile_line("vidur-a40", method="least_squares")
    assert f"{fixed * 1e3:.2f} + {per_sequence * 1e3:.3f}/seq by least squares over batch 8-48" in text


def test_every_preset_drawn_from_a_cpu_profile_equals_its_redraw():
    """A preset that names a ``cpu_profile`` (vllm-sync: all four phases; vllm-0.6: all but process-model-outputs,
    which vLLM 0.6 overlaps with the next GPU step) stores the line ``cpu_profile_line`` draws from those phases, to
    the file's precision (a changed row or phase list that leaves the stored line behind fails here)."""
    from tiersim.simulator import fidelity

    doc = engines.load()
    drawn = {name: e["cpu_profile"] for name, e in doc["engines"].items() if "cpu_profile" in e}
    assert set(drawn) == {"vllm-sync", "vllm-0.6"}
    assert "process_model_outputs_ms" not in drawn["vllm-0.6"]["phases"]
    assert set(drawn["vllm-sync"]["phases"]) == set(fidelity.CPU_PHASES)
    for name, spec in drawn.items():
        fixed, per_sequence = fidelity.cpu_profile_line(spec["profile"], doc, phases=tuple(spec["phases"]))
        preset = engines.get(name)
        assert fixed == pytest.approx(preset.fixed_s, abs=0.005e-3), name
        assert per_sequence == pytest.approx(preset.per_sequence_s, abs=0.0005e-3), name
    # dropping the overlapped phase lowers both terms: output processing grows with the batch
    assert engines.get("vllm-0.6").fixed_s < engines.get("vllm-sync").fixed_s
    assert engines.get("vllm-0.6").per_sequence_s < 0.5 * engines.get("vllm-sync").per_sequence_s
    with pytest.raises(ValueError, match="phases must be some of"):
        fidelity.cpu_profile_line("vidur-a100", doc, phases=("detokenize_ms",))
    with pytest.raises(ValueError, match="phases must be some of"):
        fidelity.cpu_profile_line("vidur-a100", doc, phases=())


def test_engine_for_reads_the_per_gpu_engine_then_the_sources():
    """Argonne's A100 vLLM runs are a vLLM 0.6 tree (priced with vllm-0.6), its H100 runs unpinned (vllm-sync): one
    reading, ``engine_for``, which every consumer (points, residuals, the fits' subsets) goes through."""
    doc = df.load()
    assert df.engine_for(doc, "argonne-vllm", "a100-40gb") == "vllm-0.6"
    assert df.engine_for(doc, "argonne-vllm", "h100") == "vllm-sync"
    assert df.engine_for(doc, "argonne-trtllm", "a100-40gb") == "trtllm"
    priced = {(p.gpu, p.engine) for p in df.points(doc) if p.source == "argonne-vllm"}
    assert priced == {("a100-40gb", "vllm-0.6"), ("h100", "vllm-sync")}
    # the residuals' charged line is the per-GPU preset's
    for r in df.residuals("argonne-vllm", doc):
        line = engines.get("vllm-0.6" if r.gpu == "a100-40gb" else "vllm-sync")
        assert r.charged_ms == pytest.approx(1e3 * line.host_s(r.batch))
    bad = copy.deepcopy(doc)
    bad["sources"]["argonne-vllm"]["engine_overhead_by_gpu"] = {"a100-40gb": "vllm-0.7"}
    with pytest.raises(ValueError, match="engine 'vllm-0.7', not a preset"):
        df.engine_for(bad, "argonne-vllm", "a100-40gb")
    bad["sources"]["argonne-vllm"]["engine_overhead_by_gpu"] = {"b200": "vllm-0.6"}
    with pytest.raises(ValueError, match="GPU b200, which the file's gpus do not define"):
        df.engine_for(bad, "argonne-vllm", "h100")
